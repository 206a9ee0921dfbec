"""A bulk delivery keeps the promises of a posted Bundle across its groups and slices: an objecting patient's
data never travels with another patient's, a place at a patient's home is generalised in every Bundle that
carries it, a leak costs the line it is in and nothing else. Each case is a probe of a fresh-eyes privacy test
that got through before its fix; the posted-Bundle cases at the end came from the same probe."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.bulk import BulkOptions, SourceError, run_bulk
from gateway.bulk.chains import offline_chains
from gateway.bulk.job import StopAfter
from gateway.outcome import FhirError

REGISTRY = "example-generic"
MRN = "http://ehr.example.org/mrn"
LOINC = "http://loinc.org"


def patient(pid: str, family: str, given: str, street: str, postcode: str, city: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": MRN, "value": f"MRN-{pid.upper()}"}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1955-03-14",
        "address": [{"line": [street], "city": city, "postalCode": postcode}],
    }


def objection(cid: str, who: dict) -> dict:
    """A denying research Consent (as gateway/bulk/synth.py writes them) naming its patient by `who`."""
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": who,
        "provision": {"type": "deny"},
    }


def observation(oid: str, value: float, **links: Any) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "valueQuantity": {"value": value, "unit": "/min"},
        **links,
    }


def encounter(eid: str, pid: str, location: str | None = None) -> dict:
    out = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if location:
        out["location"] = [{"location": {"reference": f"Location/{location}"}}]
    return out


def ref(target: str) -> dict:
    return {"reference": target}


ALICE = patient("pa", "Aalders", "Anna", "Beukenlaan 3", "1234 AB", "Zwolle")
CAROL = patient("pc", "Claessens", "Carla", "Lindelaan 8", "3811 AB", "Amersfoort")


def others(n: int) -> list[dict]:
    """Patients between the ones a test is about, so that those land in different groups and slices."""
    return [
        patient(f"px{i:02d}", "Pietersen", "Piet", f"Dorpsstraat {i}", "9999 ZZ", "Assen") for i in range(n)
    ]


def deliver(tmp_path: Path, resources: list[dict], **options: Any) -> tuple[Any, list[dict]]:
    export = tmp_path / "export"
    export.mkdir(parents=True)
    by_type: dict[str, list[bytes]] = defaultdict(list)
    for resource in resources:
        by_type[resource["resourceType"]].append(orjson.dumps(resource))
    for rtype, lines in by_type.items():
        (export / f"{rtype}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    summary = run_bulk(
        [export],
        registry=REGISTRY,
        work_dir=tmp_path / "work",
        to_dir=tmp_path / "out",
        options=BulkOptions(workers=0, **options),
    )
    return summary, list(_delivered(tmp_path / "out"))


def _delivered(folder: Path) -> Iterator[dict]:
    for path in sorted(folder.glob("*.json")):
        for entry in orjson.loads(path.read_bytes())["entry"]:
            yield entry["resource"]


def values(resources: list[dict], rtype: str) -> list[float]:
    return sorted(r["valueQuantity"]["value"] for r in resources if r["resourceType"] == rtype)


def test_a_resource_that_reaches_an_objecting_patient_is_not_delivered_from_another_group(
    tmp_path: Path,
) -> None:
    """Carol objects and is in another group (and slice) than Alice. Each of these reaches Carol through a
    reference, and went out with Alice's group, her references cut off."""
    resources = [
        ALICE,
        *others(12),
        CAROL,
        objection("cc", ref("Patient/pc")),
        encounter("ec", "pc"),
        observation("oa", 1.0, subject=ref("Patient/pa")),
        observation("oc", 2.0, subject=ref("Patient/pc")),
        # Alice's, but its evidence is Carol's Observation
        observation("mix-evidence", 3.0, subject=ref("Patient/pa"), derivedFrom=[ref("Observation/oc")]),
        # no subject: Carol's Encounter and Alice's Observation
        observation("mix-members", 4.0, encounter=ref("Encounter/ec"), hasMember=[ref("Observation/oa")]),
        # four hops from Carol's Encounter, then one of Alice's derived from the last
        observation("hop1", 5.0, encounter=ref("Encounter/ec")),
        *(observation(f"hop{i}", 5.0 + i, hasMember=[ref(f"Observation/hop{i - 1}")]) for i in range(2, 5)),
        observation("from-hops", 10.0, subject=ref("Patient/pa"), derivedFrom=[ref("Observation/hop4")]),
    ]
    summary, delivered = deliver(tmp_path, resources, group_size=5)
    assert values(delivered, "Observation") == [1.0]  # Alice's own Observation only
    assert summary.patients_opted_out == 1
    # oc and the four hops are Carol's; mix-evidence, mix-members and from-hops reach her too. Alice and
    # Carol travel together (one slice), where Carol's objection takes all eight, as in a posted Bundle.
    assert summary.dropped == {"opted-out": {"Observation": 8, "Patient": 1, "Consent": 1, "Encounter": 1}}


def _birth(mother_objects: bool = False, baby_objects: bool = False) -> list[dict]:
    """A mother and her newborn, far apart in the export; the newborn's Encounter is `partOf` the mother's
    delivery Encounter, and an Observation of the newborn is made in it."""
    baby = patient("pb", "Claessens", "Baby", "Lindelaan 8", "3811 AB", "Amersfoort")
    born = encounter("eb", "pb") | {"partOf": ref("Encounter/ec")}
    consents = [objection("cc", ref("Patient/pc"))] * mother_objects + [
        objection("cb", ref("Patient/pb"))
    ] * baby_objects
    return [
        CAROL,
        *others(12),
        ALICE,
        baby,
        *consents,
        encounter("ec", "pc"),
        born,
        observation("oc", 1.0, subject=ref("Patient/pc"), encounter=ref("Encounter/ec")),
        observation("ob", 2.0, subject=ref("Patient/pb"), encounter=ref("Encounter/eb")),
        observation("ob2", 3.0, subject=ref("Patient/pb")),
    ]


def test_a_mother_and_her_newborn_travel_together_and_go_unless_one_objects(tmp_path: Path) -> None:
    """The newborn's Encounter `partOf` the mother's reached both patients: it was never delivered
    (`several-patients`), and took the newborn's Observation made in it along, although neither objected."""
    summary, delivered = deliver(tmp_path, _birth(), group_size=5)
    assert summary.dropped == {} and summary.invalid_lines == []
    assert values(delivered, "Observation") == [1.0, 2.0, 3.0]
    (bundle,) = [
        orjson.loads(p.read_bytes())
        for p in sorted((tmp_path / "out").glob("*.json"))
        if b'"partOf"' in p.read_bytes()
    ]
    urls = {e["fullUrl"] for e in bundle["entry"]}
    born = next(e["resource"] for e in bundle["entry"] if "partOf" in e["resource"])
    assert born["partOf"]["reference"] in urls  # the mother's Encounter is in the same Bundle


@pytest.mark.parametrize("who", ["mother", "baby"])
def test_an_objection_of_the_mother_or_the_newborn_takes_what_they_share(tmp_path: Path, who: str) -> None:
    summary, delivered = deliver(tmp_path, _birth(**{f"{who}_objects": True}), group_size=5)
    # the mother's: her Observation (1.0), and the newborn's made in her delivery Encounter (2.0)
    # the newborn's: both of its Observations; the mother's own stays
    assert values(delivered, "Observation") == ([3.0] if who == "mother" else [1.0])
    assert summary.patients_opted_out == 1 and "several-patients" not in summary.dropped
    assert sum(r["resourceType"] == "Patient" for r in delivered) == 14


def test_a_resource_naming_more_patients_than_a_family_is_not_delivered(tmp_path: Path) -> None:
    """A resource joining more patients than MAX_FAMILY does not bring them together: it is reported."""
    ward = [patient(f"pw{i}", "Wardema", "Wim", f"Ringweg {i}", "1000 AA", "Ede") for i in range(10)]
    rounds = observation("rounds", 9.0, focus=[ref(f"Patient/pw{i}") for i in range(10)])
    summary, delivered = deliver(
        tmp_path, [*ward, rounds, observation("o0", 1.0, subject=ref("Patient/pw0"))], group_size=3
    )
    assert summary.dropped == {"several-patients": {"Observation": 1}}
    assert values(delivered, "Observation") == [1.0]


def test_a_shared_place_at_a_patients_home_is_generalised_in_every_bundle(tmp_path: Path) -> None:
    """A Location at Carol's home, used by Carol's and by Alice's Encounter in another group, went to the
    registry with the full address in Alice's Bundle (the copies upsert one resource there)."""
    home = {"resourceType": "Location", "id": "home-c", "name": "Thuislocatie"}
    home["address"] = {"line": ["Lindelaan 8"], "city": "Amersfoort", "postalCode": "3811 AB"}
    clinic = {"resourceType": "Location", "id": "clinic", "name": "Polikliniek"}
    clinic["address"] = {"line": ["Ziekenhuisweg 1"], "city": "Utrecht", "postalCode": "3584 CX"}
    resources = [
        CAROL,
        *others(12),
        ALICE,
        encounter("ec", "pc", location="home-c"),
        encounter("ea", "pa", location="home-c"),
        encounter("ea2", "pa", location="clinic"),
        home,
        clinic,
    ]
    summary, delivered = deliver(tmp_path, resources, group_size=5)
    assert summary.groups_total == 3
    places = [r for r in delivered if r["resourceType"] == "Location"]
    # a place at a home loses its name as well (a later probe: a name can be the street and number)
    at_home = [p["address"] for p in places if "name" not in p]
    assert len(at_home) == 2 and all(a == {"postalCode": "3811"} for a in at_home)  # one copy per group
    assert [p["address"]["city"] for p in places if p.get("name") == "Polikliniek"] == ["Utrecht"]  # public


def test_a_leak_costs_the_line_it_is_in_not_another_patients_consent(tmp_path: Path) -> None:
    """The leak gate named the entry by its place in the de-identified Bundle, which bulk read as a place in
    its input: it dropped Carol's Consent instead, and delivered Carol."""
    resources = [
        ALICE,
        CAROL,
        objection("cc", ref("Patient/pc")),
        observation("oa", 1.0, subject=ref("Patient/pa")),
        observation("oa-named", 2.0, subject=ref("Patient/pa")),
        observation("oc", 3.0, subject=ref("Patient/pc")),
    ]
    resources[4]["valueQuantity"]["unit"] = "Anna Aalders"
    summary, delivered = deliver(tmp_path, resources)
    assert values(delivered, "Observation") == [1.0]
    assert [r["resourceType"] for r in delivered].count("Patient") == 1
    assert summary.patients_opted_out == 1
    rejected = [(file, reason) for file, _, reason in summary.invalid_lines]
    assert rejected == [("Observation.ndjson", "rejected-security")]


def test_a_consent_line_that_is_rejected_withholds_its_patient(tmp_path: Path) -> None:
    """Dropping an invalid Consent and delivering the rest made its patient deliverable (failed open)."""
    broken = objection("cc", ref("Patient/pc")) | {"dateTime": "2024-13-01"}
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, broken, observation("oc", 3.0, subject=ref("Patient/pc"))]
    )
    assert values(delivered, "Observation") == []
    assert sum(r["resourceType"] == "Patient" for r in delivered) == 1  # Alice only
    assert summary.patients_unknown_optout == 1
    assert summary.dropped["opt-out-unknown"] == {"Patient": 1, "Observation": 1}


def test_a_consent_naming_its_patient_by_identifier_is_applied(tmp_path: Path) -> None:
    """Pass 1 only followed `reference`s: the Consent stayed unattached and Carol was delivered."""
    by_mrn = {"identifier": {"system": MRN, "value": "MRN-PC"}}
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, objection("cc", by_mrn), observation("oc", 3.0, subject=ref("Patient/pc"))]
    )
    assert sum(r["resourceType"] == "Patient" for r in delivered) == 1
    assert values(delivered, "Observation") == []
    assert summary.patients_opted_out == 1


@pytest.mark.parametrize(
    "who",
    [
        {"reference": "patient/pc"},
        {"display": "Carla Claessens"},
        {"identifier": {"system": MRN}},
        # matching no Patient of the export: a near miss (a second probe: the objector was delivered)
        {"identifier": {"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "MRN-PC"}},
        {"reference": "Patient/PC"},
    ],
)
def test_a_consent_that_names_no_patient_that_can_be_followed_stops_the_job(
    tmp_path: Path, who: dict
) -> None:
    """Whose objection it is cannot be known: nothing is delivered (a posted Bundle with it is refused)."""
    with pytest.raises(SourceError) as raised:
        deliver(tmp_path, [ALICE, CAROL, objection("cc", who)])
    assert "Consent.ndjson line 1" in str(raised.value) and "Claessens" not in str(raised.value)
    assert not list((tmp_path / "out").glob("*.json"))
    assert not (tmp_path / "work" / "index.db").exists()  # it names the export's files


def test_unreadable_lines_in_the_consent_file_stop_the_job(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_bytes(orjson.dumps(ALICE) + b"\n")
    (export / "Consent.ndjson").write_bytes(b'{"resourceType": "Consent", broken\n')
    with pytest.raises(SourceError, match="Consent.ndjson line 1"):
        run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")


def test_shared_resources_referenced_by_urn_uuid_travel_with_their_group(tmp_path: Path) -> None:
    """Synthea's bundles, cut into NDJSON, point at Practitioners by `urn:uuid:`: pass 1 keyed those by
    `Type/id` only, so they never joined a group and nearly every line came back rejected."""
    practitioner_id = "0000016d-3a85-4cca-0000-000000000b2a"
    practitioner = {"resourceType": "Practitioner", "id": practitioner_id, "gender": "male"}
    enc = encounter("ea", "pa") | {"participant": [{"individual": ref(f"urn:uuid:{practitioner_id}")}]}
    summary, delivered = deliver(tmp_path, [ALICE, enc, practitioner])
    assert summary.sent == {"Patient": 1, "Encounter": 1, "Practitioner": 1, "Provenance": 1}
    assert summary.invalid_lines == []
    assert sum(r["resourceType"] == "Practitioner" for r in delivered) == 1


def _process(bundle: dict, tmp_path: Path) -> Any:
    chains = offline_chains(REGISTRY, tmp_path)
    return asyncio.run(chains.process(bundle, recorded="2026-01-01T00:00:00Z"))


def _posted(*resources: dict) -> dict:
    """A transaction Bundle of copies of `resources`, their `Type/id` references turned into fullUrls."""
    copies = orjson.loads(orjson.dumps(resources))
    urls = {
        f"{r['resourceType']}/{r['id']}": f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        for n, r in enumerate(copies)
    }
    entries = [{"fullUrl": urls[f"{r['resourceType']}/{r['id']}"], "resource": r} for r in copies]
    for entry in entries:
        for node in _references(entry["resource"]):
            node["reference"] = urls[node["reference"]]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _references(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str) and "/" in node["reference"]:
            yield node
        for value in node.values():
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


def test_a_posted_leak_is_named_by_the_entry_the_sender_wrote(tmp_path: Path) -> None:
    named = observation("oa-named", 2.0, subject=ref("Patient/pa"))
    named["valueQuantity"]["unit"] = "Anna Aalders"
    bundle = _posted(
        objection("cc", ref("Patient/pc")),
        CAROL,
        ALICE,
        observation("oa", 1.0, subject=ref("Patient/pa")),
        named,
    )
    with pytest.raises(FhirError) as raised:
        _process(bundle, tmp_path)
    assert raised.value.status == 422
    # entry 4 of the posted Bundle (in the de-identified one, without Carol's three, it was entry 2)
    assert [i.expression for i in raised.value.issues] == [("Bundle.entry[4].resource.valueQuantity.unit",)]


def test_an_objecting_patients_name_in_another_patients_resource_is_found(tmp_path: Path) -> None:
    """The gate sought only the delivered patients' values: Carol objected, so hers went unsought."""
    told = observation("oa", 1.0, subject=ref("Patient/pa"))
    told["valueQuantity"]["unit"] = "Carla Claessens"
    with pytest.raises(FhirError) as raised:
        _process(_posted(objection("cc", ref("Patient/pc")), CAROL, ALICE, told), tmp_path)
    assert [i.code for i in raised.value.issues] == ["security"]
    assert raised.value.issues[0].expression == ("Bundle.entry[3].resource.valueQuantity.unit",)


def test_a_place_at_an_objecting_patients_home_is_generalised(tmp_path: Path) -> None:
    home = {"resourceType": "Location", "id": "home-c", "name": "Thuislocatie"}
    home["address"] = {"line": ["Lindelaan 8"], "city": "Amersfoort", "postalCode": "3811 AB"}
    bundle = _posted(objection("cc", ref("Patient/pc")), CAROL, ALICE, encounter("ea", "pa", "home-c"), home)
    processed = _process(bundle, tmp_path)
    places = [e["resource"] for e in processed.bundle["entry"] if e["resource"]["resourceType"] == "Location"]
    assert [p["address"] for p in places] == [{"postalCode": "3811"}]


def test_an_allowed_patients_resource_listed_by_a_dropped_one_is_kept(tmp_path: Path) -> None:
    """A report listing Alice's and Carol's results goes with Carol's objection; Alice's Observation, which
    only that report referred to, went with it (dropped as if it were there for Carol)."""
    report = {
        "resourceType": "DiagnosticReport",
        "id": "both",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "24323-8"}]},
        "result": [ref("Observation/oa"), ref("Observation/oc")],
    }
    bundle = _posted(
        objection("cc", ref("Patient/pc")),
        CAROL,
        ALICE,
        observation("oa", 1.0, subject=ref("Patient/pa")),
        observation("oc", 2.0, subject=ref("Patient/pc")),
        report,
    )
    processed = _process(bundle, tmp_path)
    kept = [e["resource"] for e in processed.bundle["entry"]]
    assert values(kept, "Observation") == [1.0]
    assert "DiagnosticReport" not in {r["resourceType"] for r in kept}


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it(tmp_path: Path) -> None:
    """The first Patient of a file saved with a BOM was reported malformed, and their resources orphans."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_bytes(b"\xef\xbb\xbf" + orjson.dumps(ALICE) + b"\r\n")
    (export / "Observation.ndjson").write_bytes(
        orjson.dumps(observation("oa", 1.0, subject=ref("Patient/pa")))
    )
    summary = run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")
    assert summary.invalid_lines == [] and summary.sent["Patient"] == 1 and summary.sent["Observation"] == 1


def test_a_shared_resource_only_an_objector_referred_to_is_reported_not_sent(tmp_path: Path) -> None:
    """Counted as sent when its group was read (it was not: the chain dropped it with the objector's data),
    it was neither sent nor dropped in the summary."""
    practitioners = [{"resourceType": "Practitioner", "id": p, "gender": "male"} for p in ("pr-a", "pr-c")]
    resources = [
        ALICE,
        CAROL,
        objection("cc", ref("Patient/pc")),
        encounter("ea", "pa") | {"participant": [{"individual": ref("Practitioner/pr-a")}]},
        encounter("ec", "pc") | {"participant": [{"individual": ref("Practitioner/pr-c")}]},
        *practitioners,
    ]
    summary, delivered = deliver(tmp_path, resources)
    assert summary.sent["Practitioner"] == 1
    assert summary.dropped["shared-not-referenced"] == {"Practitioner": 1}
    assert [r["gender"] for r in delivered if r["resourceType"] == "Practitioner"] == ["male"]


def test_a_consent_names_its_patient_by_consent_patient_only(tmp_path: Path) -> None:
    """A parent who is a patient too signs as performer: it named two patients, which stopped the job."""
    signed = objection("cc", ref("Patient/pc")) | {"performer": [ref("Patient/pa")]}
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, signed, observation("oc", 3.0, subject=ref("Patient/pc"))]
    )
    assert summary.patients_opted_out == 1
    assert [r["resourceType"] for r in delivered].count("Patient") == 1 and values(
        delivered, "Observation"
    ) == []


def test_a_consent_naming_its_patient_by_an_identifier_value_alone_is_applied(tmp_path: Path) -> None:
    by_value = {"identifier": {"value": "MRN-PC"}}
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, objection("cc", by_value), observation("oc", 3.0, subject=ref("Patient/pc"))]
    )
    assert summary.patients_opted_out == 1 and values(delivered, "Observation") == []


def test_a_consent_line_the_chain_cannot_read_withholds_its_patient(tmp_path: Path) -> None:
    """A line pass 1 reads (orjson takes the last of two equal keys) but the chain refuses: it was dropped
    as an invalid line, and its patient delivered as if they had not objected."""
    twice = orjson.dumps(objection("cc", ref("Patient/pc")))[:-1] + b',"status":"active"}'
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_bytes(orjson.dumps(ALICE) + b"\n" + orjson.dumps(CAROL))
    (export / "Consent.ndjson").write_bytes(twice)
    (export / "Observation.ndjson").write_bytes(
        orjson.dumps(observation("oc", 3.0, subject=ref("Patient/pc")))
    )
    summary = run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")
    assert summary.patients_unknown_optout == 1
    assert summary.sent["Patient"] == 1 and "Observation" not in summary.sent


@pytest.mark.parametrize("name", ["export.ndjson", "consent.ndjson", "Consent_2025.ndjson"])
def test_an_unreadable_line_that_may_be_a_consent_stops_the_job(tmp_path: Path, name: str) -> None:
    """Only a file named exactly after Consent counted; an upload is one file of every type."""
    export = tmp_path / "export"
    export.mkdir()
    line = orjson.dumps(objection("cc", ref("Patient/pc")))[:60]  # cut off
    (export / name).write_bytes(orjson.dumps(ALICE) + b"\n" + orjson.dumps(CAROL) + b"\n" + line + b"\n")
    with pytest.raises(SourceError, match="line 3"):
        run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")


@pytest.mark.parametrize("where", ["first", "last"])
def test_an_objection_in_a_line_too_long_stops_the_job(tmp_path: Path, where: str) -> None:
    """A Consent with a scanned form attached was over the line limit: reported `line-too-long`, its
    objection never read, and its patient delivered. Where `resourceType` comes is the exporter's choice."""
    export = tmp_path / "export"
    export.mkdir()
    form = {"sourceAttachment": {"contentType": "application/pdf", "data": "QUJD" * 800_000}}
    consent = objection("cc", ref("Patient/pc"))
    consent = consent | form if where == "first" else form | {k: v for k, v in consent.items()}
    if where == "last":
        consent["resourceType"] = consent.pop("resourceType")
    lines = [orjson.dumps(ALICE), orjson.dumps(CAROL), orjson.dumps(consent)]
    (export / "export.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    options = BulkOptions(workers=0, max_line_bytes=64 * 1024)
    with pytest.raises(SourceError, match="line 3"):
        run_bulk(
            [export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out", options=options
        )


def test_a_urn_uuid_reference_to_a_resource_left_out_of_the_export_is_dropped(tmp_path: Path) -> None:
    """A Synthea export without its Practitioners (a `_type` filter): every line naming one by urn:uuid was
    rejected, a Patient with it as general practitioner with all their data."""
    gp = {"generalPractitioner": [ref("urn:uuid:0000016d-3a85-4cca-0000-000000000b2a")]}
    enc = encounter("ea", "pa") | {
        "participant": [{"individual": ref("urn:uuid:0000016d-3a85-4cca-0000-0000000000ff")}]
    }
    summary, delivered = deliver(tmp_path, [ALICE | gp, enc])
    assert summary.invalid_lines == [] and summary.sent["Patient"] == 1 and summary.sent["Encounter"] == 1
    assert not any("participant" in r or "generalPractitioner" in r for r in delivered)


def _duplicate_records() -> tuple[dict, dict]:
    """Carol's record and a duplicate with the same numbers (the TTP gives both the same pseudonyms)."""
    return CAROL, CAROL | {"id": "pc-dup"}


def _linked_records() -> tuple[dict, dict]:
    """Carol's record linking to her older one, which has another number (merged records)."""
    old = CAROL | {"id": "pc-old", "identifier": [{"system": MRN, "value": "MRN-OLD-7"}]}
    current = CAROL | {"link": [{"other": ref("Patient/pc-old"), "type": "replaces"}]}
    return current, old


RECORD_PAIRS = pytest.mark.parametrize(
    "records", [_duplicate_records, _linked_records], ids=["duplicate", "linked"]
)


@RECORD_PAIRS
def test_an_objection_on_one_record_of_a_person_holds_for_the_other(tmp_path: Path, records: Any) -> None:
    """The registry would link the other record's data to the person who objected on the first."""
    first, other = records()
    bundle = _posted(
        objection("cc", ref("Patient/pc")),
        first,
        other,
        ALICE,
        observation("oc", 2.0, subject=ref(f"Patient/{other['id']}")),
        observation("oa", 1.0, subject=ref("Patient/pa")),
    )
    processed = _process(bundle, tmp_path)
    kept = [e["resource"] for e in processed.bundle["entry"]]
    assert values(kept, "Observation") == [1.0] and [r["resourceType"] for r in kept].count("Patient") == 1
    assert processed.report["patientsDroppedOptOut"] == 2


@RECORD_PAIRS
def test_the_records_of_one_person_in_different_groups_travel_together(tmp_path: Path, records: Any) -> None:
    """Bulk: the other record, in another group, went out with the objecting person's pseudonyms (linked
    records apart were both rejected: a link to a Patient not in the Bundle)."""
    first, other = records()
    resources = [
        other,
        *others(12),
        first,
        ALICE,
        objection("cc", ref("Patient/pc")),
        observation("oc", 2.0, subject=ref(f"Patient/{other['id']}")),
        observation("oa", 1.0, subject=ref("Patient/pa")),
    ]
    summary, delivered = deliver(tmp_path, resources, group_size=5)
    assert values(delivered, "Observation") == [1.0] and summary.invalid_lines == []
    assert [r["resourceType"] for r in delivered].count("Patient") == 13  # Alice and the twelve others
    assert summary.patients_opted_out == 2 and summary.dropped["opted-out"]["Patient"] == 2


def _carol_record(pid: str, *identifiers: tuple[str, str], **more: Any) -> dict:
    return CAROL | {"id": pid, "identifier": [{"system": s, "value": v} for s, v in identifiers], **more}


BSN = "http://fhir.nl/fhir/NamingSystem/bsn"


@pytest.mark.parametrize(
    "records",
    [
        # A shares an MRN with C, B a BSN with C, and C comes last (a third probe: A went out)
        [
            _carol_record("pc", (MRN, "M-A")),
            _carol_record("pc-b", (MRN, "M-B"), (BSN, "999911120")),
            _carol_record("pc-c", (MRN, "M-A"), (BSN, "999911120")),
        ],
        # C links to A and B, which share nothing
        [
            _carol_record("pc", (MRN, "M-A")),
            _carol_record("pc-b", (MRN, "M-B")),
            _carol_record(
                "pc-c",
                (MRN, "M-C"),
                link=[
                    {"other": ref("Patient/pc"), "type": "replaces"},
                    {"other": ref("Patient/pc-b"), "type": "replaces"},
                ],
            ),
        ],
        # B links to A by A's number alone, without its system
        [
            _carol_record("pc", (MRN, "M-A")),
            _carol_record(
                "pc-b", (MRN, "M-B"), link=[{"other": {"identifier": {"value": "M-A"}}, "type": "replaces"}]
            ),
            _carol_record(
                "pc-c", (MRN, "M-C"), link=[{"other": ref("Patient?identifier=M-B"), "type": "seealso"}]
            ),
        ],
    ],
    ids=["chain-of-numbers", "links-to-both", "links-by-identifier"],
)
def test_every_record_of_an_objecting_person_is_withheld_whatever_the_groups(
    tmp_path: Path, records: list[dict]
) -> None:
    first, second, third = records
    resources = [
        first,
        *others(6),
        second,
        ALICE,
        third,
        objection("cc", ref(f"Patient/{second['id']}")),
        *(observation(f"o-{r['id']}", 2.0, subject=ref(f"Patient/{r['id']}")) for r in records),
        observation("oa", 1.0, subject=ref("Patient/pa")),
    ]
    summary, delivered = deliver(tmp_path, resources, group_size=1)
    assert values(delivered, "Observation") == [1.0]
    assert summary.dropped["opted-out"]["Patient"] == 3 and summary.invalid_lines == []


def test_a_placeholder_number_does_not_make_patients_one_person(tmp_path: Path) -> None:
    """BSN 000000000 (or 'onbekend') on several patients merged them all: one objection withheld everyone."""
    placeholders = [(BSN, "000000000"), (MRN, "onbekend")]
    alice = ALICE | {
        "identifier": [*ALICE["identifier"], *({"system": s, "value": v} for s, v in placeholders)]
    }
    carol = CAROL | {
        "identifier": [*CAROL["identifier"], *({"system": s, "value": v} for s, v in placeholders)]
    }
    resources = [
        alice,
        carol,
        objection("cc", ref("Patient/pc")),
        observation("oa", 1.0, subject=ref("Patient/pa")),
        observation("oc", 2.0, subject=ref("Patient/pc")),
    ]
    summary, delivered = deliver(tmp_path, resources)
    assert values(delivered, "Observation") == [1.0] and summary.patients_opted_out == 1
    processed = _process(_posted(*resources), tmp_path / "posted")
    assert values([e["resource"] for e in processed.bundle["entry"]], "Observation") == [1.0]


def test_a_reference_by_identifier_to_an_objector_ties_the_resource_to_them(tmp_path: Path) -> None:
    """Only subject and patient were read by identifier: an Observation of Alice whose focus is Carol by
    her number went out with Alice's data. A professional named by identifier ties nothing."""
    about_carol = observation(
        "oa-carol", 2.0, subject=ref("Patient/pa"), focus=[{"identifier": {"system": MRN, "value": "MRN-PC"}}]
    )
    by_big = observation(
        "oa",
        1.0,
        subject=ref("Patient/pa"),
        performer=[
            {"identifier": {"system": "http://fhir.nl/fhir/NamingSystem/big", "value": "12345678901"}}
        ],
    )
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, objection("cc", ref("Patient/pc")), about_carol, by_big]
    )
    assert values(delivered, "Observation") == [1.0]
    # Alice and Carol travel together; Carol's objection takes the Observation about her, as when posted
    assert summary.dropped == {"opted-out": {"Patient": 1, "Consent": 1, "Observation": 1}}


def test_a_resource_of_a_patient_absent_by_urn_uuid_is_an_orphan_counted_once(tmp_path: Path) -> None:
    """Its subject a urn:uuid of no Patient of the export: it was shared, went with the group that referred
    to it, was rejected there and counted again as not referenced."""
    orphan = observation("orphan", 2.0, subject=ref("urn:uuid:00000000-0000-4000-8000-0000000000aa"))
    mine = observation("oa", 1.0, subject=ref("Patient/pa"), derivedFrom=[ref("Observation/orphan")])
    summary, delivered = deliver(tmp_path, [ALICE, orphan, mine])
    assert values(delivered, "Observation") == [1.0] and summary.invalid_lines == []
    assert summary.dropped == {"patient-absent": {"Observation": 1}}


@pytest.mark.parametrize(
    "other",
    [{"identifier": {"system": MRN, "value": "MRN-GONE"}}, {"display": "het oude dossier"}],
    ids=["by-identifier", "display-only"],
)
def test_a_link_to_a_record_that_is_not_there_is_refused(tmp_path: Path, other: dict) -> None:
    """A fourth probe: a link by identifier (or display) to a record outside the Bundle was accepted, and
    the patient delivered although that record's number was under objection."""
    linked = ALICE | {"link": [{"other": other, "type": "replaces"}]}
    bundle = _posted(linked, observation("oa", 1.0, subject=ref("Patient/pa")))
    with pytest.raises(FhirError) as raised:
        _process(bundle, tmp_path)
    assert raised.value.status == 422 and raised.value.issues[0].expression[0].startswith(
        "Bundle.entry[0].resource.link[0]"
    )
    summary, delivered = deliver(
        tmp_path / "bulk", [linked, observation("oa", 1.0, subject=ref("Patient/pa"))]
    )
    assert delivered == [] and summary.sent == {}


def test_a_posted_resource_that_leads_to_no_patient_is_not_delivered(tmp_path: Path) -> None:
    """A fourth probe: Observations without a subject (one pointing at an Encounter without one, one whose
    only reference was to a resource not in the Bundle) were delivered: whose data they are, and so whether
    their patient objects, cannot be known. Bulk drops them as not referenced; posted, they went out."""
    lone_encounter = encounter("e-none", "pa")
    del lone_encounter["subject"]
    loose = [
        observation("o-bare", 5.0),
        observation("o-via", 6.0, encounter=ref("Encounter/e-none")),
        observation("o-dangling", 7.0, focus=[ref("urn:uuid:00000000-0000-4000-8000-0000000000bb")]),
    ]
    practitioner = {"resourceType": "Practitioner", "id": "pr", "gender": "female"}
    mine = observation("oa", 1.0, subject=ref("Patient/pa"), performer=[ref("Practitioner/pr")])
    bundle = _posted(
        objection("cc", ref("Patient/pc")), CAROL, ALICE, mine, practitioner, lone_encounter, *loose
    )
    bundle["type"] = "collection"
    processed = _process(bundle, tmp_path)
    kept = [e["resource"] for e in processed.bundle["entry"]]
    assert values(kept, "Observation") == [1.0]
    assert {r["resourceType"] for r in kept} == {"Patient", "Observation", "Practitioner", "Provenance"}
    assert processed.report["resourcesDroppedByReason"]["not-linked-to-a-patient"] == {
        "Encounter": 1,
        "Observation": 3,
    }


def test_a_bsn_written_with_its_oid_is_the_same_person(tmp_path: Path) -> None:
    """A fourth probe: the duplicate whose BSN was under the OID went out with the objector's pseudonyms."""
    numbered = CAROL | {"identifier": [{"system": BSN, "value": "999911120"}]}
    by_oid = CAROL | {
        "id": "pc-oid",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "999911120"}],
    }
    resources = [
        objection("cc", ref("Patient/pc")),
        numbered,
        by_oid,
        ALICE,
        observation("oc", 2.0, subject=ref("Patient/pc-oid")),
        observation("oa", 1.0, subject=ref("Patient/pa")),
    ]
    processed = _process(_posted(*resources), tmp_path)
    assert values([e["resource"] for e in processed.bundle["entry"]], "Observation") == [1.0]
    summary, delivered = deliver(tmp_path / "bulk", [*resources[1:], resources[0]], group_size=1)
    assert values(delivered, "Observation") == [1.0]


def test_the_ehr_is_told_where_a_reference_was_dropped(tmp_path: Path) -> None:
    """A fourth probe: the warning for a reference that was dropped reached nobody."""
    from gateway.service.summary import delivery_parameters

    mine = observation("oa", 1.0, subject=ref("Patient/pa"))
    bundle = _posted(ALICE, mine)
    bundle["entry"][1]["resource"]["focus"] = [ref("Device/not-sent")]
    processed = _process(bundle, tmp_path)
    sent = delivery_parameters("d1", "queued", processed.report)
    (warnings,) = [p["resource"] for p in sent["parameter"] if p["name"] == "warnings"]
    assert warnings["issue"][0]["severity"] == "warning"
    assert warnings["issue"][0]["expression"] == ["Bundle.entry[1].resource.focus[0].reference"]
    assert "not-sent" not in orjson.dumps(sent).decode()  # where, never what


def test_a_shared_line_the_leak_gate_stops_in_every_group_is_reported_once(tmp_path: Path) -> None:
    """A Location named after patients was rejected by each group that carried it, and counted so: twice
    as rejected-422, listed twice, and a third time as never referenced."""
    room = {"resourceType": "Location", "id": "l1", "name": "Kamer Piet Pietersen"}
    people = others(14)
    resources = [*people, room, *(encounter(f"e{i}", p["id"], "l1") for i, p in enumerate(people))]
    summary, delivered = deliver(tmp_path, resources, group_size=7)
    assert "Location" not in {r["resourceType"] for r in delivered}
    assert summary.dropped == {"rejected-422": {"Location": 1}}
    assert summary.invalid_lines == [("Location.ndjson", 1, "rejected-security")]


def test_a_resource_type_that_is_not_r4_is_an_invalid_line_and_stored_nowhere(tmp_path: Path) -> None:
    """Any alphabetic text was stored as the line's type in the index on disk (kept after an interruption),
    a surname as well."""
    import sqlite3

    odd = {"resourceType": "Zwartkruisvermeulen", "id": "x1"}
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.ndjson").write_bytes(b"\n".join([orjson.dumps(ALICE), orjson.dumps(odd)]) + b"\n")
    options = BulkOptions(workers=0, stop_after_groups=0)
    with pytest.raises(StopAfter):
        run_bulk(
            [export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out", options=options
        )
    index = tmp_path / "w" / "index.db"
    assert b"Zwartkruis" not in index.read_bytes()
    with sqlite3.connect(index) as conn:
        assert conn.execute("SELECT DISTINCT rtype FROM resources").fetchall() == [("Patient",)]
    assert (tmp_path / "w").stat().st_mode & 0o077 == 0  # the work dir is the job user's only
    summary = run_bulk([export], registry=REGISTRY, work_dir=tmp_path / "w", to_dir=tmp_path / "out")
    assert summary.invalid_lines == [("file 0", 2, "unknown-resource-type")]


def _newborn_twin_records() -> list[dict]:
    """A mother, eleven others, then a newborn as two records of one person (the same BSN), the first's
    Encounter `partOf` the mother's, and one more patient after them."""
    twin = [
        _carol_record(pid, (MRN, mrn), (BSN, "999911120")) for pid, mrn in (("pb1", "M-B1"), ("pb2", "M-B2"))
    ]
    mother_visit = encounter("em", "pa")
    born = encounter("eb", "pb1") | {"partOf": ref("Encounter/em")}
    return [ALICE, *others(11), *twin, CAROL, mother_visit, born]


def test_a_record_of_a_person_joined_to_a_family_travels_with_it(tmp_path: Path) -> None:
    """A third probe: joining the newborn to its mother moved the newborn's record, not its other record
    (the same person): that one travelled apart from the objection and was delivered, its pseudonyms made."""
    resources = [*_newborn_twin_records(), objection("cb", ref("Patient/pb1"))]
    summary, delivered = deliver(tmp_path, resources, group_size=200)
    assert summary.dropped["opted-out"]["Patient"] == 2  # both records of the objecting newborn
    patients = [r for r in delivered if r["resourceType"] == "Patient"]
    assert len(patients) == 13 and summary.sent["Patient"] + 2 == 15  # every patient accounted for


def test_joined_sets_are_bounded_over_every_round_and_no_patient_is_lost(tmp_path: Path) -> None:
    """Two sets of eight joined in a second round became sixteen together, and seven patients were in no
    group at all: neither sent nor counted as withheld."""

    def family(prefix: str) -> list[dict]:
        members = [
            patient(f"{prefix}{i}", "Wardema", "Wim", f"Ringweg {i}", "1000 AA", "Ede") for i in range(8)
        ]
        rounds = observation(
            f"o{prefix}",
            1.0,
            subject=ref(f"Patient/{prefix}0"),
            focus=[ref(f"Patient/{prefix}{i}") for i in range(1, 8)],
        )
        return [*members, rounds]

    joining = observation("join", 2.0, hasMember=[ref("Observation/oa"), ref("Observation/ob")])
    summary, delivered = deliver(tmp_path, [*family("a"), *family("b"), joining], group_size=3)
    assert summary.sent["Patient"] == 16 and summary.invalid_lines == []
    assert values(delivered, "Observation") == [1.0, 1.0]  # each family's own; the join ties sixteen
    assert summary.dropped == {"several-patients": {"Observation": 1}}


@pytest.mark.parametrize("spacing", [b'"identifier" :{', b'"identifier":\t{', b'"identifier" : {'])
def test_a_reference_by_identifier_is_found_however_the_line_is_spaced(
    tmp_path: Path, spacing: bytes
) -> None:
    """Only `"identifier":{` and `"identifier": {` were looked for: an Observation of Alice about Carol by
    her number, in a pretty-printed export, went out with Alice's data while Carol objected."""
    about_carol = observation(
        "oc", 2.0, subject=ref("Patient/pa"), focus=[{"identifier": {"system": MRN, "value": "MRN-PC"}}]
    )
    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.ndjson").write_bytes(orjson.dumps(ALICE) + b"\n" + orjson.dumps(CAROL) + b"\n")
    (export / "Consent.ndjson").write_bytes(orjson.dumps(objection("cc", ref("Patient/pc"))) + b"\n")
    line = orjson.dumps(about_carol).replace(b'"identifier":{', spacing)
    (export / "Observation.ndjson").write_bytes(line + b"\n")
    summary = run_bulk(
        [export],
        registry=REGISTRY,
        work_dir=tmp_path / "w",
        to_dir=tmp_path / "out",
        options=BulkOptions(workers=0, group_size=1),
    )
    assert "Observation" not in summary.sent


@pytest.mark.parametrize("form", ["upper-case", "not-a-uuid"])
def test_a_urn_uuid_reference_means_the_same_to_the_index_and_the_chain(tmp_path: Path, form: str) -> None:
    """The index matched `urn:uuid:` references case-blind and to any Patient id; the chain matched them
    exactly and to UUID ids only: Alice's Observation about Carol went out while Carol objected."""
    carol_id = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f" if form == "upper-case" else "pc"
    carol = CAROL | {"id": carol_id}
    target = f"urn:uuid:{carol_id.upper()}" if form == "upper-case" else "urn:uuid:pc"
    about = observation("oc", 2.0, subject=ref("Patient/pa"), focus=[ref(target)])
    summary, delivered = deliver(
        tmp_path,
        [ALICE, *others(11), carol, objection("cc", ref(f"Patient/{carol_id}")), about],
        group_size=1,
    )
    if form == "upper-case":  # the same UUID: Carol's, and with her it goes
        assert values(delivered, "Observation") == []
    else:  # names no resource of the export: Alice's Observation, its dangling focus dropped
        assert values(delivered, "Observation") == [2.0]
        assert all("focus" not in r for r in delivered if r["resourceType"] == "Observation")


def test_lines_naming_resources_under_two_server_bases_are_not_delivered(tmp_path: Path) -> None:
    """Two bases in one group: references under either were left unresolved, and an Observation of Alice
    made in Carol's Encounter went out while Carol objected."""
    carol_visit = encounter("ec", "pc") | {
        "serviceProvider": ref("https://y.example.org/fhir/Organization/o1")
    }
    made_there = observation(
        "oa", 2.0, subject=ref("Patient/pa"), encounter=ref("https://x.example.org/fhir/Encounter/ec")
    )
    hospital = {"resourceType": "Organization", "id": "o1", "name": "Ziekenhuis"}
    summary, delivered = deliver(
        tmp_path, [ALICE, CAROL, objection("cc", ref("Patient/pc")), carol_visit, made_there, hospital]
    )
    assert values(delivered, "Observation") == []
    assert ("Observation.ndjson", 1, "rejected-mixed-server-bases") in summary.invalid_lines


def test_an_over_long_line_with_consent_written_in_escapes_stops_the_job(tmp_path: Path) -> None:
    """Only `onsent` was looked for: `C\\u006fnsent` in a line over the limit was read as no Consent."""
    export = tmp_path / "export"
    export.mkdir()
    consent = objection("cc", ref("Patient/pc")) | {"sourceAttachment": {"data": "QUJD" * 40_000}}
    line = orjson.dumps(consent).replace(b"Consent", b"C\\u006fnsent").replace(b"consent", b"c\\u006fnsent")
    (export / "export.ndjson").write_bytes(
        b"\n".join([orjson.dumps(ALICE), orjson.dumps(CAROL), line]) + b"\n"
    )
    with pytest.raises(SourceError, match="line 3"):
        run_bulk(
            [export],
            registry=REGISTRY,
            work_dir=tmp_path / "w",
            to_dir=tmp_path / "out",
            options=BulkOptions(workers=0, max_line_bytes=64 * 1024),
        )


def test_an_objectors_device_does_not_travel_through_another_shared_resource(tmp_path: Path) -> None:
    """A fourth probe: Alice's Observation names Device d2, whose `parent` is Carol's implant (named only by
    Carol's Procedure): the implant travelled to Alice's group as a shared line two hops away, where
    nothing showed it was Carol's, and its lot number went out while Carol objected."""
    implant = {"resourceType": "Device", "id": "dx", "lotNumber": "LOT-OBJ-77"}
    placed = {
        "resourceType": "Procedure",
        "id": "px",
        "status": "completed",
        "subject": ref("Patient/pc"),
        "usedReference": [ref("Device/dx")],
    }
    monitor = {"resourceType": "Device", "id": "d2", "parent": ref("Device/dx")}
    measured = observation("oa", 1.0, subject=ref("Patient/pa"), device=ref("Device/d2"))
    resources = [
        ALICE,
        *others(12),
        CAROL,
        objection("cc", ref("Patient/pc")),
        implant,
        placed,
        monitor,
        measured,
    ]
    summary, delivered = deliver(tmp_path, resources, group_size=5)
    assert "LOT-OBJ-77" not in orjson.dumps(delivered).decode()
    assert values(delivered, "Observation") == [1.0]


def test_a_resource_exported_twice_is_delivered_once_and_the_copy_reported(tmp_path: Path) -> None:
    """Two lines with one Observation id: both went out, the second under an id that depended on its place in
    the group. The copy is reported as a duplicate line; the first goes out."""
    seen = observation("oa", 1.0, subject=ref("Patient/pa"))
    summary, delivered = deliver(tmp_path, [ALICE, seen, seen | {"valueQuantity": {"value": 9.0}}])
    assert values(delivered, "Observation") == [1.0]
    assert summary.invalid_lines == [("Observation.ndjson", 2, "rejected-duplicate")]
