"""The pseudonymise stage: pseudonym inputs of every admitted patient → one TTP batch → Patient identifiers.

Only patients that passed the opt-out check reach this stage, and only pre-pseudonyms (never plain values)
go to the TTP, in ONE batch for the whole bundle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import InputMapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend

PSEUDED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}


@dataclass
class PseudonymOutcome:
    identifiers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # patient key → Identifiers
    types_added: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # "<TYPE>:<reason>" → count
    # patient key → a pre-pseudonym of theirs, hex: what a date shift is keyed on (see `shift_basis`)
    shift_keys: dict[str, str] = field(default_factory=dict)


# The pre-pseudonym a date shift is keyed on: the first of these types the patient has, made for the shift
# alone when the profile does not ask for it (never sent anywhere). GG (birth date and sex) first: nearly
# every patient has it, so the same person gets the same offset in every delivery whatever else is missing
# this time (a birth name), at every hospital (one source key; the hospital's own number comes last), and
# after the TTP's key is rotated (pre-pseudonyms are made before the TTP). People born the same day with
# the same sex share an offset, which tells nothing about them.
SHIFT_TYPE_ORDER = ("GG", "NGGV", "SNGGV", "NGG", "SNGG", "C", "RGG", "A", "MRN")


def shift_basis(pres: Sequence[PrePseudonym]) -> PrePseudonym | None:
    rank = {t: n for n, t in enumerate(SHIFT_TYPE_ORDER)}
    usable = [p for p in pres if p.type.upper() in rank]
    return min(usable, key=lambda p: rank[p.type.upper()], default=None)


def _shift_only(
    patient: dict[str, Any], registry: str, mapping: InputMapping, source: SourceStage
) -> list[PrePseudonym]:
    return source.pre_pseudonyms(extract_inputs(patient, ["GG"], mapping, None), registry)


# The assigner of an MRN pseudonym: the delivering provider, as the TTP binds it in its layer (domain spec
# §4.3). A registry needs it to translate the value after a key rotation (`$translate` of MRN asks for the
# provider), and to tell which hospital can reveal it; it names the hospital, never the patient.
PROVIDER_SYSTEM = "urn:nlps1:provider"


def pseudonym_identifier(
    system_template: str, registry: str, ptype: str, value: str, provider: str | None = None
) -> dict[str, Any]:
    identifier: dict[str, Any] = {
        "use": "secondary",
        "type": {"coding": [dict(PSEUDED)], "text": f"NLPS1 {ptype}"},
        "system": system_template.format(registry=registry, type=ptype),
        "value": value,
    }
    if ptype.upper() == "MRN" and provider:
        identifier["assigner"] = {"identifier": {"system": PROVIDER_SYSTEM, "value": provider}}
    return identifier


async def pseudonymise_patients(
    patients: Mapping[str, dict[str, Any]],
    *,
    registry: str,
    types: Sequence[str],
    mapping: InputMapping,
    source: SourceStage,
    mrn_system: str | None,
    ttp: TTPBackend,
    system_template: str,
    shift_dates: bool = False,
) -> PseudonymOutcome:
    """`patients` maps a patient key (its fullUrl in the bundle) to the Patient resource. `shift_dates`:
    the registry's profile shifts dates, so each patient's shift key is made too (`shift_basis`)."""
    outcome = PseudonymOutcome()
    asks_gg = "GG" in {t.upper() for t in types}
    batch: list[PrePseudonym] = []
    owners: list[str] = []
    for key, patient in patients.items():
        extraction = extract_inputs(patient, types, mapping, mrn_system)
        for ptype, reason in extraction.skipped.items():
            outcome.skipped[f"{ptype}:{reason}"] += 1
        pres = source.pre_pseudonyms(extraction, registry)
        if shift_dates:
            made_for_shift = [] if asks_gg else _shift_only(patient, registry, mapping, source)
            basis = shift_basis([*pres, *made_for_shift])
            if basis is not None:
                outcome.shift_keys[key] = basis.value.hex()
        batch.extend(pres)
        owners.extend([key] * len(pres))
        outcome.identifiers.setdefault(key, [])
    if not batch:
        return outcome
    results = await ttp.pseudonymise(registry, batch)
    for result in results:
        key = owners[result.index]
        if result.identifier_value is None:
            outcome.skipped[f"{result.type}:ttp-{result.error_code or 'error'}"] += 1
            continue
        value = result.identifier_value
        ident = pseudonym_identifier(system_template, registry, result.type, value, source.provider)
        outcome.identifiers[key].append(ident)
        outcome.types_added[result.type] += 1
    return outcome
