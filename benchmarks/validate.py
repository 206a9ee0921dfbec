"""Throughput of parse + validate (gateway.pipeline) beside the orjson floor and fhir.resources R4B.

Bundles as in /work/shared/perf-notes.md: one Patient plus N Encounter/Observation/Condition/Procedure
resources that reference it through urn:uuid fullUrls. One core, median of several runs.

    .venv/bin/python benchmarks/validate.py [--sizes 10,100,1000,10000] [--schema PATH] [--clock cpu]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import SchemaValidator, validate_bundle

SCHEMA = Path("/work/shared/fhir-r4/fhir.schema.json")


def make_bundle(n: int, seed: int = 1) -> dict:
    """A deterministic transaction Bundle: one Patient plus n clinical resources referring to it."""
    ids = (uuid.UUID(int=(seed << 64) + i) for i in range(n + 1))
    patient_url = f"urn:uuid:{next(ids)}"
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "999911120"}],
        "name": [{"use": "official", "family": "Jansen", "given": ["Jan"]}],
        "gender": "male",
        "birthDate": "1970-03-04",
        "address": [{"use": "home", "line": ["Dorpsstraat 1"], "city": "Utrecht", "postalCode": "3511 AB"}],
    }
    entries = [_entry(patient_url, patient)]
    encounter_url = patient_url
    for i in range(n):
        url = f"urn:uuid:{next(ids)}"
        resource = _clinical(i, patient_url, encounter_url)
        if resource["resourceType"] == "Encounter":
            encounter_url = url
        entries.append(_entry(url, resource))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry(url: str, resource: dict) -> dict:
    return {
        "fullUrl": url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def _clinical(i: int, patient: str, encounter: str) -> dict:
    subject = {"reference": patient}
    kind = i % 4
    if kind == 0:
        return {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": subject,
            "period": {"start": "2026-01-02T10:00:00+01:00", "end": "2026-01-05T12:30:00+01:00"},
        }
    if kind == 1:
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": subject,
            "encounter": {"reference": encounter},
            "effectiveDateTime": "2026-01-03T08:15:00+01:00",
            "valueQuantity": {"value": 72 + i % 20, "unit": "/min", "system": "http://unitsofmeasure.org"},
        }
    if kind == 2:
        return {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                ]
            },
            "code": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}
                ]
            },
            "subject": subject,
            "onsetDateTime": "2025-11-20",
        }
    return {
        "resourceType": "Procedure",
        "status": "completed",
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": "80146002", "display": "Appendectomy"}]
        },
        "subject": subject,
        "performedDateTime": "2026-01-04T09:00:00+01:00",
    }


def median_seconds(
    fn: Callable[[], object],
    budget: float = 1.5,
    min_runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 50):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--schema", default=str(SCHEMA))
    parser.add_argument("--no-fhir-resources", action="store_true")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu = this thread's CPU time: steadier on a machine shared with other jobs",
    )
    args = parser.parse_args()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    validator = SchemaValidator.from_file(args.schema)
    validator.warm(["Bundle", "Patient", "Encounter", "Observation", "Condition", "Procedure"])
    fhir_bundle = None
    if not args.no_fhir_resources:
        from fhir.resources.R4B.bundle import Bundle as fhir_bundle  # noqa: N813 (import cost kept out of timing)
    gc.freeze()  # as the service does after start-up (perf-notes: the cyclic GC distorts large parses)
    print(f"{'entries':>8} {'size':>9}  {'stage':<46} {'MB/s':>8} {'resources/s':>12}")
    for n in (int(s) for s in args.sizes.split(",")):
        body = orjson.dumps(make_bundle(n))
        resources = n + 1
        stages: list[tuple[str, Callable[[], object]]] = [
            ("orjson loads + dumps (floor)", lambda b=body: orjson.dumps(orjson.loads(b))),
            (
                "orjson + schema only + dumps (perf-notes row)",
                lambda b=body: orjson.dumps(_schema_only(b, validator)),
            ),
            ("parse_json (limits, duplicate check)", lambda b=body: parse_json(b, max_bytes=1 << 30)),
            (
                "parse_json + validate_bundle (schema+rules)",
                lambda b=body: validate_bundle(parse_json(b, max_bytes=1 << 30), validator),
            ),
            (
                "  ... + orjson.dumps (full round trip)",
                lambda b=body: orjson.dumps(_validated(b, validator)),
            ),
        ]
        if fhir_bundle is not None:
            stages.append(
                (
                    "fhir.resources R4B Bundle.model_validate",
                    lambda b=body: fhir_bundle.model_validate(orjson.loads(b)),
                )
            )
        for name, fn in stages:
            seconds = median_seconds(fn, budget=3.0 if n >= 10000 else 1.5, clock=clock)
            mb_s, res_s = len(body) / seconds / 1e6, resources / seconds
            print(f"{n:>8} {len(body) / 1e6:>7.2f}MB  {name:<46} {mb_s:>8.1f} {res_s:>12,.0f}")
        print()


def _schema_only(body: bytes, validator: SchemaValidator) -> dict:
    bundle = orjson.loads(body)
    if validator.validate_resource(bundle):
        raise AssertionError("generated bundle is invalid")
    return bundle


def _validated(body: bytes, validator: SchemaValidator) -> dict:
    bundle = parse_json(body, max_bytes=1 << 30)
    validate_bundle(bundle, validator)
    return bundle


if __name__ == "__main__":
    main()
