"""What leaves the gateway is structurally valid R4, for every shipped profile and all the shared corpus.

Checked twice, by two validators that share no code with the engine: the official HL7 R4 JSON Schema (as the
input is checked) and the fhir.resources R4B models, which also know what the schema cannot say, such as
a required choice element (`MedicationStatement.medication[x]`). The engine makes its output valid by
construction (an element or resource that loses a required part goes whole, `R4Types.must_have`); this is
the proof over real data written elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.deid import deidentify
from gateway.pipeline.validate import SchemaValidator
from tests.test_deid_support import (
    CORPUS,
    KEY_A,
    PROFILES,
    PROVENANCE,
    as_bundle,
    corpus_bundles,
    dutch_bundle,
    fake_pseudonyms,
    load,
    plan_for,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "gateway" / "data" / "fhir-r4.schema.json"
PROFILE_IDS = sorted(p.stem for p in PROFILES.glob("*.yaml"))


def _collection(resources: list[dict[str, Any]], base: str) -> dict[str, Any]:
    entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _hl7_single_resources() -> dict[str, Any]:
    """The HL7 examples that are single resources, together, so that their `Patient/example` resolves."""
    docs = [load(p) for p in sorted((CORPUS / "hl7-r4-examples").glob("*.json"))]
    return _collection([d for d in docs if d["resourceType"] != "Bundle"], "http://hl7.org/fhir")


def _ndjson_export(folder: str) -> dict[str, Any]:
    files = [p for p in sorted((CORPUS / "ndjson" / folder).glob("*.ndjson")) if p.stem != "log"]
    lines = [line for p in files for line in p.read_bytes().splitlines() if line.strip()]
    return _collection([orjson.loads(line) for line in lines], "http://example.org/fhir")


INPUTS: dict[str, Any] = {str(p.relative_to(CORPUS)): p for p in corpus_bundles()}
INPUTS |= {str(p.relative_to(ROOT)): p for p in sorted((ROOT / "examples").glob("*.json"))}
INPUTS |= {
    "dutch-zib2024-combined": dutch_bundle,
    "hl7-r4-examples (single resources)": _hl7_single_resources,
    "ndjson/sample-bulk-10-patients": lambda: _ndjson_export("sample-bulk-10-patients"),
    "ndjson/cumulus-etl-simple-input": lambda: _ndjson_export("cumulus-etl-simple-input"),
}


@pytest.fixture(scope="module")
def validator() -> SchemaValidator:
    return SchemaValidator.from_file(SCHEMA)


def _model_problems(resource: dict[str, Any]) -> list[str]:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in exc.errors()]
    return []


def _output(name: str, profile: str) -> dict[str, Any]:
    source = INPUTS[name]
    bundle = as_bundle(load(source)) if isinstance(source, Path) else source()
    return deidentify(
        bundle, plan_for(profile), id_key=KEY_A, pseudonyms=fake_pseudonyms(bundle), provenance=PROVENANCE
    ).bundle


@pytest.mark.parametrize("profile", PROFILE_IDS)
@pytest.mark.parametrize("name", sorted(INPUTS))
def test_the_delivered_bundle_and_every_resource_in_it_are_valid_r4(
    name: str, profile: str, validator: SchemaValidator
) -> None:
    """The Bundle as a whole (its type, meta.security label, transaction requests), then each resource."""
    out = _output(name, profile)
    problems = [f"{i.expression} {i.diagnostics}" for i in validator.validate_resource(out, "Bundle")]
    for i, entry in enumerate(out["entry"]):
        problems += [
            f"entry[{i}] {entry['resource']['resourceType']}.{p}" for p in _model_problems(entry["resource"])
        ]
    problems += [
        f"Bundle.{p}"
        for p in _model_problems(
            {**out, "entry": [{k: v for k, v in e.items() if k != "resource"} for e in out["entry"]]}
        )
    ]
    assert problems == []


def test_the_check_covers_many_resource_types_per_person_level_profile() -> None:
    """Not vacuous: the person-level profiles deliver a real share of the corpus, of many types."""
    for profile in ("example-generic", "example-cancer-registry"):
        delivered = [
            e["resource"]["resourceType"] for name in INPUTS for e in _output(name, profile)["entry"]
        ]
        assert len(delivered) > 300 and len(set(delivered)) >= 5, (profile, len(delivered), set(delivered))
