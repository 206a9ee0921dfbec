"""Engine behaviour on small hand-made bundles: references, drops, generalisation, report, provenance."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.deid import compile_plan, deidentify, load_rules, scan, sensitive_values
from gateway.deid.profile import profile_from_data, read_yaml
from gateway.deid.rules import rules_from_data
from tests.test_deid_support import KEY_A, PROFILES, PROVENANCE, fake_pseudonyms, plan_for, references

BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"
TEST_BSN = "999911120"  # Nictiz test BSN (passes the 11-proef)


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "pat-123",
        "identifier": [
            {"system": BSN_SYSTEM, "value": TEST_BSN},
            {"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "MRN-778899"},
        ],
        "name": [{"family": "Kuipers", "given": ["Annemarie"]}],
        "gender": "female",
        "birthDate": "1961-08-23",
        "address": [
            {
                "line": ["Kerkstraat 12"],
                "city": "Zwolle",
                "postalCode": "8011 AB",
                "country": "NL",
                "use": "home",
            }
        ],
        **extra,
    }


def bundle(*entries: tuple[str, dict[str, Any]], btype: str = "transaction") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": btype,
        "entry": [{"fullUrl": url, "resource": res} for url, res in entries],
    }


def run(b: dict[str, Any], profile: str = "example-generic", pseudonyms: Any = None) -> Any:
    return deidentify(
        b,
        plan_for(profile),
        id_key=KEY_A,
        pseudonyms=fake_pseudonyms(b) if pseudonyms is None else pseudonyms,
        provenance=PROVENANCE,
    )


def resources(out: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in out["entry"] if e["resource"]["resourceType"] == rtype]


def obs(subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": subject, "display": "Kuipers, Annemarie"},
        **extra,
    }


# ── references ───────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "ref",
    [
        "Patient/pat-123",
        "Patient/pat-123/_history/4",
        "urn:uuid:0f1e2d3c-0000-4000-8000-000000000001",
        f"Patient?identifier={BSN_SYSTEM}|{TEST_BSN}",
        f"Patient?identifier={BSN_SYSTEM}%7C{TEST_BSN}",
        "Patient?identifier=MRN-778899",
    ],
)
def test_every_reference_form_is_rewritten_to_the_patient(ref: str) -> None:
    b = bundle(("urn:uuid:0f1e2d3c-0000-4000-8000-000000000001", patient()), ("urn:uuid:o1", obs(ref)))
    out = run(b).bundle
    (pat,) = resources(out, "Patient")
    (o,) = resources(out, "Observation")
    assert o["subject"] == {"reference": "urn:uuid:" + pat["id"]}  # display removed
    assert TEST_BSN not in orjson.dumps(out).decode()
    assert "pat-123" not in orjson.dumps(out).decode()


def test_an_absolute_reference_names_an_entry_by_its_full_url_only() -> None:
    """A probe: `http://other.org/fhir/Observation/o2` (another server's, as validation warns) was rewritten
    to this Bundle's Observation o2, by its Type/id. An entry's own absolute fullUrl still resolves."""
    local = obs("urn:uuid:p") | {"id": "o2"}
    elsewhere = obs("urn:uuid:p", hasMember=[{"reference": "http://other.org/fhir/Observation/o2"}])
    here = obs("urn:uuid:p", hasMember=[{"reference": "http://hospital.example/fhir/Observation/o3"}])
    own = obs("urn:uuid:p") | {"id": "o3"}
    b = bundle(
        ("urn:uuid:p", patient()),
        ("urn:uuid:o2", local),
        ("urn:uuid:o1", elsewhere),
        ("http://hospital.example/fhir/Observation/o3", own),
        ("urn:uuid:o4", here),
    )
    delivered = resources(run(b).bundle, "Observation")
    members = [o.get("hasMember") for o in delivered]
    assert members.count(None) == 3  # the other server's o2 is not this Bundle's: dropped, not linked
    ((member,),) = [m for m in members if m]
    assert member["reference"] == "urn:uuid:" + delivered[2]["id"]  # o3, by its own absolute fullUrl


def test_unresolvable_conditional_reference_is_dropped_never_passed() -> None:
    o = obs(
        "Patient/pat-123",
        performer=[
            {"reference": "Practitioner?identifier=http://x.example/big|123456782"},
            {"reference": f"Patient?identifier={BSN_SYSTEM}|111222333"},
        ],
    )
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))
    result = run(b)
    (out_obs,) = resources(result.bundle, "Observation")
    assert "performer" not in out_obs
    text = orjson.dumps(result.bundle).decode()
    assert "123456782" not in text and "111222333" not in text
    assert result.report.references_dropped == 2


def test_ambiguous_identifier_resolves_to_nothing() -> None:
    p2 = patient(id="pat-456")
    b = bundle(
        ("urn:uuid:a", patient()), ("urn:uuid:b", p2), ("urn:uuid:o", obs("Patient?identifier=MRN-778899"))
    )
    result = run(b)
    # its only link to a patient is gone: whose data it is cannot be known
    assert resources(result.bundle, "Observation") == []
    assert result.report.dropped["not-linked-to-a-patient"] == {"Observation": 1}


def test_contained_resources_and_local_references_are_removed() -> None:
    o = obs(
        "Patient/pat-123",
        contained=[{"resourceType": "Practitioner", "id": "c1", "name": [{"family": "Dokter"}]}],
        performer=[{"reference": "#c1"}],
    )
    out = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))).bundle
    (out_obs,) = resources(out, "Observation")
    assert "contained" not in out_obs and "performer" not in out_obs
    assert "Dokter" not in orjson.dumps(out).decode()


def test_reference_to_a_resource_outside_the_bundle_is_dropped_and_required_loss_drops_resource() -> None:
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/elsewhere"}, "code": {"text": "x"}}
    result = run(bundle(("urn:uuid:c", cond), ("urn:uuid:o", obs("Patient/elsewhere"))))
    assert resources(result.bundle, "Condition") == []  # Condition.subject is required (1..1)
    assert result.report.dropped["required-element-lost"] == {"Condition": 1}
    # Observation.subject is 0..1: valid without it, but then it leads to no patient
    assert resources(result.bundle, "Observation") == []
    assert result.report.dropped["not-linked-to-a-patient"] == {"Observation": 1}


# ── what leaves is valid R4: an element that loses a required part goes whole ─────────────────────────────

def test_a_backbone_that_loses_a_required_element_is_left_out_and_counted() -> None:
    """Free text is dropped, so a component coded only as text has no `code` (1..1) left: it goes."""
    diastolic = {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}
    components = [
        {"code": {"text": "systolisch"}, "valueQuantity": {"value": 120}},
        {"code": diastolic, "valueQuantity": {"value": 80}},
    ]
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", obs("urn:uuid:p", component=components))))
    [delivered] = resources(result.bundle, "Observation")
    assert [c["valueQuantity"]["value"] for c in delivered["component"]] == [80]
    assert result.report.elements_removed["Observation.component.(required-element-lost)"] == 1


def test_a_required_choice_element_lost_drops_the_resource() -> None:
    """`MedicationStatement.medication[x]` (1..1) as free text only: the JSON Schema's `required` cannot
    name a choice element, the engine knows it from `R4Types.required_choices`."""
    statement = {
        "resourceType": "MedicationStatement",
        "status": "active",
        "medicationCodeableConcept": {"text": "Ventolin"},
        "subject": {"reference": "urn:uuid:p"},
    }
    snomed = {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}
    coded = statement | {"medicationCodeableConcept": snomed}
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:m1", statement), ("urn:uuid:m2", coded)))
    delivered = resources(result.bundle, "MedicationStatement")
    assert [r["medicationCodeableConcept"] for r in delivered] == [snomed]
    assert result.report.dropped["required-element-lost"] == {"MedicationStatement": 1}


def test_pruning_a_reference_to_a_dropped_resource_keeps_its_parent_valid() -> None:
    """A Condition dropped during the walk (its subject is outside the Bundle) takes `Encounter.diagnosis`
    (whose `condition` is 1..1) with it, not just the reference; the Encounter needs nothing more."""
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/elsewhere"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
    }
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": "urn:uuid:p"},
        "diagnosis": [{"condition": {"reference": "urn:uuid:c"}, "rank": 1}],
    }
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:c", condition), ("urn:uuid:e", encounter)))
    [delivered] = resources(result.bundle, "Encounter")
    assert "diagnosis" not in delivered and delivered["status"] == "finished"
    assert result.report.dropped["required-element-lost"] == {"Condition": 1}


def _outside_plan(**references: str):  # noqa: ANN202 - a Plan
    raw = read_yaml(PROFILES / "example-generic.yaml")
    raw["references"] = {"unresolved": "drop", **references}
    return compile_plan(profile_from_data(raw), load_rules())


def test_references_outside_the_bundle_get_the_opaque_id_of_their_target_when_the_profile_asks() -> None:
    plan = _outside_plan(outside_bundle="opaque-id")
    earlier = bundle(
        ("urn:uuid:p", patient()),
        (
            "urn:uuid:e",
            {
                "resourceType": "Encounter",
                "id": "enc-7",
                "status": "finished",
                "class": {"code": "IMP"},
                "subject": {"reference": "Patient/pat-123"},
            },
        ),
    )
    first = deidentify(
        earlier, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(earlier), provenance=PROVENANCE
    )
    (encounter,) = resources(first.bundle, "Encounter")
    refs = {
        "encounter": {"reference": "Encounter/enc-7"},  # delivered earlier: the same opaque id
        "basedOn": [{"reference": "CarePlan/cp-1/_history/3"}, {"reference": "Patient/elsewhere"}],
        "device": {"reference": "http://other.example/fhir/Device/d1"},  # absolute: another server
        "focus": [{"reference": "Flag/MRN-778899"}],  # Flag is not in this profile
    }
    o = obs("Patient/pat-123", **refs)
    later = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))
    outside = [
        "Encounter/enc-7",
        "CarePlan/cp-1/_history/3",
        "Patient/elsewhere",
        "http://other.example/fhir/Device/d1",
        "Flag/MRN-778899",
    ]
    second = deidentify(
        later,
        plan,
        id_key=KEY_A,
        pseudonyms=fake_pseudonyms(later),
        provenance=PROVENANCE,
        outside_references=outside,
    )
    (out,) = resources(second.bundle, "Observation")
    assert out["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    (care_plan,) = out["basedOn"]  # a Patient outside the Bundle is never rewritten
    assert care_plan["reference"].startswith("CarePlan/") and "cp-1" not in care_plan["reference"]
    assert "device" not in out and "focus" not in out
    assert "MRN-778899" not in orjson.dumps(second.bundle).decode()
    # by default (and for the same input), such references are dropped
    default = deidentify(
        later,
        plan_for("example-generic"),
        id_key=KEY_A,
        pseudonyms=fake_pseudonyms(later),
        provenance=PROVENANCE,
        outside_references=outside,
    )
    assert "encounter" not in resources(default.bundle, "Observation")[0]


def test_transaction_requests_become_put_with_the_opaque_id() -> None:
    b = bundle(("urn:uuid:p", patient()))
    b["entry"][0]["request"] = {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": f"identifier={BSN_SYSTEM}|{TEST_BSN}",
    }
    b["entry"].append({"request": {"method": "DELETE", "url": "Patient/pat-123"}})
    result = run(b)
    entries = result.bundle["entry"]
    assert [e["request"]["method"] for e in entries] == ["PUT", "PUT"]  # patient + provenance
    assert entries[0]["request"]["url"] == "Patient/" + entries[0]["resource"]["id"]
    assert result.report.dropped["no-resource"] == {"(none)": 1}


# ── drops ────────────────────────────────────────────────────────────────────────────────────────────────


def test_unknown_modifier_extension_drops_the_resource_whole() -> None:
    mod = [{"url": "http://example.org/fhir/StructureDefinition/not-really", "valueBoolean": True}]
    top = obs("Patient/pat-123", modifierExtension=mod)
    nested = obs("Patient/pat-123", component=[{"code": {"text": "a"}, "modifierExtension": mod}])
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o1", top), ("urn:uuid:o2", nested)))
    assert resources(result.bundle, "Observation") == []
    assert result.report.dropped["unknown-modifierExtension"] == {"Observation": 2}


def test_allowed_modifier_extension_is_kept() -> None:
    url = "http://example.org/fhir/StructureDefinition/allowed-modifier"
    raw = read_yaml(PROFILES.parent / "mappings" / "deid-rules.yaml")
    raw["modifier_extensions"] = {url: {"method": "keep", "values": ["valueBoolean"]}}
    plan = compile_plan(plan_for("example-generic").profile, rules_from_data(raw))
    o = obs("Patient/pat-123", modifierExtension=[{"url": url, "valueBoolean": True}])
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))
    out = deidentify(b, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(b), provenance=PROVENANCE).bundle
    assert resources(out, "Observation")[0]["modifierExtension"] == [{"url": url, "valueBoolean": True}]


def test_types_not_in_the_profile_and_persons_are_dropped_with_reason() -> None:
    rp = {
        "resourceType": "RelatedPerson",
        "patient": {"reference": "Patient/pat-123"},
        "name": [{"text": "Kees"}],
    }
    claim = {"resourceType": "Claim", "patient": {"reference": "Patient/pat-123"}}
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:r", rp), ("urn:uuid:c", claim)))
    assert result.report.dropped["type-not-allowed"] == {"RelatedPerson": 1, "Claim": 1}
    assert result.report.resources_in == 3 and result.report.resources_kept == 1


def test_patient_without_pseudonym_is_not_delivered() -> None:
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", obs("urn:uuid:p")))
    result = run(b, pseudonyms={})
    assert resources(result.bundle, "Patient") == []
    assert result.report.dropped["no-pseudonym"] == {"Patient": 1}
    assert resources(result.bundle, "Observation") == []  # it was delivered without its subject
    assert result.report.dropped["not-linked-to-a-patient"] == {"Observation": 1}


def test_unknown_extensions_are_dropped_known_ones_kept() -> None:
    p = patient(
        extension=[
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                "valueAddress": {"city": "Kampen"},
            },
            {"url": "http://example.org/secret", "valueString": "Annemarie's nickname"},
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-nationality",
                "extension": [{"url": "code", "valueCodeableConcept": {"coding": [{"code": "0001"}]}}],
            },
        ]
    )
    out = run(bundle(("urn:uuid:p", p))).bundle
    (pat,) = resources(out, "Patient")
    assert [e["url"] for e in pat["extension"]] == [
        "http://hl7.org/fhir/StructureDefinition/patient-nationality"
    ]
    assert pat["extension"][0]["extension"][0]["url"] == "code"


def test_choice_wildcard_leaves_out_free_text_variants() -> None:
    cond = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/pat-123"},
        "code": {"coding": []},
        "onsetString": "sinds de val bij Kuipers thuis",
        "abatementDateTime": "2024-01-02",
    }
    (out,) = resources(run(bundle(("urn:uuid:p", patient()), ("urn:uuid:c", cond))).bundle, "Condition")
    assert "onsetString" not in out and out["abatementDateTime"] == "2024-01-02"


def test_choice_wildcard_leaves_out_free_text_variants_of_a_stem_with_capitals() -> None:
    """`doseNumber[x]`: the type table took `doseNumberString` for a code (the stem has a capital), so the
    profile's wildcard delivered the free text (a fresh-eyes test: "given at home by neighbour")."""
    immunization = {
        "resourceType": "Immunization",
        "status": "completed",
        "vaccineCode": {"coding": [{"system": "http://snomed.info/sct", "code": "871908002"}]},
        "patient": {"reference": "Patient/pat-123"},
        "occurrenceDateTime": "2024-01-02",
        "protocolApplied": [
            {"doseNumberString": "gegeven thuis door de buurvrouw", "seriesDosesPositiveInt": 2},
            {"doseNumberPositiveInt": 2, "seriesDosesString": "twee, zegt Kuipers"},
        ],
    }
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:i", immunization))
    result = run(b)
    (out,) = resources(result.bundle, "Immunization")
    # the first loses doseNumber[x], which R4 requires of a protocolApplied: it goes whole
    assert out["protocolApplied"] == [{"doseNumberPositiveInt": 2}]
    assert result.report.elements_removed["Immunization.protocolApplied.(required-element-lost)"] == 1


def test_free_text_is_removed() -> None:
    o = obs(
        "Patient/pat-123",
        note=[{"text": "Annemarie belde zelf"}],
        text={"status": "generated", "div": "<div>Kuipers</div>"},
        valueString="vrije tekst",
    )
    out = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))).bundle
    (out_obs,) = resources(out, "Observation")
    assert not {"note", "text", "valueString"} & set(out_obs)


# ── generalisation ─────────────────────────────────────────────────────────────────────────────────────────


def test_example_generic_generalises_birthdate_and_postcode() -> None:
    out = run(bundle(("urn:uuid:p", patient()))).bundle
    (pat,) = resources(out, "Patient")
    assert pat["birthDate"] == "1961-08"
    assert pat["address"] == [{"use": "home", "postalCode": "8011", "country": "NL"}]


def test_cancer_registry_shifts_dates_consistently_per_patient() -> None:
    o = obs(
        "Patient/pat-123", effectiveDateTime="2024-02-29T10:30:00.000+01:00", issued="2024-03-01T09:00:00Z"
    )
    b = bundle(("urn:uuid:p", patient(deceasedDateTime="2024-05-01")), ("urn:uuid:o", o))
    out = run(b, profile="example-cancer-registry").bundle
    (pat,) = resources(out, "Patient")
    (out_obs,) = resources(out, "Observation")
    assert pat["birthDate"] == "1961"  # year only
    assert out_obs["effectiveDateTime"] != "2024-02-29T10:30:00.000+01:00"
    assert out_obs["effectiveDateTime"].endswith("T10:30:00.000+01:00")  # time and precision untouched
    assert "issued" not in out_obs  # not in that profile's allow-list
    from datetime import date

    shift = date.fromisoformat(out_obs["effectiveDateTime"][:10]) - date(2024, 2, 29)
    assert date.fromisoformat(pat["deceasedDateTime"]) - date(2024, 5, 1) == shift
    assert 1 <= abs(shift.days) <= 30
    # the Provenance says so (a registry holder's probe: it read as one of a profile that keeps dates)
    shifted = "urn:fhir-delivery-gateway:deid:dates-shifted-per-patient"
    (provenance,) = resources(out, "Provenance")
    assert shifted in provenance["policy"]
    (kept,) = resources(run(b).bundle, "Provenance")
    assert shifted not in kept["policy"]


@pytest.mark.parametrize("placeholder", ["0001-01-02", "0001-01-01T00:00:00Z", "9999-12-30T23:59:59+14:00"])
def test_a_date_the_shift_would_take_past_year_1_or_9999_is_dropped_not_a_crash(placeholder: str) -> None:
    """EHRs write such dates for "unknown" and "open"; a fresh-eyes test got a 500 and a bulk job that
    crashed on every resume. Whatever the patient's offset, one of the two ends overflows."""
    early, late = obs("Patient/pat-123", effectiveDateTime=placeholder), obs("Patient/pat-123")
    late["effectivePeriod"] = {"start": "2024-01-01", "end": placeholder}
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o1", early), ("urn:uuid:o2", late))
    out = run(b, profile="example-cancer-registry").bundle
    delivered = resources(out, "Observation")
    assert len(delivered) == 2
    shifted = [o.get("effectiveDateTime") or o.get("effectivePeriod", {}).get("end") for o in delivered]
    assert all(s is None or s[:4] in ("0001", "0002", "9999") for s in shifted)


def test_foreign_postcode_is_not_delivered() -> None:
    p = patient(address=[{"postalCode": "01915", "country": "US"}])
    (pat,) = resources(run(bundle(("urn:uuid:p", p))).bundle, "Patient")
    assert pat["address"] == [{"country": "US"}]


# ── management information, report, provenance ─────────────────────────────────────────────────────────────


def test_aggregated_only_profile_delivers_nothing_person_level() -> None:
    enc = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/pat-123"},
    }
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:e", enc)), profile="example-management-info")
    assert result.bundle["entry"] == []
    assert result.report.refused == "aggregated-only"
    assert result.report.dropped["aggregated-only"] == {"Patient": 1, "Encounter": 1}


def test_report_holds_counts_not_values() -> None:
    o = obs("Patient/pat-123", note=[{"text": "Annemarie"}])
    o["secretKey-Kuipers"] = "Kuipers"
    result = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o)))
    text = orjson.dumps(result.report.as_dict()).decode()
    for value in ("Kuipers", "Annemarie", TEST_BSN, "8011", "Kerkstraat", "pat-123"):
        assert value not in text
    removed = result.report.elements_removed
    assert (
        removed["Patient.name"] == 1
        and removed["Reference.display"] == 1
        and removed["Observation.note"] == 1
    )
    assert removed["Observation.(not-allowed)"] == 1


def test_provenance_records_the_deidentification() -> None:
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", obs("urn:uuid:p")))
    out = run(b).bundle
    (prov,) = resources(out, "Provenance")
    delivered = [e["fullUrl"] for e in out["entry"] if e["resource"]["resourceType"] != "Provenance"]
    assert [t["reference"] for t in prov["target"]] == delivered
    assert prov["activity"]["coding"][0]["code"] == "pseudonymize"
    assert prov["recorded"] == PROVENANCE.recorded
    whos = [a["who"]["display"] for a in prov["agent"]]
    assert any(PROVENANCE.gateway_version in w for w in whos) and any(PROVENANCE.ttp_name in w for w in whos)
    assert run(b).bundle["entry"][-1]["resource"]["id"] == prov["id"]  # deterministic
    assert set(references(out)) <= {e["fullUrl"] for e in out["entry"]}


def test_output_passes_the_leak_scan() -> None:
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", obs("Patient/pat-123")))
    assert scan(run(b).bundle) == []


def test_compile_plan_uses_the_shipped_rules() -> None:
    plan = compile_plan(plan_for("example-cancer-registry").profile, load_rules())
    assert set(plan.nodes) == {"Patient", "Condition", "Procedure", "Observation"}
    assert plan.shift_dates and plan.shift_max_days == 30


def test_wrong_json_types_are_dropped_not_copied() -> None:
    o = obs("Patient/pat-123", status={"nested": "Kuipers"}, category="not-a-list", valueQuantity=[1, 2])
    out = run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))).bundle
    assert "Kuipers" not in orjson.dumps(out).decode()


def test_profile_data_roundtrip() -> None:
    raw = read_yaml(PROFILES / "example-generic.yaml")
    assert profile_from_data(raw).id == "example-generic"


def test_opaque_ids_are_hmac_sha256_and_valid_fhir_ids() -> None:
    import hashlib
    import hmac
    import re

    from gateway.deid.engine import _Ids

    for key in (KEY_A, b"k" * 100):  # short and longer-than-block keys
        ids = _Ids(key, "example-generic")
        expected = hmac.new(key, b"example-generic\x1fPatient\x1fPatient/123", hashlib.sha256).digest()
        assert ids.digest("Patient", "Patient/123") == expected
        new = ids.uuid("Patient", "Patient/123")
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", new)
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", new)


def test_profile_switches_keep_what_the_profile_asks_for() -> None:
    raw = read_yaml(PROFILES / "example-generic.yaml")
    raw["free_text"] = {
        "note": "keep",
        "reference_display": "keep",
        "attachment": "keep-metadata",
        "concept_text": "keep",
    }
    raw["practitioner"] = {"name": "keep", "identifier": "drop", "telecom": "drop"}
    raw["resources"]["Observation"] += ["note"]
    raw["resources"]["DiagnosticReport"] += ["presentedForm"]
    raw["resources"]["Practitioner"] += ["name"]
    plan = compile_plan(profile_from_data(raw), load_rules())
    o = obs(
        "Patient/pat-123",
        note=[{"text": "Meting herhaald", "authorString": "Dr. Kuipers"}],
        performer=[{"reference": "urn:uuid:pr"}],
    )
    o["code"]["text"] = "Lengte"
    report = {
        "resourceType": "DiagnosticReport",
        "subject": {"reference": "Patient/pat-123"},
        "status": "final",
        "code": {"text": "x"},
        "presentedForm": [
            {
                "contentType": "application/pdf",
                "data": "SGVsbG8=",
                "url": "http://x/doc",
                "title": "Verslag Kuipers",
                "size": 5,
            }
        ],
    }
    prac = {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/big", "value": "129123456"}],
        "name": [{"family": "Peters", "given": ["Jan"]}],
        "telecom": [{"value": "0612345678"}],
    }
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o), ("urn:uuid:d", report), ("urn:uuid:pr", prac))
    out = deidentify(b, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(b), provenance=PROVENANCE).bundle
    (out_obs,) = resources(out, "Observation")
    assert out_obs["note"] == [{"text": "Meting herhaald"}]  # authorString always removed
    assert out_obs["subject"]["display"] == "Kuipers, Annemarie"
    assert out_obs["code"]["text"] == "Lengte"
    (dr,) = resources(out, "DiagnosticReport")
    assert dr["presentedForm"] == [{"contentType": "application/pdf", "size": 5}]
    (pr,) = resources(out, "Practitioner")
    assert pr["name"] == [{"family": "Peters", "given": ["Jan"]}]
    assert "identifier" not in pr and "telecom" not in pr
    assert plan.practitioner_kept == ("name",)


@pytest.mark.parametrize("marker", ["same-address", "PTRES", "ordinal-street", "postcode-written-otherwise"])
def test_a_location_at_the_patients_home_gets_the_patients_address_generalisation(marker: str) -> None:
    """Location.address is kept (a hospital's address), but a home visit's Location is the patient's home:
    it is recognised by the patient's own address or by type PTRES and generalised like Patient.address.
    A fresh-eyes probe found the home missed when the street began with an ordinal ("2e Jan Steenstraat 15"
    read as number 2) and when the postcode was written "8011-ab"."""
    home = dict(patient()["address"][0])
    loc: dict[str, Any] = {"resourceType": "Location", "name": "thuis", "address": home}
    if marker == "ordinal-street":
        home["line"] = ["2e Kerkstraat 12"]
        loc["address"] = {"line": ["Tweede Kerkstraat 12"], "postalCode": "8011 AB", "city": "Zwolle"}
    if marker == "postcode-written-otherwise":
        loc["address"] = {"line": ["Kerkstr. 12"], "postalCode": "8011-ab"}
    if marker == "PTRES":
        loc["address"] = {**home, "line": ["Elders 3"]}
        loc["type"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "PTRES"}]}
        ]
    hospital = {
        "resourceType": "Location",
        "name": "Isala",
        "address": {"line": ["Dokter van Heesweg 2"], "city": "Zwolle", "postalCode": "8025 AB"},
    }
    person = patient(address=[home])
    visits = [
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
            "subject": {"reference": "urn:uuid:p"},
            "location": [{"location": {"reference": place}}],
        }
        for place in ("urn:uuid:l", "urn:uuid:h")
    ]
    result = run(
        bundle(
            ("urn:uuid:p", person),
            ("urn:uuid:l", loc),
            ("urn:uuid:h", hospital),
            ("urn:uuid:e1", visits[0]),
            ("urn:uuid:e2", visits[1]),
        )
    )
    at_home, clinic = resources(result.bundle, "Location")
    if marker == "postcode-written-otherwise":  # not a Dutch postcode as Patient.address's PC4 rule reads one
        assert "address" not in at_home
    else:
        assert at_home["address"].get("postalCode") == "8011" and "line" not in at_home["address"]
    assert clinic["address"] == hospital["address"]  # a public place keeps its address
    assert scan(result.bundle, sensitive_values(bundle(("urn:uuid:p", person), ("urn:uuid:l", loc)))) == []
    assert result.report.elements_removed["Location.address.(patient-home)"] == 1


def test_a_place_at_the_patients_home_loses_what_names_it_not_only_its_street() -> None:
    """A privacy probe: a home Location kept its BAG verblijfsobject id and its name ("Lindengracht 87"), a
    home Organization its KvK number; each pins down the address that was cut to PC4. The clinic keeps all."""
    home = dict(patient()["address"][0])
    street = home["line"][0]
    bag = {"system": "http://fhir.nl/fhir/NamingSystem/bag-verblijfsobject", "value": "0363010012345678"}
    loc = {
        "resourceType": "Location", "name": street, "alias": [street], "identifier": [bag],
        "description": f"bij {street}", "telecom": [{"system": "phone", "value": "0381234567"}],
        "position": {"latitude": 52.51, "longitude": 6.09}, "address": home,
        "managingOrganization": {"reference": "urn:uuid:o"},
    }  # fmt: skip
    kvk = {"system": "http://fhir.nl/fhir/NamingSystem/kvk", "value": "12345678"}
    org = {"resourceType": "Organization", "name": f"Kapsalon {street}", "identifier": [kvk],
           "address": [home]}
    clinic = {"resourceType": "Organization", "name": "Isala", "identifier": [kvk],
              "address": [{"line": ["Dokter van Heesweg 2"], "city": "Zwolle", "postalCode": "8025 AB"}]}
    visit = {
        "resourceType": "Encounter", "status": "finished", "subject": {"reference": "urn:uuid:p"},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "location": [{"location": {"reference": "urn:uuid:l"}}],
        "serviceProvider": {"reference": "urn:uuid:c"},
    }  # fmt: skip
    places = (("urn:uuid:l", loc), ("urn:uuid:o", org), ("urn:uuid:c", clinic))
    result = run(bundle(("urn:uuid:p", patient(address=[home])), *places, ("urn:uuid:e", visit)))
    (at_home,) = resources(result.bundle, "Location")
    assert set(at_home) <= {"resourceType", "id", "mode", "address", "managingOrganization"}, at_home
    home_org, kept = sorted(resources(result.bundle, "Organization"), key=lambda o: "name" in o)
    assert "identifier" not in home_org and "name" not in home_org
    # org-1 (a name or an identifier): the name's place is there, saying it is withheld
    assert home_org["_name"]["extension"][0]["valueCode"] == "masked"
    assert kept["name"] == "Isala" and kept["identifier"][0]["value"] == "12345678"
    text = orjson.dumps(result.bundle).decode()
    assert "0363010012345678" not in text and street.split()[0] not in text and "52.51" not in text
    removed = result.report.elements_removed
    assert removed["Location.identifier.(patient-home)"] == 1
    assert removed["Organization.identifier.(patient-home)"] == 1


def test_what_a_home_is_part_of_names_it_too() -> None:
    """A re-probe: the home Location was stripped, and the building it is `partOf` ("Woonblok
    Lindengracht", at "Lindengracht 85-89") was delivered beside it, naming street, number range and city."""
    home = {"line": ["Lindengracht 87"], "city": "Amsterdam", "postalCode": "1015 KH"}
    flat = {"resourceType": "Location", "name": "thuis", "address": {**home, "use": "home"},
            "partOf": {"reference": "urn:uuid:b"}}
    block = {"resourceType": "Location", "name": "Woonblok Lindengracht",
             "partOf": {"reference": "urn:uuid:s"},
             "address": {"line": ["Lindengracht 85-89"], "city": "Amsterdam", "postalCode": "1015 KH"}}
    street = {"resourceType": "Location", "name": "Blokken Lindengracht-Noord"}
    # and what is part of the home (a later re-probe: a room named and numbered after it was delivered)
    bag = {"system": "http://fhir.nl/fhir/NamingSystem/bag-verblijfsobject", "value": "0363010000758545-02"}
    room = {"resourceType": "Location", "name": "Lindengracht 87 kamer 2", "identifier": [bag],
            "partOf": {"reference": "urn:uuid:l"}}
    visit = {
        "resourceType": "Encounter", "status": "finished", "subject": {"reference": "urn:uuid:p"},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "location": [{"location": {"reference": "urn:uuid:r"}}],
    }  # fmt: skip
    places = (("urn:uuid:l", flat), ("urn:uuid:b", block), ("urn:uuid:s", street), ("urn:uuid:r", room))
    result = run(bundle(("urn:uuid:p", patient(address=[home])), *places, ("urn:uuid:e", visit)))
    text = orjson.dumps(result.bundle).decode()
    assert "Lindengracht" not in text and "Woonblok" not in text and "Amsterdam" not in text
    assert "0363010000758545" not in text
    assert len(resources(result.bundle, "Location")) == 4  # delivered, unnamed, their postcodes cut to PC4


def test_reference_type_is_kept_only_as_a_resource_type_name() -> None:
    o = obs("Patient/pat-123")
    o["subject"] = {"reference": "Patient/pat-123", "type": "Patient"}
    o["basedOn"] = [{"reference": "Patient/pat-123", "type": "http://example.org/Kuipers"}]
    (out,) = resources(run(bundle(("urn:uuid:p", patient()), ("urn:uuid:o", o))).bundle, "Observation")
    assert out["subject"]["type"] == "Patient" and "type" not in out["basedOn"][0]


@pytest.mark.parametrize(
    ("start", "end"),
    [("2024-01-31", "2024-01"), ("2024-12-30", "2024"), ("2024-01", "2024-01-01"), ("2023", "2024-01-02")],
)
def test_a_period_at_mixed_precision_keeps_its_start_before_its_end_when_dates_are_shifted(
    start: str, end: str
) -> None:
    """per-1: a partial start moves with its first day, a partial end with its last (a fresh-eyes test saw
    2024-01-31 .. 2024-01 become 2024-02-04 .. 2024-01)."""
    from datetime import date

    procedure = {
        "resourceType": "Procedure",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "80146002"}]},
        "subject": {"reference": "urn:uuid:p"},
        "performedPeriod": {"start": start, "end": end},
    }
    b = bundle(("urn:uuid:p", patient()), ("urn:uuid:x", procedure))
    (out,) = resources(run(b, profile="example-cancer-registry").bundle, "Procedure")
    shifted = out["performedPeriod"]
    assert len(shifted["start"]) == len(start) and len(shifted["end"]) == len(end)  # precision kept

    def first(d: str) -> date:
        return date.fromisoformat((d + "-01-01")[:10] if len(d) == 4 else (d + "-01")[:10])

    def last(d: str) -> date:
        if len(d) == 10:
            return date.fromisoformat(d)
        y, m = int(d[:4]), int(d[5:7]) if len(d) == 7 else 12
        return date(y + (m == 12), m % 12 + 1, 1) - (date(2000, 1, 2) - date(2000, 1, 1))

    assert first(shifted["start"]) <= last(shifted["end"])
    assert shifted != {"start": start, "end": end}  # the full dates moved


def test_a_kept_extension_carries_only_the_values_and_parts_its_rule_names() -> None:
    """A probe of the registry side: free text rode along inside kept extensions (a `comment` part of the
    gender identity, a `remark` part of the nationality, a valueString beside data-absent-reason)."""
    base = "http://hl7.org/fhir/StructureDefinition/"
    gender = {"coding": [{"system": "http://snomed.info/sct", "code": "446141000124107"}]}
    dutch = {"coding": [{"system": "urn:iso:std:iso:3166", "code": "NL"}]}
    absent = {"url": base + "data-absent-reason", "valueCode": "unknown", "valueString": "zoon Pieter"}
    person = patient(
        extension=[
            {
                "url": base + "individual-genderIdentity",
                "extension": [
                    {"url": "value", "valueCodeableConcept": gender},
                    {"url": "comment", "valueString": "buurman Kees Smit, Dorpsplein 3"},
                ],
            },
            {
                "url": base + "patient-nationality",
                "extension": [
                    {"url": "code", "valueCodeableConcept": dutch},
                    {"url": "remark", "valueMarkdown": "advocaat mr. H. Dekker"},
                ],
            },
        ],
        _birthDate={"extension": [absent]},
    )
    (out,) = resources(run(bundle(("urn:uuid:p", person))).bundle, "Patient")
    text = orjson.dumps(out).decode()
    for free_text in ("Kees Smit", "Dekker", "Pieter"):
        assert free_text not in text
    identity, nationality = out["extension"]
    assert [part["url"] for part in identity["extension"]] == ["value"]
    assert [part["url"] for part in nationality["extension"]] == ["code"]


def test_confidentiality_and_sensitivity_labels_are_kept_as_codes() -> None:
    """A probe of the registry side: a resource marked restricted (or psychiatric) lost its label, so the
    registry could not handle it as such. Only codes of HL7's label systems pass; displays and other
    systems' labels (free text in a local one) do not."""
    confidentiality = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    sensitivity = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    labels = [
        {"system": confidentiality, "code": "R", "display": "restricted"},
        {"system": sensitivity, "code": "PSY"},
        {"system": "http://hospital.example.org/labels", "code": "VIP-Jansen"},
    ]
    o = obs("Patient/pat-123", meta={"security": labels})
    person = patient(meta={"security": [labels[0]]})
    out = run(bundle(("urn:uuid:p", person), ("urn:uuid:o", o))).bundle
    (kept,) = resources(out, "Observation")
    restricted, psychiatric = {"system": confidentiality, "code": "R"}, {"system": sensitivity, "code": "PSY"}
    assert kept["meta"]["security"] == [restricted, psychiatric]
    (pseudonymised,) = resources(out, "Patient")
    assert [label["code"] for label in pseudonymised["meta"]["security"]] == ["PSEUDED", "R"]


def test_a_bundles_own_confidentiality_label_is_kept_on_the_delivered_bundle() -> None:
    """A re-probe: a `V` (very restricted) label on the posted Bundle's meta was lost."""
    very = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"}
    labelled = {"security": [very | {"display": "very restricted"}]}
    posted = bundle(("urn:uuid:p", patient())) | {"meta": labelled}
    labels = run(posted).bundle["meta"]["security"]
    assert [label["code"] for label in labels] == ["PSEUDED", "V"] and very in labels


@pytest.mark.parametrize("written", ["3511 AB", "3511AB", "3511  AB", " 3511\tab ", "3511 A B"])
def test_a_dutch_postcode_however_spaced_becomes_its_pc4(written: str) -> None:
    """A probe: "3511  AB" (two spaces) lost its PC4, while the RGG pseudonym, which strips all whitespace,
    was still made from it: one postcode read two ways."""
    person = patient(address=[{"use": "home", "postalCode": written}])
    (out,) = resources(run(bundle(("urn:uuid:p", person))).bundle, "Patient")
    assert out["address"] == [{"use": "home", "postalCode": "3511"}]


@pytest.mark.parametrize("contained", [False, True])
def test_a_location_at_a_relatives_home_gets_the_home_address_generalisation(contained: bool) -> None:
    """A probe: a home visit at the carer's house kept the Location's street, and the leak gate refused the
    whole Bundle. A relative's home is a person's home too, also when the relative is contained."""
    carer = {
        "resourceType": "RelatedPerson",
        "id": "rp",
        "patient": {"reference": "urn:uuid:p"},
        "address": [{"line": ["Dorpsweg 7"], "city": "De Bilt", "postalCode": "3731 CD"}],
    }
    at_carer = {"line": ["Dorpsweg 7"], "postalCode": "3731 CD"}
    place = {"resourceType": "Location", "name": "thuis", "address": at_carer}
    visit = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "subject": {"reference": "urn:uuid:p"},
        "location": [{"location": {"reference": "urn:uuid:l"}}],
    }
    entries = [("urn:uuid:p", patient()), ("urn:uuid:l", place), ("urn:uuid:e", visit)]
    if contained:
        visit["contained"] = [carer]
        visit["participant"] = [{"individual": {"reference": "#rp"}}]
    else:
        entries.append(("urn:uuid:rp", carer))
    result = run(bundle(*entries))
    (at_home,) = resources(result.bundle, "Location")
    assert at_home["address"] == {"postalCode": "3731"}
    assert result.report.elements_removed["Location.address.(patient-home)"] == 1


def test_a_profile_narrows_the_extensions_a_registry_receives() -> None:
    """A probe of the registry side: the narrow cancer registry, whose Patient allow-list is gender, birth
    date, death and address, received the gender identity, birth sex and nationality extensions, which the
    rules keep for every registry. A profile now lists the extensions it receives (`extensions:`)."""
    base, nictiz = "http://hl7.org/fhir/StructureDefinition/", "http://nictiz.nl/fhir/StructureDefinition/"
    coded = {"coding": [{"system": "http://snomed.info/sct", "code": "446141000124107"}]}
    part = {"valueCodeableConcept": coded}
    person = patient(
        extension=[
            {"url": base + "individual-genderIdentity", "extension": [{"url": "value", **part}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"},
            {"url": base + "patient-nationality", "extension": [{"url": "code", **part}]},
        ],
        _gender={"extension": [{"url": nictiz + "ext-CodeSpecification", **part}]},
    )
    narrow = resources(run(bundle(("urn:uuid:p", person)), "example-cancer-registry").bundle, "Patient")[0]
    assert "extension" not in narrow
    assert narrow["_gender"]["extension"][0]["url"].endswith("ext-CodeSpecification")  # the profile lists it
    broad = resources(run(bundle(("urn:uuid:p", person))).bundle, "Patient")[0]
    assert len(broad["extension"]) == 3  # a profile without the key receives what the rules keep


def medication_request(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "387517004"}]},
        "subject": {"reference": "urn:uuid:p"},
        **extra,
    }


def test_the_rules_of_a_datatypes_elements_hold_where_a_profile_lists_them_by_their_place() -> None:
    """A probe: a profile listing `code.text`, `note.authorString` and `dosageInstruction.text` by their
    place delivered them although the rules (`CodeableConcept.text`, `Annotation.authorString`,
    `Dosage.text`) say they always go: the rules were looked up under the place, not the datatype."""
    raw = read_yaml(PROFILES / "example-generic.yaml")
    raw["free_text"] = {"note": "keep", "concept_text": "drop"}
    raw["resources"] = {
        "Patient": ["gender"],
        "Observation": ["status", "code.coding", "code.text", "subject", "note.text", "note.authorString"],
        "MedicationRequest": ["status", "intent", "medication[x]", "subject", "dosageInstruction.text"],
    }
    plan = compile_plan(profile_from_data(raw), load_rules())
    observation = obs(
        "urn:uuid:p",
        code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "afgenomen door dr. P."},
        note=[{"text": "kept: the profile keeps notes", "authorString": "Dr. K. Pietersen"}],
    )
    request = medication_request(dosageInstruction=[{"text": "1x daags, bel Pietersen bij klachten"}])
    source = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", observation), ("urn:uuid:m", request))
    result = deidentify(source, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(source), provenance=PROVENANCE)
    [delivered] = resources(result.bundle, "Observation")
    assert delivered["code"] == {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    assert delivered["note"] == [{"text": "kept: the profile keeps notes"}]
    [medication] = resources(result.bundle, "MedicationRequest")
    assert "dosageInstruction" not in medication


def test_a_list_of_dates_with_one_the_shift_cannot_move_goes_whole_never_with_a_null() -> None:
    """A probe: `Timing.event: ["2024-03-05", "0001-01-01"]` came out as `["2024-02-20", null]`, which is not
    R4 (a null needs its `_event` partner), and no check caught it. Whatever the patient's offset, one of
    the two placeholders overflows."""
    raw = read_yaml(PROFILES / "example-cancer-registry.yaml")
    raw["resources"]["MedicationRequest"] = [
        "status", "intent", "medication[x]", "subject", "dosageInstruction"
    ]
    plan = compile_plan(profile_from_data(raw), load_rules())
    request = medication_request(
        dosageInstruction=[
            {"sequence": 1, "timing": {"event": ["2024-03-05", "0001-01-01", "9999-12-31"]}},
            {"sequence": 2, "timing": {"event": ["2024-03-05", "2024-03-06"]}},
        ]
    )
    source = bundle(("urn:uuid:p", patient()), ("urn:uuid:m", request))
    out = deidentify(source, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(source), provenance=PROVENANCE)
    [delivered] = resources(out.bundle, "MedicationRequest")
    first, second = delivered["dosageInstruction"]
    assert "timing" not in first and len(second["timing"]["event"]) == 2
    assert b"null" not in orjson.dumps(out.bundle)


@pytest.mark.parametrize(
    ("purpose", "allows", "code"),
    [("scientific-research", "with-consent", "HRESCH"), ("quality-registry", "pseudonymised", "HQUALIMP")],
)
def test_the_provenance_states_the_profiles_purpose_of_use(purpose: str, allows: str, code: str) -> None:
    """A probe: a research profile's Provenance had `"reason": []`, which is not R4."""
    raw = read_yaml(PROFILES / "example-generic.yaml")
    raw["purpose"], raw["legal_basis"] = purpose, {"basis": "a study's informed consent", "allows": allows}
    plan = compile_plan(profile_from_data(raw), load_rules())
    source = bundle(("urn:uuid:p", patient()), ("urn:uuid:o", obs("urn:uuid:p")))
    out = deidentify(source, plan, id_key=KEY_A, pseudonyms=fake_pseudonyms(source), provenance=PROVENANCE)
    [provenance] = resources(out.bundle, "Provenance")
    assert [c["code"] for r in provenance["reason"] for c in r["coding"]] == [code]


def test_a_relative_reference_resolves_against_its_own_entrys_server_only() -> None:
    """A re-probe: `Observation/o2` in an entry under http://hospital.example/fhir/ was rewritten to another
    server's Observation o2 in the Bundle (validation reads it as not in the Bundle), linking one patient's
    record to another's. A relative reference from a urn:uuid entry still matches any entry's Type/id."""
    other = obs("urn:uuid:p") | {"id": "o2"}
    here = obs("urn:uuid:p", derivedFrom=[{"reference": "Observation/o2"}]) | {"id": "o1"}
    loose = obs("urn:uuid:p", derivedFrom=[{"reference": "Observation/o2"}]) | {"id": "o3"}
    b = bundle(
        ("urn:uuid:p", patient()),
        ("http://other.org/fhir/Observation/o2", other),
        ("http://hospital.example/fhir/Observation/o1", here),
        ("urn:uuid:o3", loose),
    )
    delivered = resources(run(b).bundle, "Observation")
    assert "derivedFrom" not in delivered[1]  # under hospital.example: that server's o2, not in the Bundle
    assert delivered[2]["derivedFrom"] == [{"reference": "urn:uuid:" + delivered[0]["id"]}]
