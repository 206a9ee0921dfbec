"""Evaluate FHIR R4 Consent resources for one question: may this patient's data go to this registry?

Rules (domain spec §6, decided here where the spec leaves it open):

- Only `status = active` Consents count; draft/proposed/rejected/inactive/entered-in-error are ignored.
  A missing or unknown status is unparseable → unknown.
- `scope` treatment or adr only (e.g. zib TreatmentDirective2, advance directives) is about care, not data
  use (but see below). `research` and `patient-privacy` (and any scope this gateway does not know: fail
  closed) are evaluated, also beside treatment or adr.
- Provisions are a tree: the node's `type` is the rule, nested provisions are exceptions to it (R4); a root
  without a type has the rule of `policyRule` (OPTOUT/OPTOUTE deny, OPTIN/OPTINR permit), and with neither
  the Consent says nothing readable: unparseable. Under an opt-out `policyRule`, a root permit is an
  exception outside of which the opt-out holds. A deny that applies counts wherever it is nested, also under
  a node that does not apply. A node applies when its own `period` covers now (absent = always; one that
  ends before it starts is unparseable), its `purpose` is absent or names one of the delivery's purposes
  (default v3-ActReason HQUALIMP, HRESCH; a purpose coding without a system matches by code; an empty list
  is unparseable), and its `actor` is absent or names the registry (configured per registry, by reference or
  identifier, the URA also as its OID and a reference also as an absolute URL; a `Consent.policy.uri`
  configured for the registry counts as naming it for a deny). A deny naming an actor that may be the
  registry under a name not configured (an Organization in the Bundle or contained, an identifier without
  its system), or where nothing is configured for the registry, cannot be placed: unparseable (a permit's
  does not apply). The most specific applicable node decides; when applicable siblings disagree, deny wins
  ("objections supersede consents").
- Conservative on purpose: a *deny* applies if it names any delivery purpose (by its code, under whatever
  system, or a broader v3 purpose: HOPERAT for HQUALIMP, PurposeOfUse for both), and cannot be read when it
  names a purpose in a code system not known here (the OID and pre-R4 URLs of the HL7 v3 systems are known
  spellings); a *permit* exception only if it names all of them itself. A deny restricted by `data`,
  `class`, `code`, `dataPeriod`, `securityLabel` or `action` (a partial objection) counts as a deny of
  everything, and a permit so restricted lets nothing go, since the gateway cannot deliver parts of a record
  reliably. A `modifierExtension` anywhere in a Consent makes it unparseable.
- A Consent about care only (`scope` treatment or adr; other codings of the scope are its translations)
  counts only for a deny in it (its type, or an opt-out `policyRule`'s) that names a delivery purpose; a
  scope with no consentscope coding is one not known here. Codes are compared upper-cased and without
  invisible characters; an empty `actor` list, or a `policyRule` not read here where no provision
  applies, is unparseable.
- No provision: `policyRule` OPTOUT/OPTOUTE (v3-ActCode) is a deny, OPTIN/OPTINR a permit, anything else
  (also an opt-in beside a code in another system) is unparseable.
- Per patient: any applicable deny → objected; else any unparseable Consent → unknown; else any permit →
  allowed; no Consent about the patient → allowed with reason `no-consent` (other sources decide: see
  `CombinedOptOut`). A Consent whose patient cannot be determined and that would deny (or cannot be read)
  makes every patient of the Bundle unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import orjson

from gateway.optout.base import Decision, PatientRef, Reason, visible

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
    if b'"modifierExtension"' in orjson.dumps(consent):
        raise Unparseable  # it changes what the Consent means, in a way not known here
    status = consent.get("status")
    if status not in {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}:
        raise Unparseable
    if status != "active":
        return "not-applicable"
    names_registry = bool(_policy_uris(consent) & policy.registry_policies.get(registry, frozenset()))
    context = _Context(policy, registry, now, names_registry)
    provision = consent.get("provision")
    if provision is not None and not isinstance(provision, dict):
        raise Unparseable
    rule = consent.get("policyRule")
    base = _policy_base(rule)
    scopes = _scope_codes(consent.get("scope"))
    if scopes and scopes <= policy.not_applicable_scopes:
        # about care only; a Consent that is also about research or privacy is read (a re-probe's
        # treatment + research objection was taken for a care directive and its patient delivered). An
        # objection in it that names a delivery purpose is the patient's all the same (a probe's).
        return _named_objection(provision, context, base) if provision is not None else "not-applicable"
    if provision is None:
        return _policy_rule(rule)
    # R4: the provisions are exceptions to the base policy (`policyRule`), and a root without a type has its
    # rule. A root permit under an opt-out is an exception, outside of which the opt-out holds (a probe's
    # OPTOUT "except for treatment" was not applicable, and delivered); a root deny (or a typeless root) says
    # when and for what the opt-out holds (an objection that ended is over).
    verdict = _node(provision, base, context)
    if verdict is not None:
        return verdict
    if base == "deny" and provision.get("type") == "permit":
        return "deny"
    if base is None and (rule or provision.get("type") is None):
        # no rule anywhere, or a policyRule not read here that may be an opt-out outside of the provision
        raise Unparseable
    return "not-applicable"


def _scope_codes(scope: Any) -> set[str]:
    """The scope's codes in the consentscope system; the other codings of the concept are its translations
    (a resuscitation directive's SNOMED coding). A scope with none of those is one not known here: read,
    not skipped."""
    if scope is None:
        return set()
    if not isinstance(scope, dict):
        raise Unparseable
    codings = _codings(scope)
    known = {c.get("code") for c in codings if _system(c) in (CONSENT_SCOPE, None)}
    return known or ({"(other)"} if codings else set())


def _policy_uris(consent: dict) -> set[str]:
    found = consent.get("policy") or []
    if not isinstance(found, list):
        raise Unparseable
    return {p["uri"] for p in found if isinstance(p, dict) and isinstance(p.get("uri"), str)}


def _policy_rule(rule: Any) -> Verdict:
    base = _policy_base(rule)
    if base is None:
        raise Unparseable
    return base  # type: ignore[return-value]


def _policy_base(rule: Any) -> str | None:
    """deny (OPTOUT, OPTOUTE) or permit (OPTIN, OPTINR), or None: absent or not known here. An opt-out wins
    over an opt-in, and a code in another system may be either (a probe's OPTINR beside an unread OPTOUT was
    a permit): unknown."""
    if not rule:
        return None
    codings = _codings(rule)
    codes = {_code(c) for c in codings if _system(c) in (ACT_CODE, None)}
    if codes & {"OPTOUT", "OPTOUTE"}:
        return "deny"
    if any(_system(c) not in (ACT_CODE, None) for c in codings):
        return None
    return "permit" if codes & {"OPTIN", "OPTINR"} else None


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


def _named_objection(node: Any, ctx: _Context, inherited: str | None = None) -> Verdict:
    """In a Consent about care only: a deny anywhere in it (its type, or the opt-out policyRule's) that
    applies and names a delivery purpose ("no quality registries" in a treatment directive); a deny without
    a purpose is about care. A purpose that cannot be read is unparseable, as elsewhere."""
    if not isinstance(node, dict):
        raise Unparseable
    rule = node.get("type", inherited)
    purposes = node.get("purpose")
    named = rule != "permit" and purposes is not None and _purpose_matches(purposes, rule, ctx.policy)
    if named and _applies(node, rule, ctx):
        if rule is None:
            raise Unparseable  # a delivery purpose with no rule read (a policyRule not known here, or none)
        return "deny"
    children = node.get("provision") or []
    if not isinstance(children, list):
        raise Unparseable
    if any(_named_objection(child, ctx, rule) == "deny" for child in children):
        return "deny"
    return "not-applicable"


def _nested_deny(children: list, rule: str | None, ctx: _Context) -> Verdict | None:
    """Under a node that does not apply, only an objection counts: a deny of this delivery nested in a
    permit for care (TREAT) or for one purpose only is the patient's objection all the same (a probe's such
    patients were delivered). Its permits do not let data go."""
    return "deny" if any(_node(child, rule, ctx) == "deny" for child in children) else None


# A provision restricted to part of the record: the gateway cannot deliver a part, so such a deny is a deny of
# everything, and such a permit lets nothing go (a probe's permit for Conditions delivered the whole record)
_PARTIAL = ("data", "class", "code", "dataPeriod", "securityLabel", "action")


def _applies(node: dict, rule: str | None, ctx: _Context) -> bool:
    if rule == "permit" and any(node.get(key) is not None for key in _PARTIAL):
        return False
    if not _period_covers(node.get("period"), ctx.now):
        return False
    if not _purpose_matches(node.get("purpose"), rule, ctx.policy):
        return False
    return _actor_matches(node.get("actor"), rule, ctx)


def _purpose_matches(purposes: Any, rule: str | None, policy: ConsentPolicy) -> bool:
    if purposes is None:
        return True
    if not isinstance(purposes, list) or not purposes or not all(isinstance(p, dict) for p in purposes):
        raise Unparseable  # an empty list says neither "any purpose" nor which (a probe's deny was skipped)
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
    if {visible(code).upper() for _, code in named if isinstance(code, str)} & _deny_codes(policy):
        return True
    known = {ACT_REASON, None} | {system for system, _ in policy.purposes}
    if any(system not in known for system, _ in named):
        raise Unparseable  # a purpose in a code system not known here may be this one: cannot tell
    return False


# The v3 PurposeOfUse concepts the delivery purposes specialise: a deny of healthcare operations (HOPERAT)
# is one of quality improvement (HQUALIMP), a deny of every purpose of use one of both (a probe's were not
# applicable). Permits are not widened: one must name the delivery purposes themselves.
_BROADER = {"HQUALIMP": frozenset({"HOPERAT", "PURPOSEOFUSE"}), "HRESCH": frozenset({"PURPOSEOFUSE"})}


def _deny_codes(policy: ConsentPolicy) -> frozenset[str]:
    """The codes, upper-cased, by which a deny names a delivery purpose: its own or a broader one's."""
    codes = {code.upper() for _, code in policy.purposes}
    return frozenset(codes.union(*(_BROADER.get(code, frozenset()) for code in codes)))


def _code(coding: dict[str, Any]) -> Any:
    """A coding's code as compared here: upper-cased, without invisible characters (a probe's `optout` and
    `HQUALIMP` with a zero-width space were not read)."""
    code = coding.get("code")
    return visible(code).upper() if isinstance(code, str) else code


def _system(coding: dict[str, Any]) -> Any:
    system = coding.get("system")
    return SYSTEM_ALIASES.get(system, system) if isinstance(system, str) else system


def _actor_matches(actors: Any, rule: str | None, ctx: _Context) -> bool:
    if actors is None or (ctx.consent_names_registry and rule != "permit"):
        return True  # a permit's actors are read even then: a probe's permit for the GP let data go here
    if not isinstance(actors, list) or not actors:
        raise Unparseable  # an empty list names nobody, and says neither "anyone" nor who (a probe's)
    known = ctx.policy.registry_actors.get(ctx.registry)
    if not known:
        # nothing to tell this registry's actors from another party's by: a deny may be this registry's (a
        # session's known limit delivered such objectors); a permit is not taken to be
        if rule == "permit":
            return False
        raise Unparseable
    undecided = False
    tokens = {_token(*entry.rpartition("|")[::2]) for entry in known if "|" in entry}
    for actor in actors:
        reference = actor.get("reference") if isinstance(actor, dict) else None
        if not isinstance(reference, dict):
            raise Unparseable
        place = _actor_place(reference, known, tokens)
        if place:
            return True
        undecided = undecided or place is None
    if undecided and rule != "permit":
        # an actor that may be this registry under another name (its URA as an OID, an Organization in the
        # Bundle or contained, an absolute URL): a probe's such objectors were delivered
        raise Unparseable
    return False


def _actor_place(reference: dict, known: frozenset[str], tokens: set[str]) -> bool | None:
    """True: the actor is this registry; False: surely another party (another number in the naming system the
    registry is configured by); None: cannot be told. Systems are compared as one spelling (the URA's URL or
    OID, in the configuration too: ``tokens`` are ``known``'s identifiers so written) and values without
    invisible characters and surrounding spaces."""
    ident = reference.get("identifier")
    system = value = None
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        system, value = _naming_system(ident.get("system")), visible(ident["value"])
        if isinstance(system, str) and _token(system, value) in tokens:
            return True
    target = reference.get("reference")
    if isinstance(target, str):
        tail = "/".join(target.split("/_history/", 1)[0].rstrip("/").split("/")[-2:])
        if target in known or tail in known:
            return True
    if isinstance(system, str) and system in {t.partition("|")[0] for t in tokens}:
        return False
    if isinstance(target, str) and tail.partition("/")[0] in _PEOPLE_AND_THINGS:
        return False  # a person or a device is no registry (a re-probe's deny for a Practitioner withheld)
    if not isinstance(target, str) and not isinstance(ident, dict):
        raise Unparseable  # a display alone ("alle kwaliteitsregistraties") may name this registry
    return None


_PEOPLE_AND_THINGS = frozenset({"Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device"})


def _token(system: str, value: str) -> str:
    return f"{_naming_system(system)}|{visible(value)}"


# The Dutch naming systems of organisations, also written as their OIDs
_NAMING_ALIASES = {
    "urn:oid:2.16.528.1.1007.3.3": "http://fhir.nl/fhir/NamingSystem/ura",
    "urn:oid:2.16.840.1.113883.2.4.6.1": "http://fhir.nl/fhir/NamingSystem/agb-z",
}


def _naming_system(system: Any) -> Any:
    return _NAMING_ALIASES.get(system, system) if isinstance(system, str) else system


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
    first = _instant(start, latest=False) if start is not None else None
    last = _instant(end, latest=True) if end is not None else None
    if first is not None and last is not None and first > last:
        raise Unparseable  # ends before it starts: which was meant cannot be told (a probe's was skipped)
    if first is not None and first > now:
        return False
    return not (last is not None and last < now)


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
    elsewhere = {id(c) for c in consents if _names_no_patient_here(c, patients)}
    for patient in patients:
        verdicts: list[Verdict] = []
        orphan_blocks = False
        for consent in consents:
            match = None if id(consent) in elsewhere else consent_patient_matches(consent, patient)
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


def _names_no_patient_here(consent: dict, patients: Sequence[PatientRef]) -> bool:
    """A Consent whose `patient` is no Patient reference (a Group, a RelatedPerson, a contained resource) and
    that is none of these patients': whose it is cannot be told, so it counts for all of them as one without
    a patient (a probe's objection on `Group/g1` was ignored, and its patients delivered)."""
    subject = consent.get("patient")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(reference, str) or reference.startswith("Patient?") or _patient_tail(reference):
        return False
    return not any(consent_patient_matches(consent, patient) for patient in patients)


def _bundle_consents(bundle: dict) -> Iterator[Any]:
    """The Consents of a Bundle: its entries', those of a Bundle in an entry (a re-probe's was dropped as a
    type not delivered, its objector delivered), and those contained in an entry (a probe's contained deny
    was never read), a contained one's `#` (its container) read as the container's fullUrl."""
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        yield resource
        if resource.get("resourceType") == "Bundle":
            yield from _bundle_consents(resource)
        contained = resource.get("contained")
        for inner in contained if isinstance(contained, list) else ():
            if not isinstance(inner, dict) or inner.get("resourceType") != "Consent":
                continue
            subject = inner.get("patient")
            container = _reference_to(entry, resource)
            if isinstance(subject, dict) and subject.get("reference") == "#" and container is not None:
                inner = {**inner, "patient": {**subject, "reference": container}}
            yield inner


def _reference_to(entry: dict, resource: dict) -> str | None:
    """How to name an entry's resource: its fullUrl, else `Type/id` (a bulk export's lines have no fullUrl:
    a re-probe's contained Consent there withheld every patient of the group)."""
    if isinstance(entry.get("fullUrl"), str):
        return entry["fullUrl"]
    rtype, rid = resource.get("resourceType"), resource.get("id")
    return f"{rtype}/{rid}" if isinstance(rtype, str) and isinstance(rid, str) else None


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
        return cls(_bundle_consents(bundle), **kw)

    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        return decide_for_patients(self.consents, patients, self.policy, self.clock())
