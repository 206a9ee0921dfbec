"""`POST /registries/{r}/$import` and `GET /bulk/{job}` end to end: embedded TTP, receiver and gateway on
loopback (gateway.demo.embedded_chain), the outbox worker forwarding to the real receiver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

import gateway.service.app as service_app
from gateway.bulk.synth import SynthSpec, write_export
from gateway.demo import embedded_chain
from gateway.service.bulk_routes import install_bulk_routes

REGISTRY = "example-generic"


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    imports = tmp_path / "imports"
    imports.mkdir()
    original = service_app.create_app

    def create_app_with_bulk(runtime, **kw):  # noqa: ANN001, ANN003, ANN202
        app = original(runtime, **kw)
        if not any(getattr(r, "path", "") == "/bulk/{job_id}" for r in app.routes):  # until the lead wires it
            install_bulk_routes(app, runtime, work_root=tmp_path / "bulk", import_dir=imports)
        else:
            app.state.bulk_jobs.work_root, app.state.bulk_jobs.import_dir = tmp_path / "bulk", imports
        return app

    monkeypatch.setattr(service_app, "create_app", create_app_with_bulk)
    with embedded_chain(tmp_path / "chain", [REGISTRY]) as c:
        yield c, imports


def wait_done(client: httpx.Client, location: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(location)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202
        assert time.monotonic() < deadline, response.json()
        time.sleep(0.1)


def wait_received(receiver: str, bundles: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = httpx.get(f"{receiver}/_accepted").json()
        if sum(counts.values()) >= bundles or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def test_ndjson_upload_is_delivered_to_the_registry(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, _ = chain
    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=5, objecting={2}))
    body = b"".join(
        (tmp_path / "export" / f"{t}.ndjson").read_bytes()
        for t in (
            "Patient",
            "Encounter",
            "Observation",
            "Condition",
            "Procedure",
            "Organization",
            "Practitioner",
            "Consent",
        )
    )
    headers = {"Content-Type": "application/fhir+ndjson"}
    auth = {"Authorization": f"Bearer {c.ehr_api_key}"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        response = client.post(f"/registries/{REGISTRY}/$import", content=body, headers=headers)
        assert response.status_code == 202, response.text
        location = response.headers["Content-Location"]
        assert location.startswith("/bulk/")
        status = wait_done(client, location)
        assert status["state"] == "completed", status
        summary = status["summary"]
        assert summary["patients"] == 6 and summary["patientsOptedOut"] == 1
        assert summary["sent"]["Patient"] == 5
        assert not list((tmp_path / "bulk").glob("*"))  # the job folder (with the upload) does not stay
        counts = wait_received(c.receiver_url, summary["bundles"])
    assert len(counts) == summary["bundles"] and set(counts.values()) == {1}
    received = httpx.get(f"{c.receiver_url}/deliveries").json()
    assert sum((d.get("resourceCounts") or {}).get("Patient", 0) for d in received) == 5


def test_manifest_import_and_access_rules(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, imports = chain
    write_export(imports / "exp", SynthSpec(patients=3, resources_per_patient=3))
    manifest = {
        "output": [{"type": t, "url": f"exp/{t}.ndjson"} for t in ("Patient", "Encounter", "Observation")]
    }
    auth = {"Authorization": f"Bearer {c.ehr_api_key}"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        response = client.post(
            f"/registries/{REGISTRY}/$import",
            content=orjson.dumps(manifest),
            headers=auth | {"Content-Type": "application/json"},
        )
        assert response.status_code == 202
        status = wait_done(client, response.headers["Content-Location"])
        assert status["state"] == "completed" and status["summary"]["sent"]["Patient"] == 3
        # a manifest naming a file outside the import folder fails without reading it
        outside = {"output": [{"type": "Patient", "url": "../../etc/passwd"}]}
        response = client.post(
            f"/registries/{REGISTRY}/$import",
            content=orjson.dumps(outside),
            headers=auth | {"Content-Type": "application/json"},
        )
        status = wait_done(client, response.headers["Content-Location"])
        assert status["state"] == "failed" and "outside" in status["error"]
        # authentication and registry authorisation as on the Bundle endpoint
        anonymous = httpx.post(
            f"{c.gateway_url}/registries/{REGISTRY}/$import",
            content=b"{}",
            headers={"Content-Type": "application/fhir+ndjson"},
        )
        assert anonymous.status_code == 401
        assert (
            client.post(
                "/registries/nope/$import",
                content=b"{}",
                headers=auth | {"Content-Type": "application/fhir+ndjson"},
            ).status_code
            == 404
        )
        assert (
            client.post(
                f"/registries/{REGISTRY}/$import", content=b"x", headers=auth | {"Content-Type": "text/plain"}
            ).status_code
            == 415
        )
        assert client.get("/bulk/unknown", headers=auth).status_code == 404
        assert httpx.get(c.gateway_url + response.headers["Content-Location"]).status_code == 401
