"""A synthetic Bulk Data export for tests and benchmarks: streamed to disk, never held in memory.

Patients with Dutch-looking demographics (made-up names, 11-proof-free fake numbers), each with encounters,
observations, conditions and procedures referencing them (`Patient/<id>`), plus shared Organizations and
Practitioners. Options add a denying Consent for chosen patients, invalid lines and orphans (resources whose
Patient is not in the export).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"
_GIVEN = ["Jan", "Anna", "Pieter", "Maria", "Kees", "Sanne", "Willem", "Fleur", "Daan", "Lotte"]
_FAMILY = ["Jansen", "de Vries", "van den Berg", "Bakker", "Visser", "Smit", "Meijer", "de Boer", "Mulder"]
_CITIES = ["Utrecht", "Amsterdam", "Rotterdam", "Zwolle", "Groningen", "Eindhoven"]
_CLINICAL = ("Encounter", "Observation", "Condition", "Procedure")


@dataclass
class SynthSpec:
    patients: int
    resources_per_patient: int = 99  # besides the Patient itself
    organizations: int = 20
    practitioners: int = 50
    objecting: set[int] = field(default_factory=set)  # patient numbers with a denying Consent in the export
    invalid_lines: dict[str, list[int]] = field(default_factory=dict)  # file type → line numbers to corrupt
    orphans: int = 0  # Observations whose Patient is not in the export
    seed: int = 7


def patient_id(n: int) -> str:
    return f"pat{n:07d}"


def write_export(folder: Path, spec: SynthSpec) -> dict[str, int]:
    """Write `<Type>.ndjson` files; returns resources written per type."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    counts: dict[str, int] = {}
    files = {
        t: (folder / f"{t}.ndjson").open("wb")
        for t in ("Patient", *_CLINICAL, "Organization", "Practitioner", "Consent")
    }
    lines = dict.fromkeys(files, 0)
    try:

        def emit(rtype: str, resource: dict) -> None:
            lines[rtype] += 1
            bad = lines[rtype] in spec.invalid_lines.get(rtype, ())
            data = b'{"resourceType":"' + rtype.encode() + b'", broken' if bad else orjson.dumps(resource)
            files[rtype].write(data + b"\n")
            counts[rtype] = counts.get(rtype, 0) + 1

        for o in range(spec.organizations):
            emit("Organization", _organization(o))
        for p in range(spec.practitioners):
            emit("Practitioner", _practitioner(p, rng))
        for n in range(spec.patients):
            emit("Patient", _patient(n, rng))
            for k in range(spec.resources_per_patient):
                rtype = _CLINICAL[k % len(_CLINICAL)]
                emit(rtype, _clinical(rtype, n, k, rng, spec))
            if n in spec.objecting:
                emit("Consent", _consent(n))
        for k in range(spec.orphans):
            emit("Observation", _clinical("Observation", spec.patients + 1000 + k, 0, rng, spec))
    finally:
        for handle in files.values():
            handle.close()
    for rtype, handle in files.items():
        if not lines[rtype]:
            Path(handle.name).unlink()
    return counts


def _patient(n: int, rng: random.Random) -> dict:
    return {
        "resourceType": "Patient",
        "id": patient_id(n),
        "identifier": [{"system": MRN_SYSTEM, "value": f"MRN{n:08d}"}],
        "name": [{"family": rng.choice(_FAMILY), "given": [rng.choice(_GIVEN)]}],
        "gender": rng.choice(["male", "female"]),
        "birthDate": f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "address": [
            {
                "line": [f"Dorpsstraat {rng.randint(1, 200)}"],
                "city": rng.choice(_CITIES),
                "postalCode": f"{rng.randint(1000, 9999)} AB",
                "country": "NL",
            }
        ],
        "managingOrganization": {"reference": f"Organization/org{n % 20:03d}"},
    }


def _clinical(rtype: str, n: int, k: int, rng: random.Random, spec: SynthSpec) -> dict:
    pid = patient_id(n)
    day = f"20{rng.randint(10, 25)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    enc = f"Encounter/e{n:07d}-{k - k % len(_CLINICAL):05d}"
    practitioner = f"Practitioner/prac{rng.randrange(spec.practitioners):04d}"
    if rtype == "Encounter":
        return {
            "resourceType": "Encounter",
            "id": f"e{n:07d}-{k:05d}",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"},
            "participant": [{"individual": {"reference": practitioner}}],
            "period": {"start": f"{day}T09:00:00+01:00", "end": f"{day}T09:30:00+01:00"},
            "serviceProvider": {"reference": f"Organization/org{rng.randrange(spec.organizations):03d}"},
        }
    code = {
        "coding": [
            {
                "system": "http://loinc.org",
                "code": f"{rng.randint(1000, 99999)}-{rng.randint(0, 9)}",
                "display": "Synthetic measurement",
            }
        ]
    }
    base = {
        "resourceType": rtype,
        "id": f"{rtype[0].lower()}{n:07d}-{k:05d}",
        "subject": {"reference": f"Patient/{pid}"},
        "encounter": {"reference": enc},
    }
    if rtype == "Observation":
        return base | {
            "status": "final",
            "code": code,
            "effectiveDateTime": f"{day}T10:30:00.000+01:00",
            "valueQuantity": {
                "value": round(rng.uniform(1, 200), 2),
                "unit": "mmol/L",
                "system": "http://unitsofmeasure.org",
                "code": "mmol/L",
            },
            "performer": [{"reference": practitioner}],
        }
    if rtype == "Condition":
        return base | {
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "code": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": str(rng.randint(10**7, 10**8)),
                        "display": "Synthetic condition",
                    }
                ]
            },
            "recordedDate": day,
        }
    return base | {
        "status": "completed",
        "performedDateTime": f"{day}T11:00:00+01:00",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": str(rng.randint(10**7, 10**8))}]},
    }


def _organization(o: int) -> dict:
    return {
        "resourceType": "Organization",
        "id": f"org{o:03d}",
        "name": f"Ziekenhuis {o}",
        "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/agb-z", "value": f"0610{o:04d}"}],
    }


def _practitioner(p: int, rng: random.Random) -> dict:
    return {
        "resourceType": "Practitioner",
        "id": f"prac{p:04d}",
        "name": [{"family": rng.choice(_FAMILY), "given": [rng.choice(_GIVEN)]}],
    }


def _consent(n: int) -> dict:
    return {
        "resourceType": "Consent",
        "id": f"consent{n:07d}",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id(n)}"},
        "provision": {"type": "deny"},
    }


def write_lines(handle: IO[bytes], resources: Iterable[dict]) -> None:
    for resource in resources:
        handle.write(orjson.dumps(resource) + b"\n")
