"""Strict mode: the fhir.resources R4B models on every posted and delivered resource (pipeline/strict.py).

The models only validate; the texts are ours, built from pydantic's error kind and location, never from its
message (which quotes the input)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from gateway.bulk.chains import offline_chains
from gateway.outcome import FhirError
from gateway.pipeline.strict import bundle_model_issues, model_issues
from gateway.process import process_bundle
from tests.badinput.generate import PATIENT_URL, bundle, observation, patient
from tests.processes import process_chain
from tests.soak.common import variant

SECRET_DATE = "2020-02-30"  # an impossible date: the official pattern admits it, our schema check does not


def _observation(**extra: object) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "a"}, **extra}


def test_issues_name_the_path_and_the_kind_never_the_value() -> None:
    issues = model_issues(
        _observation(effectiveDateTime=SECRET_DATE, zyxwortel=1, component=[{"valueQuantity": {"value": 1}}]),
        "Bundle.entry[2].resource",
    )
    assert sorted((i.code, i.expression[0]) for i in issues) == [
        ("required", "Bundle.entry[2].resource.component[0].code"),
        ("structure", "Bundle.entry[2].resource.?"),  # a property that may be data is not echoed
        ("value", "Bundle.entry[2].resource.effectiveDateTime"),
    ]
    text = json.dumps([i.as_fhir() for i in issues])
    assert SECRET_DATE not in text and "zyxwortel" not in text


def test_a_choice_given_twice_is_an_invariant_of_the_resource() -> None:
    [issue] = model_issues(_observation(valueString="a", valueBoolean=True), "Observation")
    assert issue.code == "invariant" and issue.expression == ("Observation",)


def test_a_valid_bundle_has_no_model_issues() -> None:
    assert bundle_model_issues(bundle(patient(), observation(), observation())) == []


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - Chains
    return offline_chains("example-generic", Path(tmp_path_factory.mktemp("strict-keys")))


def _process(chains, body: dict, *, strict: bool):  # noqa: ANN001, ANN202
    registry = replace(chains.registry, strict=strict)
    run = process_bundle(
        body, registry=registry, provider=chains.provider, validator=chains.validator, mapping=chains.mapping
    )
    return asyncio.run(run)


def immunization_without_date(patient_url: str) -> dict:
    """Valid R4 (FHIR lets a required primitive stand as its extensions alone); the R4B models want a value.
    Since the schema check knows calendar dates, this is what we know of that only the models refuse."""
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    return {
        "resourceType": "Immunization",
        "status": "completed",
        "vaccineCode": {"coding": [{"system": "http://snomed.info/sct", "code": "871908002"}]},
        "patient": {"reference": patient_url},
        "_occurrenceDateTime": {"extension": [absent]},
    }


def test_strict_refuses_input_the_schema_admits_and_the_models_do_not(chains) -> None:  # noqa: ANN001
    body = bundle(patient(), immunization_without_date(PATIENT_URL))
    assert _process(chains, body, strict=False).bundle is not None  # the tightened R4 schema admits it
    with pytest.raises(FhirError) as info:
        _process(chains, body, strict=True)
    assert info.value.status == 400
    assert [(i.code, i.expression) for i in info.value.issues] == [
        ("invariant", ("Bundle.entry[1].resource",))
    ]


def test_an_impossible_date_is_refused_with_or_without_strict(chains) -> None:  # noqa: ANN001
    obs = observation()
    obs["effectiveDateTime"] = SECRET_DATE
    for strict in (False, True):
        with pytest.raises(FhirError) as info:
            _process(chains, bundle(patient(), obs), strict=strict)
        assert [i.expression for i in info.value.issues] == [("Bundle.entry[1].resource.effectiveDateTime",)]
        assert SECRET_DATE not in json.dumps(info.value.outcome())


def test_strict_delivers_what_it_checked(chains) -> None:  # noqa: ANN001
    body = bundle(patient(), observation(), observation())
    processed = _process(chains, body, strict=True)
    assert processed.bundle is not None and bundle_model_issues(processed.bundle) == []
    assert len(processed.bundle["entry"]) == 4  # Patient, two Observations, Provenance


def test_a_served_registry_with_strict_true_refuses_what_only_the_models_see(tmp_path: Path) -> None:
    """`registries.<id>.strict: true` in gateway.yaml, the gateway as its own process: what only the models
    refuse is answered 400 naming the resource, nothing reaches the registry; a valid Bundle is delivered."""
    with process_chain(tmp_path, registry_options={"strict": True}) as chain:
        gw = chain.start_gateway()
        headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"}
        url = f"{gw.url}/registries/example-generic/Bundle"
        body = json.loads(variant(1, 1, run="strict"))
        immunization = immunization_without_date(body["entry"][0]["fullUrl"])
        body["entry"].append(
            {
                "fullUrl": "urn:uuid:5d9e3f0c-1b2a-4c8d-9e7f-0a1b2c3d4e5f",
                "resource": immunization,
                "request": {"method": "POST", "url": "Immunization"},
            }
        )
        refused = httpx.post(url, content=json.dumps(body), headers=headers, timeout=60)
        assert refused.status_code == 400, refused.text
        expressions = [i["expression"] for i in refused.json()["issue"]]
        assert expressions == [[f"Bundle.entry[{len(body['entry']) - 1}].resource"]]
        assert httpx.get(f"{chain.receiver_url}/deliveries").json() == []
        accepted = httpx.post(url, content=variant(2, 1, run="strict"), headers=headers, timeout=60)
        assert accepted.status_code == 200, accepted.text
        deadline = time.monotonic() + 30
        while not httpx.get(f"{chain.receiver_url}/deliveries").json():
            assert time.monotonic() < deadline, "the valid Bundle never reached the registry"
            time.sleep(0.05)
