"""Snapshot tests: the committed expected de-identified output of three real inputs.

Regenerate after an intended change with ``UPDATE_SNAPSHOTS=1 pytest tests/test_deid_snapshots.py`` and
review the diff by eye before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.deid import deidentify
from tests.test_deid_support import CORPUS, DUTCH, KEY_A, PROVENANCE, fake_pseudonyms, load, plan_for

SNAPSHOTS = Path(__file__).with_name("snapshots")
DUTCH_FILES = [
    "nl-core-Patient-alt-1.json",
    "nl-core-Problem-alt-1.json",
    "nl-core-BloodPressure-alt-1.json",
    "nl-core-Admission-alt-1.json",
]


def nictiz_patient_bundle() -> dict[str, Any]:
    entries = []
    for name in DUTCH_FILES:
        doc = load(DUTCH / name)
        entries.append(
            {"fullUrl": f"http://example.org/fhir/{doc['resourceType']}/{doc['id']}", "resource": doc}
        )
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


CASES = {
    "nictiz-patient-alt-1": nictiz_patient_bundle,
    "synthea-clemente-kreiger": lambda: load(
        CORPUS
        / "synthea/smart-generated-sample-data-r4/Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json"
    ),
    "hl7-bundle-transaction": lambda: load(CORPUS / "hl7-r4-examples/Bundle-bundle-transaction.json"),
}


def render(name: str, profile: str = "example-generic") -> bytes:
    bundle = CASES[name]()
    result = deidentify(
        bundle, plan_for(profile), id_key=KEY_A, pseudonyms=fake_pseudonyms(bundle), provenance=PROVENANCE
    )
    doc = {"report": result.report.as_dict(), "bundle": result.bundle}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_snapshot(name: str) -> None:
    path = SNAPSHOTS / f"{name}.json"
    got = render(name)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_bytes(got)
    assert path.exists(), f"missing snapshot {path.name}: run with UPDATE_SNAPSHOTS=1"
    assert got == path.read_bytes(), f"{path.name} differs: review, then UPDATE_SNAPSHOTS=1"
