"""Helpers shared by the test_deid_* modules (no tests here).

The pseudonym Identifiers built here are FAKE, made up by the tests: real ones come from the TTP.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import orjson

from gateway.deid import ProvenanceInfo, compile_plan, load_profile, load_rules
from gateway.deid.engine import Plan

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path("/work/shared/corpus")
DUTCH = CORPUS / "dutch" / "nictiz-zib2024"
PROFILES = ROOT / "profiles"
PSEUDED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}
KEY_A = b"registry-A-test-key-0123456789ab"
KEY_B = b"registry-B-test-key-0123456789ab"
PROVENANCE = ProvenanceInfo(
    gateway_version="0.1.0-test", recorded="2026-01-01T00:00:00Z", ttp_name="test-ttp"
)


@functools.cache
def plan_for(profile_id: str) -> Plan:
    return compile_plan(load_profile(PROFILES / f"{profile_id}.yaml"), load_rules())


def load(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def as_bundle(doc: dict[str, Any]) -> dict[str, Any]:
    """Single resources are wrapped in a collection Bundle with a plausible absolute fullUrl."""
    if doc.get("resourceType") == "Bundle":
        return doc
    rtype, rid = doc["resourceType"], doc.get("id", "x")
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"http://example.org/fhir/{rtype}/{rid}", "resource": doc}],
    }


def fake_pseudonyms(bundle: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """FAKE pseudonym identifiers for every Patient of the bundle, keyed like the pipeline does."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle.get("entry", []):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "Patient":
            continue
        keys = [entry.get("fullUrl")] + ([f"Patient/{res['id']}"] if isinstance(res.get("id"), str) else [])
        keys = [k for k in keys if isinstance(k, str) and k]
        if not keys:
            continue
        seed = keys[0]
        fake = "v1.FAKE-" + hashlib.sha256(seed.encode()).hexdigest()[:16]
        ident = {
            "type": {"coding": [dict(PSEUDED)]},
            "system": "urn:example:fake-pseudonym:GG",
            "value": fake,
        }
        for k in keys:
            if k:
                out[k] = [ident]
    return out


def corpus_bundles() -> list[Path]:
    """Every Bundle and Patient JSON file of the corpus (single Patients are wrapped)."""
    out = []
    for path in sorted(CORPUS.rglob("*.json")):
        doc = load(path)
        if doc.get("resourceType") in ("Bundle", "Patient"):
            out.append(path)
    return out


def dutch_bundle() -> dict[str, Any]:
    """The Nictiz patient with all the zib2024 examples that point at it, in one collection Bundle."""
    entries = []
    for path in sorted(DUTCH.glob("*.json")):
        doc = load(path)
        entries.append(
            {"fullUrl": f"http://example.org/fhir/{doc['resourceType']}/{doc['id']}", "resource": doc}
        )
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def references(value: Any) -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            out.append(value["reference"])
        for v in value.values():
            out += references(v)
    elif isinstance(value, list):
        for v in value:
            out += references(v)
    return out
