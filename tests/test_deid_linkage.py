"""What a registry links on across deliveries: opaque ids per hospital, a patient's date shift across the
TTP's key rotation and through indirect links, and nothing delivered that leads to no delivered patient.
Each case came from a fresh-eyes probe of the registry side, through the whole chain (the reference TTP)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import yaml

from gateway.bulk.chains import offline_chains
from gateway.config import REPO_ROOT
from gateway.ttp.keystore import KeyStore

MRN = "http://ehr.example.org/mrn"
BIG = "http://fhir.nl/fhir/NamingSystem/big"


def person(pid: str, family: str, born: str, gender: str = "female", **more: Any) -> dict[str, Any]:
    """An nl-core Patient with what NGGV and RGG are made of (own name, Dutch postcode)."""
    own_name = {"url": "http://hl7.org/fhir/StructureDefinition/humanname-own-name", "valueString": family}
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": MRN, "value": f"M-{family}"}],
        "name": [
            {"use": "official", "family": family, "_family": {"extension": [own_name]}, "given": ["Anna"]}
        ],
        "gender": gender,
        "birthDate": born,
        "address": [{"use": "home", "line": ["Teststraat 15"], "city": "Teststad", "postalCode": "1012 NX"}],
        **more,
    }


def condition(cid: str, pid: str, onset: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "363358000"}]},
        "onsetDateTime": onset,
    }


def collection(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"http://ehr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r}
            for r in resources
        ],
    }


def process(chains: Any, bundle: dict[str, Any]) -> Any:
    return asyncio.run(chains.process(bundle, recorded="2026-01-01T00:00:00Z"))


def delivered(processed: Any, rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in processed.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def visit(**more: Any) -> dict[str, Any]:
    """Patient 1's Encounter `e1`."""
    ambulatory = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
    return {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": ambulatory,
            "subject": {"reference": "Patient/1"}, **more}  # fmt: skip


def measurement(**more: Any) -> dict[str, Any]:
    """Observation `o1`, tied to nobody unless `more` says so."""
    loinc = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    return {"resourceType": "Observation", "id": "o1", "status": "final", "code": loinc, **more}


def test_two_hospitals_patient_1_are_two_people_at_the_registry(tmp_path: Path) -> None:
    """Both hospitals' `Patient/1` and `Condition/1` got the same opaque ids: the second overwrote the
    first at the registry."""
    first = offline_chains("example-generic", tmp_path / "k")
    second = replace(first, provider=replace(first.provider, provider="ura:00000002"))
    bundle = collection(person("1", "Aalders", "1950-01-01"), condition("1", "1", "2025-01-01"))
    a, b = process(first, bundle), process(second, bundle)
    ids_a = {(r["resourceType"], r["id"]) for r in map(lambda e: e["resource"], a.bundle["entry"])}
    ids_b = {(r["resourceType"], r["id"]) for r in map(lambda e: e["resource"], b.bundle["entry"])}
    assert not ids_a & ids_b
    assert process(first, bundle).bundle == a.bundle  # and stable for one hospital


def test_a_patients_date_shift_stays_when_the_ttp_key_is_rotated(tmp_path: Path) -> None:
    """The shift was keyed on the first pseudonym, which changes with the TTP's key version: the same
    Condition came again with another date, beside the old ones at the registry."""
    registry = "example-cancer-registry"
    bundle = collection(person("1", "Aalders", "1950-01-01"), condition("c1", "1", "2025-02-20"))
    before = process(offline_chains(registry, tmp_path / "k"), bundle)
    KeyStore.load(tmp_path / "k" / "ttp-keys").rotate(registry)
    after = process(offline_chains(registry, tmp_path / "k"), bundle)
    (old,), (new,) = delivered(before, "Patient"), delivered(after, "Patient")
    assert old["identifier"] != new["identifier"]  # the pseudonyms did change (v1 → v2)
    assert {i["value"][:3] for i in new["identifier"]} == {"v2."}
    (was,), (now,) = delivered(before, "Condition"), delivered(after, "Condition")
    assert was["id"] == now["id"] and was["onsetDateTime"] == now["onsetDateTime"] != "2025-02-20"


def _profile_keeping_encounters(folder: Path) -> Path:
    raw = yaml.safe_load((REPO_ROOT / "profiles" / "example-cancer-registry.yaml").read_text())
    raw["resources"]["Encounter"] = ["status", "class", "subject", "period"]
    raw["resources"]["Observation"] += ["encounter"]
    folder.mkdir()
    (folder / "cancer.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_a_resource_tied_to_its_patient_through_another_gets_that_patients_shift(tmp_path: Path) -> None:
    """An Observation without a subject, made in the patient's Encounter, got a bundle-wide offset when
    another patient was in the bundle: its date no longer lined up with the rest of its patient's data."""
    chains = offline_chains(
        "example-cancer-registry", tmp_path / "k", profiles_dir=_profile_keeping_encounters(tmp_path / "p")
    )
    seen = visit(period={"start": "2025-03-01"})
    measured = measurement(encounter={"reference": "Encounter/e1"}, effectiveDateTime="2025-03-01")
    alone = process(chains, collection(person("1", "Aalders", "1950-01-01"), seen, measured))
    together = process(
        chains,
        collection(person("1", "Aalders", "1950-01-01"), person("2", "Bakker", "1960-06-06"), seen, measured),
    )
    for processed in (alone, together):
        (encounter,), (observation,) = delivered(processed, "Encounter"), delivered(processed, "Observation")
        assert observation["effectiveDateTime"] == encounter["period"]["start"] != "2025-03-01"
    assert delivered(alone, "Observation") == delivered(together, "Observation")


def test_what_the_profile_cuts_off_from_its_patient_is_not_delivered(tmp_path: Path) -> None:
    """The cancer profile keeps neither Encounter nor Observation.encounter: an Observation tied to its
    patient only through an Encounter went out with no reference at all, whoever's it was."""
    chains = offline_chains("example-cancer-registry", tmp_path / "k")
    measured = measurement(encounter={"reference": "Encounter/e1"})
    processed = process(chains, collection(person("1", "Aalders", "1950-01-01"), visit(), measured))
    assert delivered(processed, "Observation") == []
    dropped = processed.report["deidentification"]["dropped"]
    assert dropped["not-linked-to-a-patient"] == {"Observation": 1}


def test_the_resources_of_a_patient_left_out_by_de_identification_are_not_delivered(tmp_path: Path) -> None:
    """A Patient with a modifier extension the profile does not know is not delivered; its Observation went
    out with its subject cut off."""
    chains = offline_chains("example-generic", tmp_path / "k")
    odd = person(
        "1",
        "Aalders",
        "1950-01-01",
        modifierExtension=[{"url": "http://ehr.example.org/x", "valueBoolean": True}],
    )
    measured = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/1"},
    }
    processed = process(chains, collection(odd, measured))
    # nothing is left: no Bundle at all (a re-probe saw an empty transaction forwarded as "delivered")
    assert processed.bundle is None
    assert processed.report["deidentification"]["dropped"]["not-linked-to-a-patient"] == {"Observation": 1}


def test_the_role_of_a_delivered_professional_is_delivered_with_its_organisation(tmp_path: Path) -> None:
    """A re-probe: a PractitionerRole (the specialty, the hospital) of the Practitioner who performed a
    Procedure was dropped as not linked: it refers to the Practitioner, nothing refers to it."""
    chains = offline_chains("example-generic", tmp_path / "k")
    surgery = {
        "resourceType": "Procedure",
        "id": "pr1",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "80146002"}]},
        "subject": {"reference": "Patient/1"},
        "performer": [{"actor": {"reference": "Practitioner/dr1"}}],
    }
    surgeon = {
        "resourceType": "Practitioner",
        "id": "dr1",
        "identifier": [{"system": BIG, "value": "19012345601"}],
    }
    role = {
        "resourceType": "PractitionerRole",
        "id": "role1",
        "practitioner": {"reference": "Practitioner/dr1"},
        "organization": {"reference": "Organization/h1"},
        "specialty": [{"coding": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.7", "code": "0303"}]}],
    }
    hospital = {"resourceType": "Organization", "id": "h1", "name": "Ziekenhuis Oost"}
    stray = {"resourceType": "Organization", "id": "h2", "name": "Nobody refers to me"}
    # no subject: a shared type refers to it, but it is no shared resource itself
    measured = measurement(performer=[{"reference": "Practitioner/dr1"}])
    bundle = collection(
        person("1", "Aalders", "1950-01-01"), surgery, surgeon, role, hospital, stray, measured
    )
    processed = process(chains, bundle)
    kinds = sorted(e["resource"]["resourceType"] for e in processed.bundle["entry"])
    assert kinds == ["Patient", "Practitioner", "PractitionerRole", "Procedure", "Provenance"]
    # the role brings nothing along (see the test below): its Organization goes only when the patient's
    # data names it; the role's reference to it is left out
    (kept_role,) = delivered(processed, "PractitionerRole")
    assert "organization" not in kept_role and kept_role["specialty"]
    assert processed.report["resourcesDroppedByReason"]["not-linked-to-a-patient"] == {
        "Organization": 2,
        "Observation": 1,
    }


def objector_with_implant() -> list[dict[str, Any]]:
    """Patient 2, who objects, and their implant `dx` (lot LOT-OBJ-77), named only by their Procedure."""
    deny = {
        "resourceType": "Consent",
        "id": "c2",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/2"},
        "provision": {"type": "deny"},
    }
    implant = {"resourceType": "Device", "id": "dx", "lotNumber": "LOT-OBJ-77"}
    placed = {
        "resourceType": "Procedure",
        "id": "px",
        "status": "completed",
        "subject": {"reference": "Patient/2"},
        "usedReference": [{"reference": "Device/dx"}],
    }
    return [person("2", "Zwartkruisvermeulen", "1960-06-06"), deny, implant, placed]


def test_a_shared_resource_pulled_in_brings_nothing_of_an_objector_along(tmp_path: Path) -> None:
    """A third probe: a Device owned by a delivered Organization, its `parent` the implant of an objecting
    patient (named only in that patient's Procedure), took the implant's lot number to the registry."""
    chains = offline_chains("example-generic", tmp_path / "k")
    bridge = {
        "resourceType": "Device",
        "id": "d2",
        "owner": {"reference": "Organization/org1"},
        "parent": {"reference": "Device/dx"},
    }
    hospital = {"resourceType": "Organization", "id": "org1", "name": "Ziekenhuis Oost"}
    seen = visit(serviceProvider={"reference": "Organization/org1"})
    bundle = collection(
        person("1", "Aalders", "1950-01-01"), *objector_with_implant(), bridge, hospital, seen
    )
    processed = process(chains, bundle)
    text = orjson.dumps(processed.bundle).decode()
    assert "LOT-OBJ-77" not in text and processed.report["patientsDroppedOptOut"] == 1
    (kept_bridge,) = [d for d in delivered(processed, "Device")]
    assert "parent" not in kept_bridge


def _onset(processed: Any) -> str:
    (found,) = delivered(processed, "Condition")
    return found["onsetDateTime"]


def test_one_person_is_shifted_alike_at_every_hospital_and_whatever_is_missing(tmp_path: Path) -> None:
    """A re-probe: the offset was keyed on the hospital's own key (two hospitals, two offsets for one
    person the registry links by pseudonym), and on the first pseudonym made (a delivery without the
    birth name moved the same Condition to another date)."""
    registry = "example-cancer-registry"
    first = offline_chains(registry, tmp_path / "k")
    second = replace(first, provider=replace(first.provider, provider="ura:00000002"))
    bundle = collection(person("1", "Aalders", "1950-01-01"), condition("c1", "1", "2024-03-10"))
    nameless = collection(
        {k: v for k, v in person("1", "Aalders", "1950-01-01").items() if k != "name"},
        condition("c1", "1", "2024-03-10"),
    )
    at_first, at_second = process(first, bundle), process(second, bundle)
    assert delivered(at_first, "Condition")[0]["id"] != delivered(at_second, "Condition")[0]["id"]
    assert _onset(at_first) == _onset(at_second) == _onset(process(first, nameless)) != "2024-03-10"


def test_what_a_patients_resource_refers_to_gets_that_patients_shift(tmp_path: Path) -> None:
    """A re-probe: a DiagnosticReport's result without a subject got a per-Bundle offset when another
    patient was in the Bundle, so its date moved apart from its report's; a shared Medication's dates
    changed from Bundle to Bundle."""
    raw = yaml.safe_load((REPO_ROOT / "profiles" / "example-cancer-registry.yaml").read_text())
    raw["resources"]["DiagnosticReport"] = ["status", "code", "subject", "effective[x]", "result"]
    raw["resources"]["Medication"] = ["code", "batch"]
    raw["resources"]["MedicationStatement"] = ["status", "medication[x]", "subject", "effective[x]"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "shift.yaml").write_text(yaml.safe_dump(raw))
    chains = offline_chains("example-cancer-registry", tmp_path / "k", profiles_dir=tmp_path / "p")
    loinc = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}
    report = {
        "resourceType": "DiagnosticReport",
        "id": "r1",
        "status": "final",
        "code": loinc,
        "subject": {"reference": "Patient/1"},
        "effectiveDateTime": "2024-09-01",
        "result": [{"reference": "Observation/o1"}],
    }
    result = {"resourceType": "Observation", "id": "o1", "status": "final", "code": loinc,
              "effectiveDateTime": "2024-09-01"}  # fmt: skip
    drug = {"resourceType": "Medication", "id": "m1", "batch": {"expirationDate": "2026-01-31"}}
    taken = {"resourceType": "MedicationStatement", "id": "ms", "status": "active",
             "medicationReference": {"reference": "Medication/m1"}, "subject": {"reference": "Patient/1"},
             "effectiveDateTime": "2024-09-01"}  # fmt: skip
    common = [person("1", "Aalders", "1950-01-01"), report, result, drug, taken]
    alone = process(chains, collection(*common))
    with_another = process(chains, collection(person("2", "Bakker", "1960-06-06"), *common))
    for processed in (alone, with_another):
        (dated,), (measured,) = delivered(processed, "DiagnosticReport"), delivered(processed, "Observation")
        assert measured["effectiveDateTime"] == dated["effectiveDateTime"] != "2024-09-01"
    assert delivered(alone, "Observation") == delivered(with_another, "Observation")
    assert delivered(alone, "Medication") == delivered(with_another, "Medication")


def test_what_a_shared_resource_refers_to_goes_only_if_no_other_patient_names_it(tmp_path: Path) -> None:
    """A fourth probe: A's Observation names Device d2, whose `parent` is Device dx, an objector's implant
    that only the objector's Procedure names: the implant's lot number went along through d2."""
    chains = offline_chains("example-generic", tmp_path / "k")
    monitor = {"resourceType": "Device", "id": "d2", "parent": {"reference": "Device/dx"}}
    measured = measurement(subject={"reference": "Patient/1"}, device={"reference": "Device/d2"})
    bundle = collection(person("1", "Aalders", "1950-01-01"), *objector_with_implant(), monitor, measured)
    processed = process(chains, bundle)
    assert "LOT-OBJ-77" not in orjson.dumps(processed.bundle).decode()
    (kept_monitor,) = delivered(processed, "Device")
    assert "parent" not in kept_monitor and delivered(processed, "Observation")


def test_a_resource_about_something_outside_the_bundle_is_not_delivered_as_a_patients(tmp_path: Path) -> None:
    """A fourth probe: an Observation about a Group not in the Bundle, made during patient 1's Encounter,
    went to the registry without its subject, as patient 1's data."""
    chains = offline_chains("example-generic", tmp_path / "k")
    about_group = measurement(subject={"reference": "Group/g1"}, encounter={"reference": "Encounter/e1"})
    own = {**measurement(subject={"reference": "Patient/1"}), "id": "o2"}
    processed = process(chains, collection(person("1", "Aalders", "1950-01-01"), visit(), about_group, own))
    assert [o["subject"]["reference"] for o in delivered(processed, "Observation")] == [
        delivered(processed, "Encounter")[0]["subject"]["reference"]
    ]
    assert processed.report["resourcesDroppedByReason"] == {"subject-not-a-patient": {"Observation": 1}}
    # a re-probe: the same with the Group in the Bundle (a type the profile does not take)
    group = {"resourceType": "Group", "id": "g1", "type": "person", "actual": True}
    processed = process(
        chains, collection(person("1", "Aalders", "1950-01-01"), visit(), about_group, own, group)
    )
    assert len(delivered(processed, "Observation")) == 1
    assert processed.report["resourcesDroppedByReason"]["subject-not-a-patient"] == {"Observation": 1}


def test_a_surname_in_a_terminology_display_stops_the_bundle_a_given_name_does_not(tmp_path: Path) -> None:
    """A privacy probe: "Kwakkelsteen" typed into a SNOMED display reached the registry (one-word names were
    not sought in a terminology's display). Removing such a display instead was tried: removed only where
    a patient's name is in it, its absence told the registry that the name is a word of the term (a
    re-probe). A surname there now stops the Bundle; a given name alone is a term's word ("Iris")."""
    import pytest

    from gateway.outcome import FhirError

    chains = offline_chains("example-generic", tmp_path / "k")
    patient = person("1", "Kwakkelsteen", "1961-07-14")
    patient["name"][0]["given"] = ["Iris"]
    for display in ("Kwakkelsteen tumour", "KwakkelsteenSyndrome"):
        coding = {"system": "http://snomed.info/sct", "code": "363358000", "display": display}
        named = {**condition("c1", "1", "2024-01-01"), "code": {"coding": [coding]}}
        with pytest.raises(FhirError) as refused:
            process(chains, collection(patient, named))
        assert refused.value.status == 422
        assert refused.value.issues[0].expression == ("Bundle.entry[1].resource.code.coding[0].display",)
        assert "Kwakkelsteen" not in str(refused.value.issues)
    iris = {"system": "http://snomed.info/sct", "code": "41296002", "display": "Iris structure"}
    site = {**condition("c2", "1", "2024-01-01"), "bodySite": [{"coding": [iris]}]}
    (delivered_site,) = delivered(process(chains, collection(patient, site)), "Condition")
    assert delivered_site["bodySite"][0]["coding"][0]["display"] == "Iris structure"
