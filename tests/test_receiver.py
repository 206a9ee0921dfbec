"""The registry-side receiver under real uvicorn: transactions, upserts, leak-scan gate, faults, re-keying."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from gateway.receiver import ReceiverDB, create_receiver_app, rekey
from gateway.receiver.commands import app as receiver_cli
from tests.servers import serve

FHIR = {"Content-Type": "application/fhir+json"}
PSEUDED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}
_NINE_DIGITS = re.compile(r"^\d{9}$")


def bsn_like_scan_stand_in(bundle: dict[str, Any]) -> list[dict[str, str]]:
    """A stand-in for gateway.deid.leakscan.scan (written elsewhere): flags any string of nine digits."""
    findings: list[dict[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str) and _NINE_DIGITS.match(node):
            findings.append({"path": path, "rule": "bsn-like"})

    walk(bundle, "Bundle")
    return findings


def pseudonym(ptype: str, value: str) -> dict[str, Any]:
    return {
        "use": "secondary",
        "type": {"coding": [dict(PSEUDED)], "text": f"NLPS1 {ptype}"},
        "system": f"urn:nlps1:dica:{ptype}",
        "value": value,
    }


def make_bundle(
    n: int | str,
    patient: str = "p1",
    *,
    observations: int = 2,
    identifiers: list[dict] | None = None,
    value: float = 80.1,
) -> dict[str, Any]:
    """A pseudonymised transaction bundle as the gateway sends it: PUT entries with stable ids."""
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"urn:uuid:pat-{patient}",
            "resource": {
                "resourceType": "Patient",
                "id": patient,
                "gender": "female",
                "identifier": identifiers or [pseudonym("SNGGV", f"v1.{'A' * 22}{patient}")],
            },
            "request": {"method": "PUT", "url": f"Patient/{patient}"},
        }
    ]
    for i in range(observations):
        oid = f"{patient}-obs-{i}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:{oid}",
                "resource": {
                    "resourceType": "Observation",
                    "id": oid,
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": f"urn:uuid:pat-{patient}"},
                    "valueQuantity": {"value": value, "unit": "kg"},
                },
                "request": {"method": "PUT", "url": f"Observation/{oid}"},
            }
        )
    return {
        "resourceType": "Bundle",
        "id": f"bundle-{n}",
        "type": "transaction",
        "identifier": {"system": "urn:test:delivery", "value": f"d-{n}"},
        "entry": entries,
    }


def post(base: str, bundle: dict[str, Any] | bytes, path: str = "/", **kw: Any) -> httpx.Response:
    body = bundle if isinstance(bundle, bytes) else orjson.dumps(bundle)
    return httpx.post(base + path, content=body, headers={**FHIR, **kw.pop("headers", {})}, timeout=10, **kw)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    app = create_receiver_app(tmp_path / "recv", scan=bsn_like_scan_stand_in, test_faults=True)
    with serve(app) as base:
        yield base


def test_transaction_is_stored_and_answered(receiver: str) -> None:
    r = post(receiver, make_bundle(1))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    answer = r.json()
    assert answer["type"] == "transaction-response" and len(answer["entry"]) == 3
    assert {e["response"]["status"] for e in answer["entry"]} == {"201 Created"}
    assert answer["entry"][0]["response"]["location"] == "Patient/p1/_history/1"
    obs = httpx.get(f"{receiver}/Observation/p1-obs-0").json()
    assert obs["subject"]["reference"] == "Patient/p1"  # urn:uuid reference resolved to the stored id
    assert obs["meta"]["versionId"] == "1" and obs["valueQuantity"]["value"] == 80.1
    listing = httpx.get(f"{receiver}/deliveries").json()
    assert len(listing) == 1 and listing[0]["resourceCounts"] == {"Observation": 2, "Patient": 1}
    assert listing[0]["identifier"] == "urn:test:delivery|d-1" and listing[0]["acceptedCount"] == 1
    assert httpx.get(f"{receiver}/Bundle/{listing[0]['id']}").json()["identifier"]["value"] == "d-1"
    assert httpx.get(f"{receiver}/Bundle/bundle-1").json()["id"] == "bundle-1"
    assert httpx.get(f"{receiver}/Patient/nope").status_code == 404
    assert httpx.get(f"{receiver}/metadata").json()["resourceType"] == "CapabilityStatement"


def test_redelivery_upserts_and_is_counted(receiver: str) -> None:
    assert post(receiver, make_bundle(1, value=80.1)).status_code == 200
    again = post(receiver, make_bundle(1, value=81.0), path="/Bundle")
    assert again.status_code == 200
    assert {e["response"]["status"] for e in again.json()["entry"]} == {"200 OK"}
    obs = httpx.get(f"{receiver}/Observation/p1-obs-1").json()
    assert obs["meta"]["versionId"] == "2" and obs["valueQuantity"]["value"] == 81.0
    assert httpx.get(f"{receiver}/_accepted").json() == {"urn:test:delivery|d-1": 2}
    assert len(httpx.get(f"{receiver}/deliveries").json()) == 2


def test_a_delivery_sent_again_is_answered_and_not_applied_again(receiver: str) -> None:
    """The gateway sends a delivery again when a crash lost the registry's answer (a fresh-eyes probe saw it
    applied twice). The same bytes under the same identifier: counted, answered as the first time, and
    stored once."""
    body = orjson.dumps(make_bundle(1, value=80.1))
    first, again = post(receiver, body), post(receiver, body)
    assert first.status_code == again.status_code == 200 and again.json() == first.json()
    obs = httpx.get(f"{receiver}/Observation/p1-obs-1").json()
    assert obs["meta"]["versionId"] == "1"
    assert httpx.get(f"{receiver}/_accepted").json() == {"urn:test:delivery|d-1": 2}
    assert len(httpx.get(f"{receiver}/deliveries").json()) == 1


def test_leak_scan_finding_rejects_the_whole_bundle(receiver: str) -> None:
    leaky = make_bundle(
        2, identifiers=[{"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "111222333"}]
    )
    r = post(receiver, leaky)
    assert r.status_code == 422
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "security" and "bsn-like" in outcome["issue"][0]["diagnostics"]
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[0].resource.identifier[0].value"]
    assert "111222333" not in r.text  # the value itself is never echoed
    assert httpx.get(f"{receiver}/deliveries").json() == []
    assert httpx.get(f"{receiver}/Patient/p1").status_code == 404


def test_a_crashing_scanner_refuses_the_bundle(tmp_path: Path) -> None:
    def broken_scan(bundle: dict[str, Any]) -> list[Any]:
        raise RuntimeError("scanner bug")

    with serve(create_receiver_app(tmp_path / "r", scan=broken_scan)) as base:
        r = post(base, make_bundle(1))
        assert r.status_code == 500 and r.json()["resourceType"] == "OperationOutcome"
        assert httpx.get(f"{base}/deliveries").json() == []


def test_bad_bundles_are_refused_and_nothing_is_stored(receiver: str) -> None:
    assert post(receiver, b"{not json").status_code == 400
    assert post(receiver, {"resourceType": "Patient"}).status_code == 400
    assert post(receiver, {**make_bundle(3), "type": "collection"}).status_code == 422
    wrong = httpx.post(
        receiver + "/", content=orjson.dumps(make_bundle(3)), headers={"Content-Type": "text/plain"}
    )
    assert wrong.status_code == 415
    half_bad = make_bundle(3)
    half_bad["entry"][2]["request"]["url"] = "Observation/other-id"  # differs from resource.id
    r = post(receiver, half_bad)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Bundle.entry[2].resource.id"]
    half_bad["entry"][2]["request"] = {"method": "DELETE", "url": "Observation/p1-obs-1"}
    assert post(receiver, half_bad).status_code == 400
    assert httpx.get(f"{receiver}/Patient/p1").status_code == 404  # all or nothing
    assert httpx.get(f"{receiver}/deliveries").json() == []


def test_post_entries_get_new_ids_and_references_follow(receiver: str) -> None:
    bundle = make_bundle(4)
    for entry in bundle["entry"]:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
        del entry["resource"]["id"]
    answer = post(receiver, bundle).json()
    patient_loc = answer["entry"][0]["response"]["location"]
    obs_loc = answer["entry"][1]["response"]["location"]
    obs = httpx.get(f"{receiver}/{obs_loc.rsplit('/_history', 1)[0]}").json()
    assert obs["subject"]["reference"] == patient_loc.rsplit("/_history", 1)[0]


def test_fault_injection(receiver: str) -> None:
    faults = [
        {"status": 503, "count": 2},
        {"status": 429, "retry_after": "3"},
        {"status": 400, "diagnostics": "profile violation (test)"},
    ]
    assert len(httpx.post(f"{receiver}/_faults", json=faults).json()) == 3
    assert [post(receiver, make_bundle(5)).status_code for _ in range(2)] == [503, 503]
    throttled = post(receiver, make_bundle(5))
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "3"
    rejected = post(receiver, make_bundle(5))
    assert rejected.status_code == 400
    assert rejected.json()["issue"][0]["diagnostics"] == "profile violation (test)"
    assert httpx.get(f"{receiver}/_faults").json() == []
    assert post(receiver, make_bundle(5)).status_code == 200
    assert httpx.get(f"{receiver}/_accepted").json() == {"urn:test:delivery|d-5": 1}  # faults stored nothing
    httpx.post(f"{receiver}/_faults", json={"status": 500, "count": 9})
    assert httpx.delete(f"{receiver}/_faults").status_code == 204
    assert post(receiver, make_bundle(6)).status_code == 200
    assert httpx.post(f"{receiver}/_faults", json={"status": 200}).status_code == 400


def test_faults_are_off_unless_enabled_and_token_is_checked(tmp_path: Path) -> None:
    app = create_receiver_app(tmp_path / "r.sqlite", token="s3cret")
    with serve(app) as base:
        assert httpx.post(f"{base}/_faults", json={"status": 503}).status_code in (404, 405)
        assert post(base, make_bundle(1)).status_code == 401
        assert post(base, make_bundle(1), headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(base, make_bundle(1), headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert (tmp_path / "r.sqlite").exists()


def _v2(pairs: list[tuple[str, str, str | None]]) -> list[str | None]:
    """A small stand-in for the TTP's $translate: v1.<x> → v2.<x reversed>; MRN cannot be translated."""
    return [None if t == "MRN" else "v2." + v.split(".", 1)[1][::-1] for t, v, _ in pairs]


def test_rekey_translates_stored_pseudonyms(tmp_path: Path) -> None:
    calls: list[list[tuple[str, str, str | None]]] = []

    def translate(pairs: list[tuple[str, str, str | None]]) -> list[str | None]:
        calls.append(pairs)
        return _v2(pairs)

    app = create_receiver_app(tmp_path / "recv", translate=translate)
    other = {"system": "urn:other", "value": "keep-me"}
    with serve(app) as base:
        idents = [pseudonym("SNGGV", "v1." + "a" * 22 + "1"), pseudonym("MRN", "v1." + "m" * 22), other]
        assert post(base, make_bundle(1, "p1", identifiers=idents)).status_code == 200
        assert post(base, make_bundle(2, "p2")).status_code == 200
        result = httpx.post(f"{base}/_rekey").json()
        counts = {"patients": 2, "translated": 2, "unchanged": 0, "failed": 1}
        assert result == {**counts, "failedByType": {"MRN": 1}}  # which type failed, not only how many
        p1 = httpx.get(f"{base}/Patient/p1").json()
        assert [i["value"] for i in p1["identifier"]] == ["v2.1" + "a" * 22, "v1." + "m" * 22, "keep-me"]
        assert p1["meta"]["versionId"] == "2"
    (sent,) = calls
    assert sorted(t for t, _, _ in sent) == ["MRN", "SNGGV", "SNGGV"]  # only pseudonyms go to the TTP
    assert all(v.startswith("v1.") for _, v, _ in sent)
    # Run again: the stand-in now maps v2 values onwards; nothing is sent twice within a run.
    db = ReceiverDB(tmp_path / "recv")
    assert rekey(db, lambda pairs: [v for _, v, _ in pairs]).as_dict() == {
        "patients": 0,
        "translated": 0,
        "unchanged": 3,
        "failed": 0,
        "failedByType": {},
    }
    with pytest.raises(ValueError):
        rekey(db, lambda pairs: [])


def test_rekey_without_translate_is_not_supported(receiver: str) -> None:
    assert httpx.post(f"{receiver}/_rekey").status_code == 501


def test_cli_list(tmp_path: Path) -> None:
    app = create_receiver_app(tmp_path / "recv")
    with serve(app) as base:
        post(base, make_bundle(7))
    result = CliRunner().invoke(receiver_cli, ["list", "--data-dir", str(tmp_path / "recv")])
    assert result.exit_code == 0 and "Bundles received (1 in total)" in result.output
    missing = CliRunner().invoke(receiver_cli, ["list", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and not (tmp_path / "none").exists()


def test_rekey_through_the_reference_ttp(tmp_path: Path) -> None:
    """The HTTP adapter against the real TTP ($rotate, then $translate) with the shared rotation vectors."""
    import json

    from gateway.receiver import ttp_translator
    from gateway.ttp.app import create_app as create_ttp_app
    from gateway.ttp.testing import make_test_ttp

    vectors = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())
    keys, rows = vectors["keys"], vectors["rotation"]
    ttp = make_test_ttp(
        tmp_path / "ttp-keys", [keys["registry"]], master=bytes.fromhex(keys["ttp_master_hex"])
    )
    with serve(create_ttp_app(ttp.keystore, ttp.auth)) as ttp_base:
        translate = ttp_translator(
            ttp_base, ttp.api_keys["registry-holder"], keys["registry"], provider=keys["provider"]
        )
        with serve(create_receiver_app(tmp_path / "recv", translate=translate)) as base:
            idents = [pseudonym(row["type"], row["v1"]) for row in rows]
            assert post(base, make_bundle(1, identifiers=idents)).status_code == 200
            rotated = httpx.post(
                f"{ttp_base}/$rotate",
                headers=ttp.headers("admin"),
                json={
                    "resourceType": "Parameters",
                    "parameter": [{"name": "target", "valueString": keys["registry"]}],
                },
            )
            assert rotated.status_code == 200
            result = httpx.post(f"{base}/_rekey", timeout=30).json()
            counts = {"patients": 1, "translated": len(rows), "unchanged": 0, "failed": 0}
            assert result == {**counts, "failedByType": {}}
            patient = httpx.get(f"{base}/Patient/p1").json()
    assert [i["value"] for i in patient["identifier"]] == [row["v2"] for row in rows]


def test_cli_serve_with_the_real_leak_scanner(tmp_path: Path) -> None:
    """`fhir-gateway receiver serve` as a subprocess, with gateway.deid.leakscan as the gate."""
    import subprocess
    import sys

    from tests.servers import free_port, wait_http

    port = free_port()
    code = "from gateway.receiver.commands import app; app()"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "d"),
            "--test-faults",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/metadata", timeout=30)
        assert post(base, make_bundle(1)).status_code == 200
        bsn = {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "111222333"}
        refused = post(base, make_bundle(2, "p2", identifiers=[bsn]))
        assert refused.status_code == 422 and "111222333" not in refused.text
        assert httpx.post(f"{base}/_faults", json={"status": 503}).status_code == 200
        assert post(base, make_bundle(3)).status_code == 503
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    listing = CliRunner().invoke(receiver_cli, ["list", "--data-dir", str(tmp_path / "d")])
    assert "Bundles received (1 in total)" in listing.output


def test_copies_of_a_delivery_sent_at_once_are_applied_once(tmp_path: Path) -> None:
    """The check for an applied delivery and the apply are one transaction: two copies arriving together
    (a lease that ran out while the first was in flight) used to be both applied (a review finding)."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.receiver.transaction import apply_transaction

    db = ReceiverDB(tmp_path)
    bundle = make_bundle(1, value=80.1)
    raw = orjson.dumps(bundle)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: apply_transaction(db, orjson.loads(raw), raw), range(8)))
    assert all(a == answers[0] for a in answers)
    assert db.read("SELECT COUNT(*) FROM receipts") == [(1,)]
    assert db.read("SELECT version FROM resources WHERE id = 'p1-obs-1'") == [(1,)]
    assert db.accepted_counts() == {"urn:test:delivery|d-1": 8}



def test_a_path_with_a_trailing_slash_is_not_redirected(receiver: str) -> None:
    response = httpx.get(f"{receiver}/Bundle/x/", headers={"Host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
