"""Rebuild the example bundles in this folder from the shared public corpus and the NLPS1 test vectors.

    python examples/make_examples.py [--shared ../shared]

The outputs are committed (testers replay them; the demo pushes them through the whole chain). The data is
synthetic: Nictiz zib2024 examples (CC0), HL7 R4 examples (CC0), Synthea (Apache-2.0), the NLPS1 vectors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EHR_BASE = "http://ehr.example.org/fhir"
# The demo hospital's own patient-number system (configured per provider as `mrn_system`): every hospital
# patient has one, and the objection register is keyed by it. Public examples that lack it get one here.
MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"
MR_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


def with_hospital_mrn(patient: dict[str, Any], number: str) -> dict[str, Any]:
    others = [i for i in patient.get("identifier", []) if i.get("system") != MRN_SYSTEM]
    return {**patient, "identifier": [*others, {"type": MR_TYPE, "system": MRN_SYSTEM, "value": number}]}


def _entry(resource: dict[str, Any], method: str = "PUT") -> dict[str, Any]:
    rtype, rid = resource["resourceType"], resource["id"]
    url = f"{rtype}/{rid}" if method == "PUT" else rtype
    return {
        "fullUrl": f"{EHR_BASE}/{rtype}/{rid}",
        "resource": resource,
        "request": {"method": method, "url": url},
    }


def _bundle(bundle_id: str, resources: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "identifier": {"system": "http://ehr.example.org/fhir/NamingSystem/delivery", "value": bundle_id},
        "type": kind,
        "entry": [_entry(r) for r in resources],
    }
    if kind != "transaction":
        for e in bundle["entry"]:
            e.pop("request")
    return bundle


def nictiz_bundle(shared: Path) -> dict[str, Any]:
    """Every zib2024 nl-core example around nl-core-Patient-alt-1, as the EHR would send them together."""
    folder = shared / "corpus" / "dutch" / "nictiz-zib2024"
    resources = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    resources.sort(key=lambda r: r["resourceType"] != "Patient")  # Patient first, for the reader's eye
    resources[0] = with_hospital_mrn(resources[0], "NICTIZ-ALT-0001")
    return _bundle("nictiz-zib2024-alt-1", resources)


def _clinical(pid: str, n: int) -> list[dict[str, Any]]:
    subject = {"reference": f"Patient/{pid}", "display": f"patient {pid}"}
    enc = {
        "resourceType": "Encounter",
        "id": f"{pid}-enc-{n}",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": subject,
        "period": {"start": "2026-03-01T09:00:00+01:00", "end": "2026-03-04T11:30:00+01:00"},
    }
    cond = {
        "resourceType": "Condition",
        "id": f"{pid}-cond-{n}",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "code": {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": "254637007",
                    "display": "Non-small cell lung cancer",
                }
            ]
        },
        "subject": subject,
        "encounter": {"reference": f"Encounter/{pid}-enc-{n}"},
        "onsetDateTime": "2026-02-20",
        "note": [{"text": f"Besproken met patiënt {pid} en partner."}],
    }
    obs = {
        "resourceType": "Observation",
        "id": f"{pid}-obs-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": subject,
        "encounter": {"reference": f"Encounter/{pid}-enc-{n}"},
        "effectiveDateTime": "2026-03-01T09:15:00.000+01:00",
        "valueQuantity": {"value": 80.10, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    }
    return [enc, cond, obs]


def vector_patients_bundle(shared: Path) -> dict[str, Any]:
    """The four NLPS1 vector persons, each with an admission, a diagnosis and a weight."""
    vectors = json.loads((shared / "pseudonym-vectors.json").read_text())
    resources: list[dict[str, Any]] = []
    for n, case in enumerate(vectors["cases"], start=1):
        patient = dict(case["patient"], id=f"vector-{n}")
        resources.append(patient)
        resources.extend(_clinical(patient["id"], n))
    return _bundle("nlps1-vector-patients", resources)


def opted_out_bundle(shared: Path) -> dict[str, Any]:
    """Two patients: one objected to registry use (Consent deny, purpose HQUALIMP), one did not."""
    vectors = json.loads((shared / "pseudonym-vectors.json").read_text())
    objector = dict(vectors["cases"][1]["patient"], id="objector-1")
    other = dict(vectors["cases"][0]["patient"], id="consenting-1")
    consent = {
        "resourceType": "Consent",
        "id": "objector-1-registry-objection",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/objector-1"},
        "dateTime": "2026-01-15",
        "policyRule": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]
        },
        "provision": {
            "type": "deny",
            "period": {"start": "2026-01-15"},
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HQUALIMP"}],
        },
    }
    resources = [objector, consent, *_clinical("objector-1", 1), other, *_clinical("consenting-1", 2)]
    return _bundle("opt-out-demo", resources)


def synthea_bundle(shared: Path) -> dict[str, Any]:
    path = shared / "corpus" / "synthea" / "smart-generated-sample-data-r4"
    bundle = json.loads((path / "Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json").read_text())
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Patient":
            entry["resource"] = with_hospital_mrn(entry["resource"], "SYN-000001484")
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    args = parser.parse_args()
    outputs = {
        "01-nictiz-nl-core-transaction.json": nictiz_bundle(args.shared),
        "02-nlps1-vector-patients-transaction.json": vector_patients_bundle(args.shared),
        "03-opt-out-transaction.json": opted_out_bundle(args.shared),
        "04-synthea-transaction.json": synthea_bundle(args.shared),
    }
    for name, bundle in outputs.items():
        (HERE / name).write_text(json.dumps(bundle, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote examples/{name} ({len(bundle.get('entry', []))} entries)")


if __name__ == "__main__":
    main()
