"""Every case of tests/badinput/cases.yaml at the parse/validate/opt-out level (the HTTP run is separate).

Asserts the status, the issue code (and expression where given), the layer that decides, the opt-out
decision for Consent cases, and that no distinctive input value reaches the OperationOutcome or a warning.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.optout import BundleConsentOptOut, ConsentPolicy, PatientRef, patient_key
from gateway.optout.persons import same_person_alike
from gateway.outcome import FhirError, Issue
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import BundleIndex, SchemaValidator, validate_bundle
from tests.badinput import generate

HERE = Path(__file__).resolve().parent / "badinput"
SCHEMA = Path("/work/shared/fhir-r4/fhir.schema.json")
DOCUMENT = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))
DEFAULTS: dict[str, Any] = DOCUMENT["defaults"]
CASES: list[dict[str, Any]] = DOCUMENT["cases"]


@pytest.fixture(scope="module")
def validator() -> SchemaValidator:
    return SchemaValidator.from_file(SCHEMA)


@dataclass
class Outcome:
    layer: str  # the layer that rejected, or "accepted"
    status: int
    issues: list[Issue]
    index: BundleIndex | None = None
    decisions: dict[str, str] | None = None


def body_of(case: dict[str, Any]) -> bytes:
    if case["body"] is not None:
        return (HERE / case["body"]).read_bytes()
    return generate.generated_body(case["generated"])


def policy_from(defaults: dict[str, Any]) -> ConsentPolicy:
    return ConsentPolicy.from_mapping(defaults["optout_policy"])


def run(case: dict[str, Any], validator: SchemaValidator) -> Outcome:
    body = body_of(case)
    try:
        resource = parse_json(body, max_bytes=DEFAULTS["max_bytes"], max_depth=DEFAULTS["max_depth"])
    except FhirError as err:
        return Outcome("parse", err.status, err.issues)
    try:
        index = validate_bundle(resource, validator, require_patient=DEFAULTS["require_patient"])
    except FhirError as err:
        return Outcome("validate", err.status, err.issues)
    patients = [
        PatientRef(patient_key(p), p.resource, None, DEFAULTS["provider"], DEFAULTS["registry"])
        for p in index.patients
    ]
    source = BundleConsentOptOut.from_bundle(resource, policy=policy_from(DEFAULTS))
    # as the chain decides: records of one person alike
    decisions = same_person_alike(index.patients, asyncio.run(source.check(patients)))
    return Outcome("accepted", 200, index.issues, index, {k: d.status for k, d in decisions.items()})


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any], validator: SchemaValidator) -> None:
    outcome = run(case, validator)
    if case["layer"] == "http":
        # Only the content type is wrong: the body itself must pass parse and validate.
        assert outcome.layer == "accepted", [i.as_fhir() for i in outcome.issues]
    else:
        assert outcome.status == case["status"], [i.as_fhir() for i in outcome.issues]
        if case["status"] != 200:
            assert outcome.layer == case["layer"]
            assert_issue(outcome.issues, case["code"], case.get("expression"), severity="error")
    if case.get("warning"):
        assert_issue(outcome.issues, case["warning"], None, severity="warning")
    if case.get("optout") is not None:
        expected = case["optout"]
        if isinstance(expected, str):
            first = outcome.index.patients[0].full_url  # type: ignore[union-attr]
            expected = {first: expected}
        assert outcome.decisions is not None
        assert {k: outcome.decisions[k] for k in expected} == expected
    assert_no_secrets(outcome.issues, case.get("secrets", []))


def assert_issue(issues: list[Issue], code: str, expression: str | None, *, severity: str) -> None:
    matching = [i for i in issues if i.code == code and i.severity == severity]
    assert matching, f"no {severity} issue with code {code}: {[i.as_fhir() for i in issues]}"
    if expression:
        assert any(expression in i.expression for i in matching), [i.as_fhir() for i in matching]


def assert_no_secrets(issues: list[Issue], secrets: list[str]) -> None:
    text = json.dumps({"resourceType": "OperationOutcome", "issue": [i.as_fhir() for i in issues]})
    for secret in secrets:
        assert secret not in text


def test_collection_is_large_and_covers_every_layer() -> None:
    layers = {c["layer"] for c in CASES}
    assert len(CASES) >= 150
    assert layers == {"parse", "validate", "optout", "http"}
    assert all(c["body"] is None or (HERE / c["body"]).is_file() for c in CASES)
    generated = [c for c in CASES if c["body"] is None]
    assert all(c["generated"] for c in generated)


def test_files_match_the_generator() -> None:
    """cases.yaml and the body files are what generate.py produces today (deterministic, not hand-edited)."""
    cases = generate.all_cases()
    assert [c.name for c in cases] == [c["name"] for c in CASES]
    for case in cases:
        if case.body is not None:
            assert (HERE / case.file_name()).read_bytes() == case.body, case.name  # type: ignore[operator]
    assert [c.as_yaml() for c in cases] == CASES


def test_no_stack_overflow_on_10000_levels(validator: SchemaValidator) -> None:
    for spec in ("deep-arrays:10000", "deep-objects:10000"):
        with pytest.raises(FhirError) as err:
            parse_json(generate.generated_body(spec), max_bytes=1 << 24)
        assert err.value.status == 400
