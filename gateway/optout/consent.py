"""Evaluate FHIR R4 Consent resources for one question: may this patient's data go to this registry?

Rules (domain spec §6, decided here where the spec leaves it open):

- Only `status = active` Consents count; draft/proposed/rejected/inactive/entered-in-error are ignored.
  A missing or unknown status is unparseable → unknown.
- `scope` treatment or adr only (e.g. zib TreatmentDirective2, advance directives) is about care, not data
  use → not applicable. `research` and `patient-privacy` (and any scope this gateway does not know: fail
  closed) are evaluated, also beside treatment or adr.
- Provisions are a tree: the node's `type` is the rule, nested provisions are exceptions to it (R4). A deny
  that applies counts wherever it is nested, also under a node that does not apply. A node
  applies when its own `period` covers now (absent = always), its `purpose` is absent or names one of the
  delivery's purposes (default v3-ActReason HQUALIMP, HRESCH; a purpose coding without a system matches
  by code), and its `actor` is absent or names the
  registry (configured per registry, by reference or identifier; a `Consent.policy.uri` configured for the
  registry counts as naming it). A deny naming an actor where nothing is configured for the registry cannot
  be placed: unparseable (a permit's does not apply). The most specific applicable node decides; when
  applicable siblings disagree, deny wins ("objections supersede consents").
- Conservative on purpose: a *deny* applies if it names any delivery purpose (by its code, under whatever
  system), and cannot be read when it names a purpose in a code system not known here (the OID and pre-R4
  URLs of the HL7 v3 systems are known spellings); a *permit* exception only if it covers all of them. A
  deny restricted by `data`, `class`, `code`, `dataPeriod` or `securityLabel` (a partial objection) counts
  as a deny of everything, since the gateway cannot filter parts of a record reliably.
- No provision: `policyRule` OPTOUT/OPTOUTE (v3-ActCode) is a deny, OPTIN/OPTINR a permit, anything else is
  unparseable.
- Per patient: any applicable deny → objected; else any unparseable Consent → unknown; else any permit →
  allowed; no Consent about the patient → allowed with reason `no-consent` (other sources decide: see
  `CombinedOptOut`). A Consent whose patient cannot be determined and that would deny (or cannot be read)
  makes every patient of the Bundle unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from gateway.optout.base import Decision, PatientRef, Reason

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
PROVISION_TYPES = frozenset({"deny", "permit"})
# Other spellings of these code systems that exports carry: the OID and the pre-R4 (DSTU2/STU3) URL
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.5.8": ACT_REASON,
    "http://hl7.org/fhir/v3/ActReason": ACT_REASON,
    "urn:oid:2.16.840.1.113883.5.4": ACT_CODE,
    "http://hl7.org/fhir/v3/ActCode": ACT_CODE,
    "http://hl7.org/fhir/consentscope": CONSENT_SCOPE,
}
LOCAL_TZ = ZoneInfo("Europe/Amsterdam")  # dates without a time are Dutch calendar days

Verdict = Literal["deny", "permit", "not-applicable", "unknown"]


class Unparseable(Exception):
    """A Consent field this evaluator cannot interpret (raised without any value)."""


@dataclass(frozen=True)
class ConsentPolicy:
    """What a Consent must say to concern this delivery. Identifier tokens are `system|value`."""

    purposes: frozenset[tuple[str, str]] = frozenset({(ACT_REASON, "HQUALIMP"), (ACT_REASON, "HRESCH")})
    not_applicable_scopes: frozenset[str] = frozenset({"treatment", "adr"})
    registry_actors: Mapping[str, frozenset[str]] = field(default_factory=dict)  # registry → refs/tokens
    registry_policies: Mapping[str, frozenset[str]] = field(default_factory=dict)  # registry → policy URIs

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> ConsentPolicy:
        """From configuration (YAML/TOML), e.g. `optout_policy` in tests/badinput/cases.yaml:
        `purposes: ["system|code", ...]`, `not_applicable_scopes: [...]`,
        `registry_actors: {registry: ["system|value" or "Organization/x", ...]}`,
        `registry_policies: {registry: [policy URI, ...]}`. Omitted keys keep the defaults."""
        unknown = set(spec) - {"purposes", "not_applicable_scopes", "registry_actors", "registry_policies"}
        if unknown:
            raise ValueError(f"unknown opt-out policy keys: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        if "purposes" in spec:
            pairs = [str(p).split("|", 1) for p in spec["purposes"]]
            if any(len(pair) != 2 or not all(pair) for pair in pairs):
                raise ValueError("purposes must be 'system|code'")
            kw["purposes"] = frozenset((system, code) for system, code in pairs)
        if "not_applicable_scopes" in spec:
            kw["not_applicable_scopes"] = frozenset(spec["not_applicable_scopes"])
        for key in ("registry_actors", "registry_policies"):
            if key in spec:
                kw[key] = {str(r): frozenset(map(str, values)) for r, values in dict(spec[key]).items()}
        return cls(**kw)


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- one Consent ---------------------------------------------------------------------------------


def evaluate_consent(consent: dict, registry: str, policy: ConsentPolicy, now: datetime) -> Verdict:
    """deny / permit / not-applicable for this registry delivery; unknown when the Consent is unreadable."""
    try:
        return _evaluate(consent, registry, policy, now)
    except Unparseable:
        return "unknown"


def _evaluate(consent: dict, registry: str, policy: ConsentPolicy, now: datetime) -> Verdict:
    if not isinstance(consent, dict) or consent.get("resourceType") != "Consent":
        raise Unparseable
    status = consent.get("status")
    if status not in {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}:
        raise Unparseable
    if status != "active":
        return "not-applicable"
    scopes = _scope_codes(consent.get("scope"))
    if scopes and scopes <= policy.not_applicable_scopes:
        # about care only; a Consent that is also about research or privacy is read (a re-probe's
        # treatment + research objection was taken for a care directive and its patient delivered)
        return "not-applicable"
    names_registry = bool(_policy_uris(consent) & policy.registry_policies.get(registry, frozenset()))
    context = _Context(policy, registry, now, names_registry)
    provision = consent.get("provision")
    if provision is None:
        return _policy_rule(consent.get("policyRule"))
    if not isinstance(provision, dict):
        raise Unparseable
    return _node(provision, None, context) or "not-applicable"


def _scope_codes(scope: Any) -> set[str]:
    if scope is None:
        return set()
    if not isinstance(scope, dict):
        raise Unparseable
    return {c.get("code") for c in _codings(scope) if _system(c) in (CONSENT_SCOPE, None)}


def _policy_uris(consent: dict) -> set[str]:
    found = consent.get("policy") or []
    if not isinstance(found, list):
        raise Unparseable
    return {p["uri"] for p in found if isinstance(p, dict) and isinstance(p.get("uri"), str)}


def _policy_rule(rule: Any) -> Verdict:
    codes = {c.get("code") for c in _codings(rule) if _system(c) in (ACT_CODE, None)} if rule else set()
    if codes & {"OPTOUT", "OPTOUTE"}:
        return "deny"
    if codes & {"OPTIN", "OPTINR"}:
        return "permit"
    raise Unparseable


@dataclass(frozen=True)
class _Context:
    policy: ConsentPolicy
    registry: str
    now: datetime
    consent_names_registry: bool


def _node(node: Any, inherited: str | None, ctx: _Context) -> Verdict | None:
    """The verdict of a provision node that applies, refined by its applicable exceptions; None if it does not
    apply. A node without a type inherits its parent's rule."""
    if not isinstance(node, dict):
        raise Unparseable
    rule = node.get("type", inherited)
    if rule is not None and rule not in PROVISION_TYPES:
        raise Unparseable
    children = node.get("provision") or []
    if not isinstance(children, list):
        raise Unparseable
    if not _applies(node, rule, ctx):
        return _nested_deny(children, rule, ctx)
    exceptions = [v for v in (_node(child, rule, ctx) for child in children) if v is not None]
    if "deny" in exceptions:
        return "deny"
    if exceptions:
        return exceptions[0]
    return rule  # type: ignore[return-value]  # None here: a typeless node with no applicable exception


def _nested_deny(children: list, rule: str | None, ctx: _Context) -> Verdict | None:
    """Under a node that does not apply, only an objection counts: a deny of this delivery nested in a
    permit for care (TREAT) or for one purpose only is the patient's objection all the same (a probe's such
    patients were delivered). Its permits do not let data go."""
    return "deny" if any(_node(child, rule, ctx) == "deny" for child in children) else None


def _applies(node: dict, rule: str | None, ctx: _Context) -> bool:
    if not _period_covers(node.get("period"), ctx.now):
        return False
    if not _purpose_matches(node.get("purpose"), rule, ctx.policy):
        return False
    return _actor_matches(node.get("actor"), rule, ctx)


def _purpose_matches(purposes: Any, rule: str | None, policy: ConsentPolicy) -> bool:
    if purposes is None:
        return True
    if not isinstance(purposes, list) or not all(isinstance(p, dict) for p in purposes):
        raise Unparseable
    named = {(_system(p), p.get("code")) for p in purposes}
    if rule != "permit" and any(code is None for _, code in named):
        raise Unparseable  # a purpose by display or system alone may be this one (a probe's was delivered)
    if rule == "permit":
        # A purpose without a system (sloppy, but seen in exports) counts as the delivery purpose with that
        # code; an exception that lets data go must cover every delivery purpose.
        named |= {(system, code) for system, code in policy.purposes if (None, code) in named}
        return policy.purposes <= named
    # A deny names a delivery purpose by its code, in any case, under whatever system: a spelling not known
    # here (probes delivered objectors whose purpose was under the OID of v3-ActReason, or `hqualimp`) must
    # not let data go.
    if {code.upper() for _, code in named if isinstance(code, str)} & {c.upper() for _, c in policy.purposes}:
        return True
    known = {ACT_REASON, None} | {system for system, _ in policy.purposes}
    if any(system not in known for system, _ in named):
        raise Unparseable  # a purpose in a code system not known here may be this one: cannot tell
    return False


def _system(coding: dict[str, Any]) -> Any:
    system = coding.get("system")
    return SYSTEM_ALIASES.get(system, system) if isinstance(system, str) else system


def _actor_matches(actors: Any, rule: str | None, ctx: _Context) -> bool:
    if actors is None or ctx.consent_names_registry:
        return True
    if not isinstance(actors, list):
        raise Unparseable
    known = ctx.policy.registry_actors.get(ctx.registry)
    if known is None:
        # nothing to tell this registry's actors from another party's by: a deny may be this registry's (a
        # session's known limit delivered such objectors); a permit is not taken to be
        if rule == "permit":
            return False
        raise Unparseable
    for actor in actors:
        reference = actor.get("reference") if isinstance(actor, dict) else None
        if not isinstance(reference, dict):
            raise Unparseable
        if reference.get("reference") in known:
            return True
        ident = reference.get("identifier")
        if isinstance(ident, dict) and f"{ident.get('system')}|{ident.get('value')}" in known:
            return True
        if not isinstance(reference.get("reference"), str) and not isinstance(ident, dict):
            raise Unparseable  # a display alone ("alle kwaliteitsregistraties") may name this registry
    return False


def _codings(concept: Any) -> list[dict]:
    if not isinstance(concept, dict):
        raise Unparseable
    codings = concept.get("coding") or []
    if not isinstance(codings, list) or not all(isinstance(c, dict) for c in codings):
        raise Unparseable
    return codings


# --- periods -------------------------------------------------------------------------------------


def _period_covers(period: Any, now: datetime) -> bool:
    if period is None:
        return True
    if not isinstance(period, dict):
        raise Unparseable
    start, end = period.get("start"), period.get("end")
    if start is not None and _instant(start, latest=False) > now:
        return False
    return not (end is not None and _instant(end, latest=True) < now)


def _instant(value: Any, *, latest: bool) -> datetime:
    """A FHIR date/dateTime as the first (or last) instant it can mean."""
    if not isinstance(value, str):
        raise Unparseable
    try:
        if "T" in value:
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is None:
                raise Unparseable
            return parsed
        parts = [int(p) for p in value.split("-")]
        if len(parts) == 1 and len(value) == 4:
            first, last = date(parts[0], 1, 1), date(parts[0], 12, 31)
        elif len(parts) == 2:
            first = date(parts[0], parts[1], 1)
            last = (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
        elif len(parts) == 3:
            first = last = date(parts[0], parts[1], parts[2])
        else:
            raise Unparseable
    except ValueError:
        raise Unparseable from None
    day = last if latest else first
    moment = datetime.combine(day, datetime.max.time() if latest else datetime.min.time(), LOCAL_TZ)
    return moment


# --- which patient -------------------------------------------------------------------------------


def consent_patient_matches(consent: dict, patient: PatientRef) -> bool | None:
    """Whether `Consent.patient` is this patient; None when the Consent names no patient at all."""
    subject = consent.get("patient")
    if subject is None:
        return None
    if not isinstance(subject, dict):
        return False
    reference = subject.get("reference")
    if isinstance(reference, str):
        return _reference_matches(reference, patient)
    ident = subject.get("identifier")
    if isinstance(ident, dict):
        idents = _patient_identifiers(patient.resource)
        if ident.get("system") is None:  # a value without its system names whoever has that value
            return any(v == ident.get("value") for _, v in idents)
        return (ident.get("system"), ident.get("value")) in idents
    return None


def _reference_matches(reference: str, patient: PatientRef) -> bool:
    if reference == patient.key:
        return True
    if reference.startswith("Patient?"):
        tokens = [v for k, v in parse_qsl(reference[len("Patient?") :]) if k == "identifier"]
        idents = _patient_identifiers(patient.resource)
        return any(_token_matches(token, idents) for token in tokens)
    tail = _patient_tail(reference)
    return tail is not None and tail in _patient_tails(patient)


def _patient_tail(reference: str) -> str | None:
    parts = reference.split("/_history/", 1)[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return f"Patient/{parts[-1]}"
    return None


def _patient_tails(patient: PatientRef) -> set[str]:
    tails = set()
    if isinstance(patient.resource.get("id"), str):
        tails.add(f"Patient/{patient.resource['id']}")
    key_tail = _patient_tail(patient.key)
    if key_tail:
        tails.add(key_tail)
    return tails


def _patient_identifiers(resource: dict) -> set[tuple[Any, Any]]:
    found = resource.get("identifier") or []
    return {(i.get("system"), i.get("value")) for i in found if isinstance(i, dict)}


def _token_matches(token: str, idents: set[tuple[Any, Any]]) -> bool:
    system, sep, value = token.rpartition("|")
    if not sep:
        return any(v == value for _, v in idents)
    return (system or None, value) in idents


# --- per patient ---------------------------------------------------------------------------------


def decide(verdicts: Iterable[Verdict]) -> Decision:
    """Several Consents about one patient: deny > unknown > permit > not-applicable > none."""
    seen = set(verdicts)
    if "deny" in seen:
        return Decision("objected", Reason.CONSENT_DENY)
    if "unknown" in seen:
        return Decision("unknown", Reason.CONSENT_UNPARSEABLE)
    if "permit" in seen:
        return Decision("allowed", Reason.CONSENT_PERMIT)
    if seen:
        return Decision("allowed", Reason.CONSENT_NOT_APPLICABLE)
    return Decision("allowed", Reason.NO_CONSENT)


def decide_for_patients(
    consents: Sequence[dict], patients: Sequence[PatientRef], policy: ConsentPolicy, now: datetime
) -> dict[str, Decision]:
    result: dict[str, Decision] = {}
    for patient in patients:
        verdicts: list[Verdict] = []
        orphan_blocks = False
        for consent in consents:
            match = consent_patient_matches(consent, patient)
            if match is False:
                continue
            verdict = evaluate_consent(consent, patient.registry, policy, now)
            if match is None:
                # Nobody can tell whose Consent this is: harmless if it permits, blocking if it might deny.
                orphan_blocks = orphan_blocks or verdict in ("deny", "unknown")
                continue
            verdicts.append(verdict)
        decision = decide(verdicts)
        if orphan_blocks and decision.status == "allowed":
            decision = Decision("unknown", Reason.CONSENT_WITHOUT_PATIENT)
        result[patient.key] = decision
    return result


class BundleConsentOptOut:
    """Opt-out source over the Consent resources posted in the same Bundle (build one per Bundle)."""

    def __init__(
        self,
        consents: Iterable[dict] = (),
        *,
        policy: ConsentPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.consents = [c for c in consents if isinstance(c, dict) and c.get("resourceType") == "Consent"]
        self.policy = policy or ConsentPolicy()
        self.clock = clock

    @classmethod
    def from_bundle(cls, bundle: dict, **kw: Any) -> BundleConsentOptOut:
        entries = bundle.get("entry") or []
        return cls((e.get("resource") for e in entries if isinstance(e, dict)), **kw)

    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        return decide_for_patients(self.consents, patients, self.policy, self.clock())
