"""Opt-out (objection) types and how sources combine. Domain spec §6 and §1.4.

An opted-out patient is not delivered and not offered to the TTP. Every source answers per patient with
`allowed`, `objected` or `unknown`; the pipeline delivers only `allowed` (unknown fails closed, §6).
`Decision.reason` is a fixed code from `Reason`, never a value from the data, so it may be logged and stored.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

Status = Literal["allowed", "objected", "unknown"]


class Reason:
    """The fixed reason codes (grep-able, safe to log)."""

    NO_CONSENT = "no-consent"  # no Consent about this patient in the source: another source decides
    CONSENT_PERMIT = "consent-permit"
    CONSENT_NOT_APPLICABLE = "consent-not-applicable"  # Consents exist, none is about registry data use
    CONSENT_DENY = "consent-deny"
    CONSENT_UNPARSEABLE = "consent-unparseable"
    CONSENT_WITHOUT_PATIENT = "consent-without-patient"
    REGISTER_OBJECTION = "register-objection"
    REGISTER_NO_OBJECTION = "register-no-objection"
    REGISTER_UNAVAILABLE = "register-unavailable"
    NO_PATIENT_NUMBER = "no-patient-number"
    EHR_NO_PATIENT_ID = "ehr-no-patient-id"
    EHR_UNAVAILABLE = "ehr-unavailable"  # transport error or timeout
    EHR_BAD_STATUS = "ehr-bad-status"  # non-200
    EHR_BAD_RESPONSE = "ehr-bad-response"  # not a searchset Bundle of Consents, OperationOutcome errors, ...
    EHR_INCOMPLETE = "ehr-incomplete"  # more pages than we follow, or a next link to another origin
    EHR_OTHER_PATIENT = "ehr-consent-for-other-patient"
    SOURCE_FAILED = "source-failed"  # a source raised instead of answering
    SOURCE_NO_ANSWER = "source-no-answer"  # a source left a patient out of its answer


# A source could not be reached: the answer may be different a moment later. A live post drops such a patient
# (fail closed, reported); a bulk job stops instead and is resumed, or the yearly delivery would lose them.
OUTAGE_REASONS = frozenset(
    {
        Reason.REGISTER_UNAVAILABLE,
        Reason.EHR_UNAVAILABLE,
        Reason.SOURCE_FAILED,
        "optout-source-error",  # gateway.process.decide_optout: the combined sources raised
        "gics-unavailable",  # gateway.optout.gics.UNAVAILABLE
    }
)


class OptOutUnavailable(Exception):
    """An opt-out source could not answer for a bulk group; the message is a fixed text."""


@dataclass(frozen=True)
class PatientRef:
    key: str  # the Patient's fullUrl in the Bundle: the key of the answer
    resource: dict
    mrn: str | None  # the provider's own patient number, when the profile knows its system
    provider: str
    registry: str
    # further numbers in that system (an old one kept after a renumbering or a merge): an objection
    # registered under any of them holds
    other_mrns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: str


class OptOutSource(Protocol):
    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        """A Decision for every patient key. Must not raise for a per-patient problem (answer unknown)."""
        ...


class CombinedOptOut:
    """Ask every source (concurrently) and combine per patient: any `objected` → objected; otherwise any
    `unknown` → unknown; otherwise allowed. So a Bundle Consent's deny cannot be outvoted by a register that
    knows nothing, and a source that is down blocks delivery instead of being skipped. A source that raises,
    or leaves a patient out, counts as unknown for those patients."""

    def __init__(self, sources: Sequence[OptOutSource]) -> None:
        if not sources:
            raise ValueError("CombinedOptOut needs at least one source")
        self.sources = list(sources)

    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        answers = await asyncio.gather(*(s.check(patients) for s in self.sources), return_exceptions=True)
        per_source: list[dict[str, Decision]] = []
        for source, answer in zip(self.sources, answers, strict=True):
            if isinstance(answer, BaseException):
                # The exception text may carry values from a source's data: log only its type.
                log.warning("opt-out source %s failed (%s)", type(source).__name__, type(answer).__name__)
                answer = {p.key: Decision("unknown", Reason.SOURCE_FAILED) for p in patients}
            per_source.append(answer)
        return {
            p.key: combine([a.get(p.key, Decision("unknown", Reason.SOURCE_NO_ANSWER)) for a in per_source])
            for p in patients
        }


def combine(decisions: Sequence[Decision]) -> Decision:
    """objected beats unknown beats allowed; the first decision of the winning status gives the reason."""
    for status in ("objected", "unknown"):
        for decision in decisions:
            if decision.status == status:
                return decision
    return decisions[0] if decisions else Decision("unknown", Reason.SOURCE_NO_ANSWER)


def visible(text: str) -> str:
    """``text`` without format characters (zero-width spaces and joiners, soft hyphens, bidi marks) and
    surrounding whitespace: what a person reads, as numbers and codes copied along with them are compared."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()
