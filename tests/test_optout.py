"""Opt-out sources: register (HMAC digests), Consents in the Bundle, Consent search on a stub EHR, combining.

The EHR is a small FastAPI *stub* (fake EHR) served by real uvicorn on loopback (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response

from gateway.optout import (
    BearerToken,
    BundleConsentOptOut,
    CombinedOptOut,
    ConsentPolicy,
    Decision,
    EhrConsentSearch,
    InMemoryObjectionRegister,
    ObjectionCsvError,
    PatientRef,
    Reason,
    RegisterOptOut,
    combine,
    evaluate_consent,
    objection_digest,
    patient_refs,
    read_objection_csv,
)
from gateway.pipeline.validate import PatientEntry, SchemaValidator
from tests.servers import free_port, serve

SCHEMA = Path("/work/shared/fhir-r4/fhir.schema.json")
KEY = hashlib.sha256(b"test objection key (not a real key)").digest()
PROVIDER, REGISTRY = "ura:00001234", "dica"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
REGISTRY_URA = "http://fhir.nl/fhir/NamingSystem/ura|00009999"
POLICY = ConsentPolicy(registry_actors={REGISTRY: frozenset({REGISTRY_URA})})
NOW = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


def run(coro):
    return asyncio.run(coro)


def patient_ref(pid: str = "pat-1", mrn: str | None = "MRN-7734421", key: str | None = None) -> PatientRef:
    resource = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [
            {
                "system": "http://fhir.nl/fhir/NamingSystem/bsn",
                "value": "999911120" if pid == "pat-1" else f"bsn-of-{pid}",
            }
        ],
    }
    return PatientRef(key or f"urn:uuid:{pid}", resource, mrn, PROVIDER, REGISTRY)


# --- realistic R4 Consents -------------------------------------------------------------------------


def research_objection(patient: str = "urn:uuid:pat-1") -> dict:
    """A patient's objection against reuse of data for quality registries and research, as a hospital EHR
    could record it (scope research, deny, purposes HQUALIMP + HRESCH, open-ended period)."""
    return {
        "resourceType": "Consent",
        "id": "bezwaar-1",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "research"}]},
        "category": [
            {"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}
        ],
        "patient": {"reference": patient},
        "dateTime": "2025-03-01T10:15:00+01:00",
        "organization": [
            {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00001234"}}
        ],
        "sourceAttachment": {"contentType": "application/pdf", "title": "Bezwaarformulier"},
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]
        },
        "provision": {
            "type": "deny",
            "period": {"start": "2025-03-01"},
            "purpose": [
                {"system": ACT_REASON, "code": "HQUALIMP", "display": "health quality improvement"},
                {"system": ACT_REASON, "code": "HRESCH", "display": "healthcare research"},
            ],
        },
    }


def privacy_consent_with_registry_exception(patient: str = "urn:uuid:pat-1") -> dict:
    """Deny all secondary use, except delivery to the named registry (nested permit, actor = registry)."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "64292-6"}]}],
        "patient": {"reference": patient},
        "provision": {
            "type": "deny",
            "provision": [
                {
                    "type": "permit",
                    "actor": [
                        {
                            "role": {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP",
                                    }
                                ]
                            },
                            "reference": {
                                "identifier": {
                                    "system": "http://fhir.nl/fhir/NamingSystem/ura",
                                    "value": "00009999",
                                }
                            },
                        }
                    ],
                }
            ],
        },
    }


def treatment_directive(patient: str = "urn:uuid:pat-1") -> dict:
    """zib TreatmentDirective2-style: do not resuscitate. About care, not data use."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "treatment"}]},
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "11341000146107"}]}],
        "patient": {"reference": patient},
        "provision": {
            "type": "deny",
            "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "89666000"}]}],
        },
    }


def withdrawn_objection(patient: str = "urn:uuid:pat-1") -> dict:
    return {**research_objection(patient), "status": "inactive"}


def expired_objection(patient: str = "urn:uuid:pat-1") -> dict:
    consent = research_objection(patient)
    consent["provision"] = {**consent["provision"], "period": {"start": "2020-01-01", "end": "2025-12-31"}}
    return consent


ALL_CONSENTS = [
    research_objection,
    privacy_consent_with_registry_exception,
    treatment_directive,
    withdrawn_objection,
    expired_objection,
]


def test_example_consents_are_valid_r4() -> None:
    validator = SchemaValidator.from_file(SCHEMA)
    for make in ALL_CONSENTS:
        assert validator.validate_resource(make()) == [], make.__name__


@pytest.mark.parametrize(
    ("make", "verdict"),
    [
        (research_objection, "deny"),
        (privacy_consent_with_registry_exception, "permit"),
        (treatment_directive, "not-applicable"),
        (withdrawn_objection, "not-applicable"),
        (expired_objection, "not-applicable"),
    ],
)
def test_evaluate_realistic_consents(make, verdict: str) -> None:
    assert evaluate_consent(make(), REGISTRY, POLICY, NOW) == verdict


def test_registry_exception_is_registry_specific() -> None:
    assert evaluate_consent(privacy_consent_with_registry_exception(), "nkr", POLICY, NOW) == "deny"


def test_a_deny_naming_an_actor_that_cannot_be_placed_is_unknown() -> None:
    """A session's known limit: a deny whose actor is an organisation's identifier was taken for another
    party, and its patient delivered, whenever the registry had no `registry_actors` to compare with. Without
    them it cannot be told whether the actor is this registry: unknown (withheld). With them, an actor not
    listed is another party."""
    consent = research_objection()
    other = {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00005555"}}
    consent["provision"]["actor"] = [{"role": {"coding": [{"code": "IRCP"}]}, "reference": other}]
    assert evaluate_consent(consent, "nkr", POLICY, NOW) == "unknown"  # no actors configured for nkr
    assert evaluate_consent(consent, REGISTRY, POLICY, NOW) == "not-applicable"  # not dica's URA
    system, value = REGISTRY_URA.split("|")
    consent["provision"]["actor"][0]["reference"] = {"identifier": {"system": system, "value": value}}
    assert evaluate_consent(consent, REGISTRY, POLICY, NOW) == "deny"


def _nested(root: dict, child: dict) -> dict:
    return {"provision": {**root, "provision": [child]}}


TREAT = [{"system": ACT_REASON, "code": "TREAT"}]
HQUALIMP = [{"system": ACT_REASON, "code": "HQUALIMP"}]


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        # a probe: a deny of this delivery nested in a permit that does not apply was never looked at, and
        # the objecting patient was delivered
        (_nested({"type": "permit", "purpose": TREAT}, {"type": "deny", "purpose": HQUALIMP}), "deny"),
        (_nested({"type": "permit", "purpose": HQUALIMP}, {"type": "deny", "purpose": HQUALIMP}), "deny"),
        (_nested({"type": "permit", "purpose": HQUALIMP}, {"type": "deny"}), "deny"),
        (_nested({"type": "permit", "purpose": TREAT}, {"type": "deny", "class": [{"code": "x"}]}), "deny"),
        (_nested({"type": "permit", "purpose": TREAT}, {"type": "deny", "purpose": TREAT}), "not-applicable"),
        (
            _nested({"type": "deny", "purpose": TREAT}, {"type": "permit", "purpose": HQUALIMP}),
            "not-applicable",
        ),
        (_nested({"type": "permit", "purpose": TREAT}, {"type": "deny", "purpose": "HQUALIMP"}), "unknown"),
        # two levels down, and a typeless node that inherits a deny it does not apply under
        (
            _nested(
                {"type": "permit", "purpose": TREAT}, {"purpose": TREAT, "provision": [{"type": "deny"}]}
            ),
            "deny",
        ),
        (_nested({"type": "deny", "purpose": TREAT}, {"purpose": HQUALIMP}), "deny"),
    ],
)
def test_a_nested_objection_counts_under_a_provision_that_does_not_apply(change: dict, verdict: str) -> None:
    consent = {**research_objection(), **change}
    consent.pop("policyRule")  # the provisions alone (the base policy: see the next test)
    assert evaluate_consent(consent, REGISTRY, POLICY, NOW) == verdict


OPTOUT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]}
BOTH = [*HQUALIMP, {"system": ACT_REASON, "code": "HRESCH"}]
GP = {"reference": {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00005555"}}}


def _actor(reference: dict) -> dict:
    return {
        "provision": {
            "type": "deny",
            "actor": [{"role": {"coding": [{"code": "IRCP"}]}, "reference": reference}],
        }
    }


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        # the base policy: an opt-out "except for treatment" holds for this delivery; an ended objection ends
        ({"policyRule": OPTOUT, "provision": {"type": "permit", "purpose": TREAT}}, "deny"),
        ({"policyRule": OPTOUT, "provision": {}}, "deny"),
        ({"policyRule": OPTOUT, "provision": {"period": {"start": "2025-01-01"}}}, "deny"),
        ({"policyRule": OPTOUT, "provision": {"type": "permit", "purpose": BOTH}}, "permit"),
        (
            {"policyRule": OPTOUT, "provision": {"type": "deny", "period": {"end": "2025-01-01"}}},
            "not-applicable",
        ),
        # a root without a type and no base policy: no rule at all
        ({"policyRule": None, "provision": {"purpose": HQUALIMP}}, "unknown"),
        # an opt-out in a code system not known here beside an opt-in
        (
            {
                "provision": None,
                "policyRule": {
                    "coding": [{"system": ACT_CODE, "code": "OPTINR"}, {"system": "urn:x", "code": "OPTOUT"}]
                },
            },
            "unknown",
        ),
        # a permit for part of the record lets nothing go; a modifier extension anywhere is not understood
        (
            _nested({"type": "deny"}, {"type": "permit", "purpose": BOTH, "class": [{"code": "Condition"}]}),
            "deny",
        ),
        (_nested({"type": "deny"}, {"type": "permit", "purpose": BOTH, "action": [{"text": "x"}]}), "deny"),
        ({"modifierExtension": [{"url": "urn:x", "valueBoolean": True}]}, "unknown"),
        # a deny of a broader purpose (healthcare operations, any purpose of use); a permit is not widened
        ({"provision": {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HOPERAT"}]}}, "deny"),
        (
            {"provision": {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "PurposeOfUse"}]}},
            "deny",
        ),
        (
            _nested(
                {"type": "deny"},
                {"type": "permit", "purpose": [{"system": ACT_REASON, "code": "PurposeOfUse"}]},
            ),
            "deny",
        ),
        # a treatment scope beside one not known here is read; an objection to this purpose in a care one
        (
            {
                "scope": {
                    "coding": [
                        {"system": SCOPE, "code": "treatment"},
                        {"system": "urn:x", "code": "registers"},
                    ]
                }
            },
            "deny",
        ),
        ({"scope": {"coding": [{"system": SCOPE, "code": "treatment"}]}}, "deny"),
        (
            {
                "scope": {"coding": [{"system": SCOPE, "code": "treatment"}]},
                "provision": {"type": "deny", "purpose": TREAT},
            },
            "not-applicable",
        ),
        # an empty purpose list, a period that ends before it starts
        ({"provision": {"type": "deny", "purpose": []}}, "unknown"),
        ({"provision": {"type": "deny", "period": {"start": "2030-01-01", "end": "2020-01-01"}}}, "unknown"),
        # the registry's actor under another name, or one that cannot be told from it
        (_actor({"identifier": {"system": "urn:oid:2.16.528.1.1007.3.3", "value": "00009999"}}), "deny"),
        (_actor({"identifier": {"value": "00009999"}}), "unknown"),
        (_actor({"reference": "#reg"}), "unknown"),
        (_actor({"reference": "urn:uuid:6b4e2bb6-1f9d-4b4e-9d36-9c1b1d1f0c01"}), "unknown"),
        (_actor({"reference": "Organization/another"}), "unknown"),
        (_actor(GP["reference"]), "not-applicable"),  # another number of the same naming system
    ],
)
def test_a_probe_of_the_consent_rules(change: dict, verdict: str) -> None:
    """A second opt-out probe: each of these was not applicable (or a permit), and its patient delivered."""
    consent = research_objection()
    consent.pop("policyRule")
    for key, value in change.items():
        if value is None:
            consent.pop(key, None)
        else:
            consent[key] = value
    assert evaluate_consent(consent, REGISTRY, POLICY, NOW) == verdict


def test_the_registry_named_by_reference_and_policy_uri_and_actors_configured_empty() -> None:
    policy = ConsentPolicy(
        registry_actors={REGISTRY: frozenset({"Organization/reg"}), "nkr": frozenset()},
        registry_policies={REGISTRY: frozenset({"urn:registry-policy"})},
    )
    consent = {**research_objection(), **_actor({"reference": "https://ehr.example/fhir/Organization/reg"})}
    assert evaluate_consent(consent, REGISTRY, policy, NOW) == "deny"  # an absolute URL of the registry
    assert evaluate_consent(consent, "nkr", policy, NOW) == "unknown"  # nothing to compare with
    # a policy URI naming the registry makes a deny's actors this registry, not a permit's (the GP's)
    gp_permit = _nested({"type": "deny"}, {"type": "permit", "purpose": BOTH, "actor": [GP]})
    consent = {**research_objection(), **gp_permit, "policy": [{"uri": "urn:registry-policy"}]}
    assert evaluate_consent(consent, REGISTRY, policy, NOW) == "deny"


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        ({"status": None}, "unknown"),
        ({"status": "onbekend"}, "unknown"),
        ({"provision": {"type": "deny", "period": {"start": "gisteren"}}}, "unknown"),
        ({"provision": {"type": "weigeren"}}, "unknown"),
        ({"provision": {"type": "deny", "purpose": "HQUALIMP"}}, "unknown"),
        ({"provision": {"type": "deny", "actor": [{"role": {}}]}}, "unknown"),
        # a re-probe: a deny in lower case, and one of a Consent about care and research, were delivered
        ({"provision": {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "hqualimp"}]}}, "deny"),
        (
            {"scope": {"coding": [{"system": CONSENT_SCOPE, "code": c} for c in ("treatment", "research")]}},
            "deny",
        ),
        # a re-probe: a deny whose purpose has no code (a display, a system alone) let the objector through
        ({"provision": {"type": "deny", "purpose": [{"display": "kwaliteitsregistratie"}]}}, "unknown"),
        ({"provision": {"type": "deny", "purpose": [{"system": ACT_REASON}]}}, "unknown"),
        # a probe: an actor given by display alone was taken for another party, and the objector delivered
        (
            {"provision": {"type": "deny", "actor": [{"role": {}, "reference": {"display": "alle"}}]}},
            "unknown",
        ),
        ({"provision": None, "policyRule": None}, "unknown"),
        ({"provision": {"type": "deny", "period": {"end": "2026-11-24T06:59:59+01:00"}}}, "deny"),
        ({"provision": {"type": "deny", "period": {"end": "2026-11-24T06:59:58+01:00"}}}, "not-applicable"),
        ({"provision": {"type": "deny", "period": {"end": "2026-11-24"}}}, "deny"),
        ({"provision": {"type": "deny", "period": {"start": "2026-11-25"}}}, "not-applicable"),
        ({"provision": {"type": "deny", "period": {"start": "2026-11"}}}, "deny"),
        ({"provision": {"type": "deny", "purpose": [{"code": "HQUALIMP"}]}}, "deny"),
        ({"provision": {"type": "deny", "purpose": [{"code": "HMARKT"}]}}, "not-applicable"),
        # a probe: an objection under another spelling of v3-ActReason was not applicable, and delivered.
        # A deny names a delivery purpose by its code under any system; one in an unknown system is unread.
        (
            {"provision": {"type": "deny", "purpose": [{"system": "urn:local", "code": "HQUALIMP"}]}},
            "deny",
        ),
        (
            {
                "provision": {
                    "type": "deny",
                    "purpose": [{"system": "urn:oid:2.16.840.1.113883.5.8", "code": "HQUALIMP"}],
                }
            },
            "deny",
        ),
        (
            {
                "provision": {
                    "type": "deny",
                    "purpose": [{"system": "http://hl7.org/fhir/v3/ActReason", "code": "HRESCH"}],
                }
            },
            "deny",
        ),
        ({"provision": {"type": "deny", "purpose": [{"system": "urn:local", "code": "KWAL"}]}}, "unknown"),
        (
            {"provision": {"type": "deny", "purpose": [{"system": ACT_REASON, "code": "HMARKT"}]}},
            "not-applicable",
        ),
        (
            {
                "provision": None,
                "policyRule": {"coding": [{"system": "urn:oid:2.16.840.1.113883.5.4", "code": "OPTOUT"}]},
            },
            "deny",
        ),
    ],
)
def test_evaluate_edge_cases(change: dict, verdict: str) -> None:
    consent = research_objection()
    for key, value in change.items():
        if value is None:
            consent.pop(key, None)
        else:
            consent[key] = value
    now = datetime(2026, 11, 24, 5, 59, 59, tzinfo=UTC)  # 06:59:59 in Amsterdam
    assert evaluate_consent(consent, REGISTRY, POLICY, now) == verdict


# --- BundleConsentOptOut ---------------------------------------------------------------------------


def consent_bundle(*consents: dict) -> dict:
    entries = [
        {"fullUrl": "urn:uuid:pat-1", "resource": patient_ref().resource},
        {"fullUrl": "urn:uuid:pat-2", "resource": patient_ref("pat-2").resource},
    ]
    entries += [{"fullUrl": f"urn:uuid:c{i}", "resource": c} for i, c in enumerate(consents)]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def bundle_decisions(*consents: dict) -> dict[str, Decision]:
    source = BundleConsentOptOut.from_bundle(consent_bundle(*consents), policy=POLICY, clock=lambda: NOW)
    return run(source.check([patient_ref(), patient_ref("pat-2")]))


def test_bundle_consents_per_patient() -> None:
    decisions = bundle_decisions(research_objection("urn:uuid:pat-2"), treatment_directive("urn:uuid:pat-1"))
    assert decisions == {
        "urn:uuid:pat-1": Decision("allowed", Reason.CONSENT_NOT_APPLICABLE),
        "urn:uuid:pat-2": Decision("objected", Reason.CONSENT_DENY),
    }


def test_a_consent_about_a_group_or_contained_in_the_patient_is_read() -> None:
    """A probe: an objection whose `patient` is `Group/g1` (or a RelatedPerson) was nobody's, and ignored;
    one contained in the Patient (`patient: #`) was never read."""
    decisions = bundle_decisions(research_objection("Group/g1"))
    assert {d.status for d in decisions.values()} == {"unknown"}  # whose it is cannot be told
    care = bundle_decisions(treatment_directive("RelatedPerson/r1"))  # about care: blocks nobody
    assert {d.status for d in care.values()} == {"allowed"}
    bundle = consent_bundle()
    second = bundle["entry"][1]
    second["resource"] = {**second["resource"], "contained": [research_objection("#")]}
    source = BundleConsentOptOut.from_bundle(bundle, policy=POLICY, clock=lambda: NOW)
    decisions = run(source.check([patient_ref(), patient_ref("pat-2")]))
    assert decisions["urn:uuid:pat-2"] == Decision("objected", Reason.CONSENT_DENY)
    assert decisions["urn:uuid:pat-1"].status == "allowed"


def test_bundle_without_consents_allows() -> None:
    assert {d.reason for d in bundle_decisions().values()} == {Reason.NO_CONSENT}
    assert run(BundleConsentOptOut().check([patient_ref()])) == {
        "urn:uuid:pat-1": Decision("allowed", Reason.NO_CONSENT)
    }


def test_objection_beats_permit_and_unparseable() -> None:
    unreadable = {**research_objection(), "provision": {"type": "deny", "period": {"start": "morgen"}}}
    assert (
        bundle_decisions(privacy_consent_with_registry_exception(), research_objection())[
            "urn:uuid:pat-1"
        ].status
        == "objected"
    )
    assert bundle_decisions(unreadable)["urn:uuid:pat-1"] == Decision("unknown", Reason.CONSENT_UNPARSEABLE)
    assert bundle_decisions(unreadable, research_objection())["urn:uuid:pat-1"].status == "objected"


def test_patient_matching_forms() -> None:
    for ref in [
        "urn:uuid:pat-1",
        "Patient/pat-1",
        "https://ehr.example.nl/fhir/Patient/pat-1/_history/3",
        "Patient?identifier=http://fhir.nl/fhir/NamingSystem/bsn|999911120",
    ]:
        decisions = bundle_decisions(research_objection(ref))
        assert (decisions["urn:uuid:pat-1"].status, decisions["urn:uuid:pat-2"].status) == (
            "objected",
            "allowed",
        )
    logical = research_objection()
    logical["patient"] = {
        "identifier": {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "999911120"}
    }
    assert bundle_decisions(logical)["urn:uuid:pat-1"].status == "objected"
    # the value without its system (a fresh-eyes probe: it matched nobody, and the objector was delivered)
    logical["patient"] = {"identifier": {"value": "999911120"}}
    decisions = bundle_decisions(logical)
    assert (decisions["urn:uuid:pat-1"].status, decisions["urn:uuid:pat-2"].status) == ("objected", "allowed")


def test_consent_without_patient_blocks_everyone_only_if_it_could_deny() -> None:
    orphan = research_objection()
    del orphan["patient"]
    assert {d.reason for d in bundle_decisions(orphan).values()} == {Reason.CONSENT_WITHOUT_PATIENT}
    orphan_permit = privacy_consent_with_registry_exception()
    del orphan_permit["patient"]
    assert {d.status for d in bundle_decisions(orphan_permit).values()} == {"allowed"}


# --- register --------------------------------------------------------------------------------------


def test_digest_is_stable() -> None:
    digest = objection_digest(KEY, PROVIDER, "MRN-7734421")
    assert digest == hmac.new(KEY, b"ura:00001234|MRN-7734421", hashlib.sha256).hexdigest()
    assert digest == "80dc0c87668ef3276d7e57bb1ec1bcb204372ed05c942446cef45324620e79e7"
    assert objection_digest(KEY, PROVIDER, "  MRN-7734421\n") == digest
    assert objection_digest(KEY, "ura:00005555", "MRN-7734421") != digest
    assert objection_digest(KEY[::-1], PROVIDER, "MRN-7734421") != digest


def test_digest_pinned_vector() -> None:
    """Pinned: a change of the message layout would orphan every stored objection."""
    expected = "2479f8d1e247626720944bd1b8388dfa713307aedc955467e033bcf6947df7dd"
    assert objection_digest(bytes(range(32)), "ura:1", "123") == expected


@pytest.mark.parametrize(
    ("key", "provider", "number"),
    [(b"short", PROVIDER, "1"), (KEY, "a|b", "1"), (KEY, "", "1"), (KEY, PROVIDER, "  ")],
)
def test_digest_rejects_bad_input_without_echo(key: bytes, provider: str, number: str) -> None:
    with pytest.raises(ValueError) as err:
        objection_digest(key, provider, number)
    assert "MRN" not in str(err.value)


def test_register_source() -> None:
    store = InMemoryObjectionRegister()
    store.add(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, "MRN-1"))
    store.add(PROVIDER, "*", objection_digest(KEY, PROVIDER, "MRN-ALL"))
    store.add(PROVIDER, "nkr", objection_digest(KEY, PROVIDER, "MRN-NKR"))
    source = RegisterOptOut(store, KEY)
    patients = [
        patient_ref("a", "MRN-1"),
        patient_ref("b", "MRN-2"),
        patient_ref("c", "MRN-ALL"),
        patient_ref("d", "MRN-NKR"),
        patient_ref("e", None),
    ]
    assert {k: (d.status, d.reason) for k, d in run(source.check(patients)).items()} == {
        "urn:uuid:a": ("objected", Reason.REGISTER_OBJECTION),
        "urn:uuid:b": ("allowed", Reason.REGISTER_NO_OBJECTION),
        "urn:uuid:c": ("objected", Reason.REGISTER_OBJECTION),
        "urn:uuid:d": ("allowed", Reason.REGISTER_NO_OBJECTION),
        "urn:uuid:e": ("unknown", Reason.NO_PATIENT_NUMBER),
    }
    assert all("MRN" not in repr(d) for d in store.objections)  # digests only
    # an objection under a second number in the provider's system holds (a probe: only the first was asked)
    renumbered = {
        "identifier": [{"system": "urn:mrn", "value": "MRN-NEW"}, {"system": "urn:mrn", "value": "MRN-1"}]
    }
    refs = patient_refs(
        [PatientEntry(0, "urn:uuid:r", renumbered)],
        provider=PROVIDER,
        registry=REGISTRY,
        mrn_system="urn:mrn",
    )
    assert run(source.check(refs))["urn:uuid:r"].status == "objected"
    store.withdraw(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, "MRN-1"))
    assert run(source.check(patients[:1]))["urn:uuid:a"].status == "allowed"


def test_register_fails_closed() -> None:
    store = InMemoryObjectionRegister(available=False)
    assert run(RegisterOptOut(store, KEY).check([patient_ref()]))["urn:uuid:pat-1"] == Decision(
        "unknown", Reason.REGISTER_UNAVAILABLE
    )

    async def broken(provider: str, registry: str, digest_hex: str) -> bool | None:
        raise ConnectionError("database at 10.0.0.1 said MRN-7734421")

    decision = run(RegisterOptOut(broken, KEY).check([patient_ref()]))["urn:uuid:pat-1"]
    assert decision == Decision("unknown", Reason.REGISTER_UNAVAILABLE)


def test_register_with_the_sqlite_store(tmp_path: Path) -> None:
    store_module = pytest.importorskip("gateway.store")
    store = store_module.open_store(f"sqlite:///{tmp_path / 'store.db'}")
    assert store.add_objection(PROVIDER, REGISTRY, bytes.fromhex(objection_digest(KEY, PROVIDER, "MRN-1")))
    source = RegisterOptOut(store.objection_lookup, KEY)
    decisions = run(source.check([patient_ref("a", "MRN-1"), patient_ref("b", "MRN-2")]))
    assert (decisions["urn:uuid:a"].status, decisions["urn:uuid:b"].status) == ("objected", "allowed")


@pytest.mark.postgres
def test_a_dropped_store_connection_is_asked_again_before_the_register_counts_as_down(pg_url: str) -> None:
    """A chaos probe: one connection the database dropped (a restart, a proxy's idle timeout) made the
    register "cannot answer", and failed a whole bulk job; the pool had already replaced it."""
    import psycopg

    from gateway.store import open_store

    store = open_store(pg_url + "&application_name=register-drop-test")
    assert store.add_objection(PROVIDER, REGISTRY, bytes.fromhex(objection_digest(KEY, PROVIDER, "MRN-1")))
    source = RegisterOptOut(store.objection_lookup, KEY)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'register-drop-test'"
        )
    decisions = run(source.check([patient_ref("a", "MRN-1")]))
    assert decisions["urn:uuid:a"].status == "objected"
    store.close()


# --- CSV import ------------------------------------------------------------------------------------


def test_read_objection_csv(tmp_path: Path) -> None:
    path = tmp_path / "bezwaren.csv"
    path.write_bytes(
        "\ufeffPatientnummer;datum;opmerking\n# export 2026-11\n\n 123456 ;2026-01-01;x\n"
        'AB-77/3;2026-02-01;"met ; puntkomma"\r\n'.encode()
    )
    assert list(read_objection_csv(path)) == ["123456", "AB-77/3"]
    path.write_text("patient_number\n1\n2\n")
    assert list(read_objection_csv(path)) == ["1", "2"]


def test_read_objection_csv_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "bezwaren.csv"
    path.write_text("patient_number,date\n1,2026\nJansen Piet,2026\n,2026\n3\n4,2026\n" + "x" * 70 + ",1\n")
    errors: list[ObjectionCsvError] = []
    assert list(read_objection_csv(path, on_error=errors.append)) == ["1", "4"]
    assert [(e.line_no, e.problem.split(" ")[0]) for e in errors] == [
        (3, "patient"),
        (4, "empty"),
        (5, "expected"),
        (7, "patient"),
    ]
    assert all("Jansen" not in str(e) for e in errors)
    with pytest.raises(ObjectionCsvError) as err:
        list(read_objection_csv(path))
    assert err.value.line_no == 3 and "Jansen" not in str(err.value)


def test_read_objection_csv_header(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("mrn,date\n1,2\n")
    with pytest.raises(ObjectionCsvError):
        list(read_objection_csv(path))
    path.write_text("")
    with pytest.raises(ObjectionCsvError):
        list(read_objection_csv(path))


# --- combining -------------------------------------------------------------------------------------


ALLOW, OBJECT, UNK = Decision("allowed", "a"), Decision("objected", "o"), Decision("unknown", "u")


@pytest.mark.parametrize(
    ("decisions", "expected"),
    [
        ([ALLOW, ALLOW], ALLOW),
        ([ALLOW, OBJECT], OBJECT),
        ([UNK, OBJECT], OBJECT),
        ([ALLOW, UNK], UNK),
        ([UNK, ALLOW, OBJECT], OBJECT),
        ([ALLOW], ALLOW),
        ([], None),
    ],
)
def test_combine(decisions: list[Decision], expected: Decision | None) -> None:
    result = combine(decisions)
    assert result == expected if expected else result.status == "unknown"


class Fixed:
    def __init__(self, answer: dict[str, Decision] | Exception) -> None:
        self.answer = answer

    async def check(self, patients):
        if isinstance(self.answer, Exception):
            raise self.answer
        return dict(self.answer)


def test_combined_sources() -> None:
    patients = [patient_ref("a"), patient_ref("b"), patient_ref("c")]
    first = Fixed({"urn:uuid:a": ALLOW, "urn:uuid:b": ALLOW, "urn:uuid:c": ALLOW})
    second = Fixed({"urn:uuid:a": OBJECT, "urn:uuid:b": UNK})  # says nothing about c
    result = run(CombinedOptOut([first, second]).check(patients))
    assert result == {
        "urn:uuid:a": OBJECT,
        "urn:uuid:b": UNK,
        "urn:uuid:c": Decision("unknown", Reason.SOURCE_NO_ANSWER),
    }
    failing = run(CombinedOptOut([first, Fixed(RuntimeError("MRN-7734421"))]).check(patients))
    assert {d.reason for d in failing.values()} == {Reason.SOURCE_FAILED}
    with pytest.raises(ValueError):
        CombinedOptOut([])


def test_combined_register_and_bundle() -> None:
    store = InMemoryObjectionRegister()
    store.add(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, "MRN-2"))
    sources = [
        RegisterOptOut(store, KEY),
        BundleConsentOptOut.from_bundle(consent_bundle(research_objection()), policy=POLICY),
    ]
    patients = [patient_ref("pat-1", "MRN-1"), patient_ref("pat-2", "MRN-2")]
    result = run(CombinedOptOut(sources).check(patients))
    assert result["urn:uuid:pat-1"] == Decision("objected", Reason.CONSENT_DENY)
    assert result["urn:uuid:pat-2"] == Decision("objected", Reason.REGISTER_OBJECTION)


# --- EHR Consent search against a stub EHR ---------------------------------------------------------


TOKEN = "stub-ehr-token"


class StubEhr:
    """A fake EHR FHIR endpoint: per patient id a canned answer; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.base = ""
        self.app = FastAPI()
        self.app.get("/fhir/Consent")(self.consent_search)

    async def consent_search(self, request: Request) -> Response:
        params = list(request.query_params.multi_items())
        with self.lock:
            self.requests.append({"params": params, "auth": request.headers.get("authorization")})
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return Response(status_code=401)
        pid = dict(params).get("patient", "").removeprefix("Patient/")
        page = dict(params).get("page")
        return self.answer(pid, page)

    def answer(self, pid: str, page: str | None) -> Response:
        ref = f"Patient/{pid}"
        if pid == "p-500":
            return Response(status_code=500)
        if pid == "p-slow":
            time.sleep(1.5)
            return fhir(searchset([]))
        if pid == "p-garbage":
            return Response(b"<html>login</html>", media_type="text/html")
        if pid == "p-patient":
            return fhir({"resourceType": "Patient", "id": pid})
        if pid == "p-outcome":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "too-costly"}],
            }
            return fhir(searchset([], extra=[{"resource": outcome, "search": {"mode": "outcome"}}]))
        if pid == "p-total-text":  # a re-probe: a count as a string
            return fhir({**searchset([]), "total": "3"})
        if pid == "p-next-case":  # a re-probe: a next link as "Next", to the page with the objection
            if page is None:
                first = searchset([], next_url=f"{self.base}/fhir/Consent?patient=Patient/{pid}&page=2")
                first["link"][0]["relation"] = "Next"
                return fhir(first)
            return fhir(searchset([research_objection(ref)]))
        if pid == "p-short":  # a probe: three matches said, none sent, no next link
            return fhir({**searchset([]), "total": 3})
        if pid == "p-truncated":  # a probe: "results truncated" as a warning
            issue = {"severity": "warning", "code": "too-costly"}
            outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
            return fhir(searchset([], extra=[{"resource": outcome, "search": {"mode": "outcome"}}]))
        if pid == "p-other":
            return fhir(searchset([research_objection("Patient/someone-else")]))
        if pid == "p-paged":
            if page is None:
                return fhir(
                    searchset(
                        [treatment_directive(ref)],
                        next_url=f"{self.base}/fhir/Consent?patient=Patient/{pid}&page=2",
                    )
                )
            return fhir(searchset([research_objection(ref)]))
        if pid == "p-foreign-next":
            return fhir(searchset([], next_url="http://evil.example.org/fhir/Consent?page=2"))
        if pid == "p-endless":
            return fhir(searchset([], next_url=f"{self.base}/fhir/Consent?patient=Patient/{pid}&page=n"))
        if pid.startswith("p-deny"):
            return fhir(searchset([research_objection(ref), treatment_directive(ref)]))
        if pid.startswith("p-permit"):
            return fhir(searchset([privacy_consent_with_registry_exception(ref)]))
        return fhir(searchset([]))


def searchset(consents: list[dict], next_url: str | None = None, extra: list | None = None) -> dict:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(consents),
        "entry": [{"resource": c, "search": {"mode": "match"}} for c in consents] + (extra or []),
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def fhir(body: dict) -> Response:
    return Response(json.dumps(body).encode(), media_type="application/fhir+json")


@pytest.fixture(scope="module")
def stub_ehr() -> Iterator[StubEhr]:
    stub = StubEhr()
    with serve(stub.app, probe="/fhir/Consent") as base:
        stub.base = base
        yield stub


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ehr_check(stub: StubEhr, refs: list[PatientRef], **kw: Any) -> dict[str, Decision]:
    async def go() -> dict[str, Decision]:
        kw.setdefault("auth", BearerToken(TOKEN))
        async with EhrConsentSearch(
            f"{stub.base}/fhir", policy=POLICY, timeout=kw.pop("timeout", 1.0), **kw
        ) as ehr:
            return await ehr.check(refs)

    return run(go())


def ref(pid: str) -> PatientRef:
    return patient_ref(pid, key=f"urn:uuid:{pid}")


def test_ehr_decisions(stub_ehr: StubEhr) -> None:
    result = ehr_check(stub_ehr, [ref("p-deny-1"), ref("p-permit-1"), ref("p-none")])
    assert result == {
        "urn:uuid:p-deny-1": Decision("objected", Reason.CONSENT_DENY),
        "urn:uuid:p-permit-1": Decision("allowed", Reason.CONSENT_PERMIT),
        "urn:uuid:p-none": Decision("allowed", Reason.NO_CONSENT),
    }


def test_ehr_query_shape(stub_ehr: StubEhr) -> None:
    stub_ehr.requests.clear()
    ehr_check(stub_ehr, [ref("p-none")], scopes=["research", "patient-privacy"])
    (request,) = stub_ehr.requests
    assert request["params"] == [
        ("patient", "Patient/p-none"),
        ("status", "active"),
        ("scope", "research"),
        ("scope", "patient-privacy"),
    ]
    assert request["auth"] == f"Bearer {TOKEN}"


def test_ehr_patient_id_from_full_url(stub_ehr: StubEhr) -> None:
    no_id = PatientRef(
        "https://ehr.example.nl/fhir/Patient/p-deny-2", {"resourceType": "Patient"}, None, PROVIDER, REGISTRY
    )
    urn_only = PatientRef("urn:uuid:x", {"resourceType": "Patient"}, None, PROVIDER, REGISTRY)
    result = ehr_check(stub_ehr, [no_id, urn_only])
    assert result[no_id.key].status == "objected"
    assert result[urn_only.key] == Decision("unknown", Reason.EHR_NO_PATIENT_ID)


def test_ehr_follows_pages_on_the_same_origin(stub_ehr: StubEhr) -> None:
    assert ehr_check(stub_ehr, [ref("p-paged")])["urn:uuid:p-paged"].status == "objected"


@pytest.mark.parametrize(
    ("pid", "reason"),
    [
        ("p-500", Reason.EHR_BAD_STATUS),
        ("p-garbage", Reason.EHR_BAD_RESPONSE),
        ("p-patient", Reason.EHR_BAD_RESPONSE),
        ("p-outcome", Reason.EHR_BAD_RESPONSE),
        ("p-other", Reason.EHR_OTHER_PATIENT),
        ("p-foreign-next", Reason.EHR_INCOMPLETE),
        ("p-endless", Reason.EHR_INCOMPLETE),
        ("p-short", Reason.EHR_INCOMPLETE),
        ("p-total-text", Reason.EHR_BAD_RESPONSE),
        ("p-truncated", Reason.EHR_BAD_RESPONSE),
        ("p-slow", Reason.EHR_UNAVAILABLE),  # last: the stub sleeps on after the client gave up
    ],
)
def test_ehr_fails_closed(stub_ehr: StubEhr, pid: str, reason: str) -> None:
    assert ehr_check(stub_ehr, [ref(pid)], timeout=0.5)[f"urn:uuid:{pid}"] == Decision("unknown", reason)


def test_ehr_without_credentials_is_unknown(stub_ehr: StubEhr) -> None:
    result = ehr_check(stub_ehr, [ref("p-deny-3")], auth=None)
    assert result["urn:uuid:p-deny-3"] == Decision("unknown", Reason.EHR_BAD_STATUS)


def test_ehr_unreachable_is_unknown() -> None:
    async def go() -> Decision:
        async with EhrConsentSearch(f"http://127.0.0.1:{free_port()}/fhir", timeout=1.0) as ehr:
            return (await ehr.check([ref("p-deny-4")]))["urn:uuid:p-deny-4"]

    assert run(go()) == Decision("unknown", Reason.EHR_UNAVAILABLE)


def test_ehr_cache_ttl(stub_ehr: StubEhr) -> None:
    clock = FakeClock()

    async def go() -> list[int]:
        counts = []
        async with EhrConsentSearch(
            f"{stub_ehr.base}/fhir", auth=BearerToken(TOKEN), policy=POLICY, cache_ttl=30, clock=clock
        ) as ehr:
            for advance in (0, 10, 19.9, 0.2, 5):
                clock.now += advance
                stub_ehr.requests.clear()
                decision = (await ehr.check([ref("p-deny-5")]))["urn:uuid:p-deny-5"]
                assert decision.status == "objected"
                counts.append(len(stub_ehr.requests))
        return counts

    assert run(go()) == [1, 0, 0, 1, 0]  # cached until 30 s after the first answer, then asked again


def test_ehr_failures_are_not_cached(stub_ehr: StubEhr) -> None:
    async def go() -> int:
        stub_ehr.requests.clear()
        async with EhrConsentSearch(f"{stub_ehr.base}/fhir", auth=BearerToken(TOKEN), cache_ttl=300) as ehr:
            for _ in range(3):
                assert (await ehr.check([ref("p-500")]))["urn:uuid:p-500"].status == "unknown"
        return len(stub_ehr.requests)

    assert run(go()) == 3


def test_ehr_follows_a_next_link_in_any_case(stub_ehr: StubEhr) -> None:
    decisions = ehr_check(stub_ehr, [ref("p-next-case")])
    assert decisions["urn:uuid:p-next-case"].status == "objected"


def test_ehr_cache_is_per_registry(stub_ehr: StubEhr) -> None:
    async def go() -> int:
        stub_ehr.requests.clear()
        async with EhrConsentSearch(f"{stub_ehr.base}/fhir", auth=BearerToken(TOKEN), cache_ttl=300) as ehr:
            await ehr.check([ref("p-deny-6")])
            other = PatientRef("urn:uuid:p-deny-6", ref("p-deny-6").resource, None, PROVIDER, "nkr")
            await ehr.check([other])
            await ehr.check([ref("p-deny-6")])
            # another hospital's record of the same id is another patient (a probe: it got this one's answer)
            record = ref("p-deny-6").resource
            elsewhere = PatientRef("urn:uuid:p-deny-6", record, None, "ura:99999999", REGISTRY)
            await ehr.check([elsewhere])
        return len(stub_ehr.requests)

    assert run(go()) == 3


def test_ehr_uses_a_given_client_without_closing_it(stub_ehr: StubEhr) -> None:
    async def go() -> bool:
        async with httpx.AsyncClient(auth=BearerToken(TOKEN)) as client:
            async with EhrConsentSearch(f"{stub_ehr.base}/fhir", client=client) as ehr:
                await ehr.check([ref("p-none")])
            return client.is_closed

    assert run(go()) is False


# --- from a validated Bundle to the entries to drop ---------------------------------------------------------


def test_patient_refs_and_entries_to_drop() -> None:
    from gateway.optout import entries_to_drop, patient_refs
    from gateway.pipeline.validate import validate_bundle
    from tests.badinput.generate import MRN_SYSTEM, bundle, observation, patient, url

    validator = SchemaValidator.from_file(SCHEMA)
    body = bundle(
        patient(),
        observation(),
        patient(id="pat-2", identifier=[{"system": MRN_SYSTEM, "value": " MRN-2 "}]),
        observation(subject=url(3)),
        observation(subject=url(1), focus=[{"reference": url(3)}]),
        {"resourceType": "Practitioner"},
        research_objection(url(3)),
    )
    index = validate_bundle(body, validator)
    refs = patient_refs(index, provider=PROVIDER, registry=REGISTRY, mrn_system=MRN_SYSTEM)
    assert [(r.key, r.mrn) for r in refs] == [(url(1), "MRN-7734421"), (url(3), "MRN-2")]
    decisions = run(BundleConsentOptOut.from_bundle(body, policy=POLICY).check(refs))
    assert {k: d.status for k, d in decisions.items()} == {url(1): "allowed", url(3): "objected"}
    # Patient 2, its Observation, the Observation about both, and the objection itself (it refers to pat-2).
    assert entries_to_drop(index, decisions) == {2, 3, 4, 6}
    assert entries_to_drop(index, {}) == set(range(7)) - {5}  # no answer = unknown: all but the Practitioner


def test_read_objection_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("patient_number\n1\nMüller\n".encode("latin-1"))
    with pytest.raises(ObjectionCsvError) as err:
        list(read_objection_csv(path))
    assert "UTF-8" in str(err.value) and "M" not in str(err.value).replace("UTF-8", "")
    assert err.value.line_no == 3  # the line of the bad byte (a probe: "line 1" wherever it was)


def test_entries_only_dropped_resources_refer_to_are_dropped_too() -> None:
    from gateway.optout import entries_to_drop, patient_refs
    from gateway.pipeline.validate import validate_bundle
    from tests.badinput.generate import bundle, observation, patient, url

    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": url(1)},
        "content": [{"attachment": {"contentType": "application/pdf", "url": url(3)}}],
    }
    binary = {"resourceType": "Binary", "contentType": "application/pdf", "data": "JVBERi0xLjQK"}
    medication = {"resourceType": "Medication", "code": {"text": "paracetamol"}}
    request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": url(1)},
        "medicationReference": {"reference": url(5)},
    }
    shared = {"resourceType": "Practitioner"}
    body = bundle(
        patient(),  # 0
        document,  # 1
        binary,  # 2: only the DocumentReference refers to it (Attachment.url)
        request,  # 3
        medication,  # 4: only the MedicationRequest refers to it
        shared,  # 5: also used by patient 2's Observation
        patient(id="pat-2"),  # 6
        observation(subject=url(7), performer=[{"reference": url(6)}]),  # 7
        {"resourceType": "Organization"},  # 8: nobody refers to it
        observation(performer=[{"reference": url(6)}]),  # 9: patient 1's, also uses the Practitioner
        urls=[url(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)],
    )
    index = validate_bundle(body, SchemaValidator.from_file(SCHEMA))
    assert index.references[1] == {0, 2}
    refs = patient_refs(index, provider=PROVIDER, registry=REGISTRY)
    objects = {refs[0].key: Decision("objected", Reason.CONSENT_DENY), refs[1].key: Decision("allowed", "x")}
    assert entries_to_drop(index, objects) == {0, 1, 2, 3, 4, 9}


def test_policy_from_mapping() -> None:
    policy = ConsentPolicy.from_mapping(
        {
            "purposes": [f"{ACT_REASON}|HQUALIMP"],
            "registry_actors": {"dica": [REGISTRY_URA]},
            "registry_policies": {"dica": ["https://registry.example.nl/policy"]},
        }
    )
    assert policy.purposes == frozenset({(ACT_REASON, "HQUALIMP")})
    assert policy.registry_actors == {"dica": frozenset({REGISTRY_URA})}
    assert policy.not_applicable_scopes == ConsentPolicy().not_applicable_scopes
    assert ConsentPolicy.from_mapping({}) == ConsentPolicy()
    for bad in ({"purposes": ["HQUALIMP"]}, {"actors": {}}):
        with pytest.raises(ValueError):
            ConsentPolicy.from_mapping(bad)


def test_an_objection_holds_whatever_the_case_of_the_patient_number() -> None:
    """A probe: an objection registered for P0001234 let the record numbered p0001234 through."""
    store = InMemoryObjectionRegister()
    store.add(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, "P0001234"))
    store.add(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, "mrn-lower"))
    source = RegisterOptOut(store, KEY)
    numbers = {"a": "p0001234", "b": "P0001234", "c": "MRN-LOWER", "d": "P0001235"}
    decisions = run(source.check([patient_ref(key, number) for key, number in numbers.items()]))
    assert {k: d.status for k, d in decisions.items()} == {
        "urn:uuid:a": "objected",
        "urn:uuid:b": "objected",
        "urn:uuid:c": "objected",
        "urn:uuid:d": "allowed",
    }


def test_an_objection_holds_for_a_number_with_an_invisible_character() -> None:
    """A probe: a record numbered P0001234 with a zero-width space copied along was delivered past the
    objection registered for P0001234; one registered so is stored without it."""
    from gateway.optout.register import registered_form

    assert registered_form("P0001234\u200b ") == registered_form("\u200dp0001234") == "P0001234"
    store = InMemoryObjectionRegister()
    store.add(PROVIDER, REGISTRY, objection_digest(KEY, PROVIDER, registered_form("P0001234")))
    numbers = {"a": "P0001234\u200b", "b": "p\u00ad0001234", "c": "P0001235\u200b"}
    decisions = run(RegisterOptOut(store, KEY).check([patient_ref(k, n) for k, n in numbers.items()]))
    assert {k: d.status for k, d in decisions.items()} == {
        "urn:uuid:a": "objected",
        "urn:uuid:b": "objected",
        "urn:uuid:c": "allowed",
    }


TREATMENT = {"coding": [{"system": SCOPE, "code": "treatment"}]}
URA = "http://fhir.nl/fhir/NamingSystem/ura"
SNOMED = "http://snomed.info/sct"
ZWSP_HQUALIMP = [{"system": ACT_REASON, "code": "HQUALIMP\u200b"}]


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        # a care directive's objection by its opt-out policyRule
        ({"scope": TREATMENT, "policyRule": OPTOUT, "provision": {"purpose": HQUALIMP}}, "deny"),
        # a policyRule not read here (another system, text only) is no ground for "not applicable"; an
        # opt-out code in lower case is read
        (
            {"policyRule": {"coding": [{"system": "urn:oid:1.2.3", "code": "OPTOUT"}]},
             "provision": {"type": "permit", "purpose": TREAT}},
            "unknown",
        ),
        ({"policyRule": {"text": "Bezwaar"}, "provision": {"type": "permit", "purpose": TREAT}}, "unknown"),
        (
            {"policyRule": {"coding": [{"system": ACT_CODE, "code": "optout"}]},
             "provision": {"type": "permit", "purpose": TREAT}},
            "deny",
        ),
        # the registry's URA with a space or a zero-width space; an empty actor list; a purpose code with one
        (_actor({"identifier": {"system": URA, "value": "00009999 "}}), "deny"),
        (_actor({"identifier": {"system": URA, "value": "0000\u200b9999"}}), "deny"),
        ({"provision": {"type": "deny", "actor": []}}, "unknown"),
        ({"provision": {"type": "deny", "purpose": ZWSP_HQUALIMP}}, "deny"),
        # the registry by reference beside another number
        (
            _actor({"reference": "Organization/reg", "identifier": {"system": URA, "value": "00005555"}}),
            "deny",
        ),
        # a resuscitation directive whose scope carries a SNOMED translation stays about care
        (
            {
                "scope": {"coding": [*TREATMENT["coding"], {"system": SNOMED, "code": "1"}]},
                "provision": {"type": "deny", "code": [{"coding": [{"system": SNOMED, "code": "89666000"}]}]},
            },
            "not-applicable",
        ),
    ],
)
def test_a_re_probe_of_the_consent_rules(change: dict, verdict: str) -> None:
    """A re-probe of the opt-out fixes: each was not applicable (its patient delivered), but the last,
    which was withheld."""
    policy = ConsentPolicy(
        registry_actors={REGISTRY: frozenset({"urn:oid:2.16.528.1.1007.3.3|00009999", "Organization/reg"})}
    )
    consent = research_objection()
    consent.pop("policyRule")
    consent.update(change)
    assert evaluate_consent(consent, REGISTRY, policy, NOW) == verdict


def test_a_consent_in_a_bundle_in_the_bundle_is_read() -> None:
    """A re-probe: a Bundle entry holding the objection was dropped as a type not delivered, and its patient
    delivered."""
    bundle = consent_bundle()
    inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": research_objection()}]}
    bundle["entry"].append({"fullUrl": "urn:uuid:inner", "resource": inner})
    source = BundleConsentOptOut.from_bundle(bundle, policy=POLICY, clock=lambda: NOW)
    decisions = run(source.check([patient_ref(), patient_ref("pat-2")]))
    assert decisions["urn:uuid:pat-1"] == Decision("objected", Reason.CONSENT_DENY)


def test_a_contained_consent_of_an_entry_without_fullurl_is_its_container_s() -> None:
    """A re-probe: in a bulk export's lines (no fullUrl) a Patient's contained Consent (`patient: #`) was
    nobody's, and withheld every patient of the group; it is the Patient's, by `Patient/id`."""
    bundle = consent_bundle()
    second = bundle["entry"][1]
    del second["fullUrl"]
    second["resource"] = {**second["resource"], "contained": [research_objection("#")]}
    source = BundleConsentOptOut.from_bundle(bundle, policy=POLICY, clock=lambda: NOW)
    decisions = run(source.check([patient_ref(), patient_ref("pat-2", key="Patient/pat-2")]))
    assert decisions["Patient/pat-2"] == Decision("objected", Reason.CONSENT_DENY)
    assert decisions["urn:uuid:pat-1"].status == "allowed"


def _who(reference: str) -> dict:
    return {"reference": {"reference": reference}}


@pytest.mark.parametrize(
    ("change", "verdict"),
    [
        # a care directive naming a delivery purpose under a policyRule not read here, or none at all
        (
            {
                "scope": TREATMENT,
                "policyRule": {"coding": [{"system": "urn:oid:1.2.3", "code": "OPTOUT"}]},
                "provision": {"purpose": HQUALIMP},
            },
            "unknown",
        ),
        ({"scope": TREATMENT, "policyRule": {"text": "opt"}, "provision": {"purpose": HQUALIMP}}, "unknown"),
        ({"scope": TREATMENT, "provision": {"provision": [{"purpose": HQUALIMP}]}}, "unknown"),
        # a deny for a person is no objection to a registry
        (_nested({"type": "permit"}, {"type": "deny", "actor": [_who("Practitioner/ex")]}), "permit"),
        (_nested({"type": "permit"}, {"type": "deny", "actor": [_who("RelatedPerson/x")]}), "permit"),
    ],
)
def test_a_last_re_probe_of_the_consent_rules(change: dict, verdict: str) -> None:
    """A last re-probe: the first three were not applicable (delivered), the last two withheld."""
    policy = ConsentPolicy(registry_actors={REGISTRY: frozenset({f"{URA}|00009999"})})
    consent = research_objection()
    consent.pop("policyRule")
    consent.update(change)
    assert evaluate_consent(consent, REGISTRY, policy, NOW) == verdict
