"""What makes two posted Bundles the same request (gateway/idempotency.py)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from gateway.idempotency import content_digest

URN = "urn:uuid:7f3a0c1e-0000-4000-8000-000000000001"


def bundle(note: str = "", **meta: Any) -> dict[str, Any]:
    patient = {"resourceType": "Patient", "id": "p1"}
    if meta:
        patient["meta"] = meta
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "subject": {"reference": URN},
        "note": [{"text": note}],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": "2026-11-24T10:00:00+01:00",
        "entry": [
            {"fullUrl": URN, "resource": patient, "request": {"method": "POST", "url": "Patient"}},
            {"resource": observation, "request": {"method": "POST", "url": "Observation"}},
        ],
    }


def test_a_regenerated_bundle_is_the_same_request() -> None:
    again = copy.deepcopy(bundle(lastUpdated="2026-11-24T10:00:00Z"))
    fresh = f"urn:uuid:{uuid.uuid4()}"
    again["entry"][0]["fullUrl"] = again["entry"][1]["resource"]["subject"]["reference"] = fresh
    again["timestamp"] = "2026-11-25T08:00:00+01:00"
    again["entry"][0]["resource"]["meta"] = {"lastUpdated": "2026-11-25T08:00:00Z", "versionId": "2"}
    assert content_digest(again) == content_digest(bundle())


def test_other_content_is_another_request() -> None:
    base = content_digest(bundle())
    assert content_digest(bundle(note="changed")) != base
    profiled = bundle(profile=["http://nictiz.nl/fhir/StructureDefinition/nl-core-Patient"])
    assert content_digest(profiled) != base
    batch = bundle()
    batch["type"] = "batch"
    assert content_digest(batch) != base


def test_no_string_of_the_bundle_imitates_an_entry_position() -> None:
    """A review found "entry:0" written in a note hashed like a reference to entry 0."""
    referring = bundle()
    referring["entry"][1]["resource"]["note"] = [{"text": URN}]
    assert content_digest(referring) != content_digest(bundle(note="entry:0"))
    assert content_digest(referring) != content_digest(bundle(note="\u00000"))
