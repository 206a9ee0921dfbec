"""`POST /registries/{r}/$import` and `GET /bulk/{job}` end to end: embedded TTP, receiver and gateway on
loopback (gateway.demo.embedded_chain), the outbox worker forwarding to the real receiver."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

import gateway.service.app as service_app
from gateway.bulk import sources
from gateway.bulk.synth import SynthSpec, write_export
from gateway.demo import embedded_chain
from gateway.outcome import FhirError
from gateway.service.bulk_routes import import_dirs, install_bulk_routes
from tests.processes import alive, descendants, process_chain

REGISTRY = "example-generic"


@pytest.fixture
def chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    imports = tmp_path / "imports"
    imports.mkdir()
    original = service_app.create_app
    apps = []

    def create_app_with_bulk(runtime, **kw):  # noqa: ANN001, ANN003, ANN202
        app = original(runtime, **kw)
        apps.append(app)
        if not any(getattr(r, "path", "") == "/bulk/{job_id}" for r in app.routes):  # until the lead wires it
            install_bulk_routes(app, runtime, work_root=tmp_path / "bulk", import_dir=imports)
        else:
            app.state.bulk_jobs.work_root = tmp_path / "bulk"
            app.state.bulk_jobs.import_dirs = import_dirs(runtime.config.providers, imports)
        return app

    monkeypatch.setattr(service_app, "create_app", create_app_with_bulk)
    with embedded_chain(tmp_path / "chain", [REGISTRY]) as c:
        c.app = apps[-1]
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
        assert summary["workerProcesses"] == 0  # a runtime handed its TTP client: the job thread runs it
        assert not list((tmp_path / "bulk").glob("*"))  # the job folder (with the upload) does not stay
        counts = wait_received(c.receiver_url, summary["bundles"])
        # the status says what the registry has: the job's Bundles in the outbox, by status (a probe read
        # "completed" as delivered while the registry had nothing)
        deadline = time.monotonic() + 30
        while (outbox := client.get(location).json()["outbox"])["delivered"] < summary["bundles"]:
            assert time.monotonic() < deadline, outbox
            time.sleep(0.1)
        assert outbox == {"queued": 0, "delivering": 0, "delivered": summary["bundles"], "dead": 0}
    assert len(counts) == summary["bundles"] and set(counts.values()) == {1}
    received = httpx.get(f"{c.receiver_url}/deliveries").json()
    assert sum((d.get("resourceCounts") or {}).get("Patient", 0) for d in received) == 5


def test_the_same_upload_sent_again_is_not_delivered_twice(chain, tmp_path: Path) -> None:  # noqa: ANN001
    """An upload cut off by a restart cannot resume (its folder, the hospital's data in clear, goes): the
    hospital sends it again. That was a new job, which delivered every patient a second time."""
    c, _ = chain
    write_export(tmp_path / "export", SynthSpec(patients=4, resources_per_patient=3))
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=_auth(c)) as client:
        first = _upload_and_wait(client, tmp_path / "export")["summary"]
        wait_received(c.receiver_url, first["bundles"])
        again = _upload_and_wait(client, tmp_path / "export")["summary"]
    assert first["bundles"] >= 1 and again["bundles"] == 0
    assert again["bundlesAlreadyStored"] == first["bundles"] and again["sent"] == first["sent"]
    time.sleep(0.5)  # anything stored by the second job would be on its way by now
    counts = httpx.get(f"{c.receiver_url}/_accepted").json()
    assert len(counts) == first["bundles"] and set(counts.values()) == {1}


def _ndjson(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.ndjson")))


def _auth(c) -> dict[str, str]:  # noqa: ANN001 - a DemoChain
    return {"Authorization": f"Bearer {c.ehr_api_key}"}


def _upload_and_wait(client: httpx.Client, export: Path) -> dict:
    """Upload the export as one NDJSON body to `$import` and return the job's final status."""
    ndjson = {"Content-Type": "application/fhir+ndjson"}
    posted = client.post(f"/registries/{REGISTRY}/$import", content=_ndjson(export), headers=ndjson)
    assert posted.status_code == 202, posted.text
    return wait_done(client, posted.headers["Content-Location"])


def _import_on_served_gateway(work: Path, body: bytes, workers: int) -> dict:
    """`fhir-gateway serve --config` as an OS process (its own TTP, receiver and keys under `work`)."""
    work.mkdir()
    with process_chain(work) as chain:
        env = {"FHIR_GATEWAY_BULK_WORK_DIR": str(work / "bulk"), "FHIR_GATEWAY_BULK_WORKERS": str(workers)}
        gw = chain.start_gateway(extra_env=env)
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        with httpx.Client(base_url=gw.url, timeout=30, headers=auth) as client:
            response = client.post(
                f"/registries/{REGISTRY}/$import",
                content=body,
                headers={"Content-Type": "application/fhir+ndjson"},
            )
            assert response.status_code == 202, response.text
            status = wait_done(client, response.headers["Content-Location"], timeout=120)
        assert status["state"] == "completed", status
        summary = status["summary"]
        wait_received(chain.receiver_url, summary["bundles"])
        received = httpx.get(f"{chain.receiver_url}/deliveries").json()
        summary["receivedPatients"] = sum((d.get("resourceCounts") or {}).get("Patient", 0) for d in received)
        assert "Traceback" not in gw.logs()
        return summary


def test_served_gateway_runs_an_import_in_worker_processes_as_it_would_in_process(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=12, resources_per_patient=5, objecting={3, 7}))
    body = _ndjson(tmp_path / "export")
    pooled = _import_on_served_gateway(tmp_path / "pooled", body, workers=2)
    threaded = _import_on_served_gateway(tmp_path / "threaded", body, workers=0)
    assert pooled["workerProcesses"] == 2 and threaded["workerProcesses"] == 0
    keys = ("sent", "dropped", "patientsOptedOut", "resourcesOptedOut", "bundles", "receivedPatients")
    assert {k: pooled[k] for k in keys} == {k: threaded[k] for k in keys}
    assert pooled["patientsOptedOut"] == 2 and pooled["receivedPatients"] == 10


def test_manifest_import_and_access_rules(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, imports = chain
    write_export(imports / "exp", SynthSpec(patients=3, resources_per_patient=3))
    manifest = {
        "output": [{"type": t, "url": f"exp/{t}.ndjson"} for t in ("Patient", "Encounter", "Observation")],
        # the kick-off request, as servers write it; its filter can carry a BSN
        "request": "https://ehr.example.org/fhir/$export?_typeFilter=Patient%3Fidentifier%3D999911120",
    }
    auth = {"Authorization": f"Bearer {c.ehr_api_key}"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:

        def imported(manifest: dict) -> tuple[dict, str]:
            response = client.post(
                f"/registries/{REGISTRY}/$import",
                content=orjson.dumps(manifest),
                headers=auth | {"Content-Type": "application/json"},
            )
            assert response.status_code == 202
            where = response.headers["Content-Location"]
            return wait_done(client, where), where

        status, location = imported(manifest)
        assert status["state"] == "completed" and status["summary"]["sent"]["Patient"] == 3
        # what is kept for the resume window names the files, nothing else that was posted (a probe)
        (kept,) = (tmp_path / "bulk").glob("*/manifest.json")
        assert b"999911120" not in kept.read_bytes() and b"request" not in kept.read_bytes()
        # a manifest that cannot be read or names files it may not is refused at once (400), no job
        # (a fresh-eyes probe: these were 202 and a failed job)
        def refused(body: bytes) -> str:
            json_type = auth | {"Content-Type": "application/json"}
            response = client.post(f"/registries/{REGISTRY}/$import", content=body, headers=json_type)
            assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"
            return response.json()["issue"][0]["diagnostics"]

        jobs_before = len(client.get("/bulk").json())
        assert "outside the import folder" in refused(b'{"output":[{"url":"../../etc/passwd"}]}')
        assert "no remote download" in refused(b'{"output":[{"url":"http://example.org/Patient.ndjson"}]}')
        # a file url with a host was read as a local path (a probe): it names another machine's file
        on_a_host = orjson.dumps({"output": [{"url": f"file://127.0.0.1{imports}/exp/Patient.ndjson"}]})
        assert "no remote download" in refused(on_a_host)
        assert "not readable JSON" in refused(b'{"output":[')
        assert "no output list" in refused(b"{}")
        assert "names no file" in refused(b'{"output":[]}')  # was a 202 and a failed job (a later probe)
        assert "names no file" in refused(b'{"output":[{"url":"http://[::1"}]}')  # was a 500 (a review)
        too_long = orjson.dumps({"output": [{"url": "exp/" + "x" * 300 + ".ndjson"}]})
        assert "missing file" in refused(too_long)  # a name over the file system's limit was a 500 (a probe)
        # a missing file is named by its place in the manifest, never by its name (it may carry anything)
        named = "exp/Patient-MRN00042-999911120.ndjson"
        text = refused(orjson.dumps({"output": [{"type": "Patient", "url": named}]}))
        assert text.endswith("output[0] names a missing file") and "MRN00042" not in text
        # a probe's manifest of 21,000 entries held the event loop for 2.3 s: entries are capped, and the
        # same url again is looked at once
        capped = {"output": [{"url": f"exp/{n}.ndjson"} for n in range(sources.MAX_MANIFEST_FILES + 1)]}
        assert "more than 10,000 files" in refused(orjson.dumps(capped))
        assert len(client.get("/bulk").json()) == jobs_before
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
        assert httpx.get(c.gateway_url + location).status_code == 401


def test_an_upload_refused_half_way_leaves_neither_folder_nor_job(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, _ = chain
    jobs = c.app.state.bulk_jobs
    jobs.max_upload_bytes = 10_000
    write_export(tmp_path / "export", SynthSpec(patients=20, resources_per_patient=5))
    body = _ndjson(tmp_path / "export")
    assert len(body) > jobs.max_upload_bytes
    response = httpx.post(
        f"{c.gateway_url}/registries/{REGISTRY}/$import",
        content=body,
        headers={"Authorization": f"Bearer {c.ehr_api_key}", "Content-Type": "application/fhir+ndjson"},
        timeout=30,
    )
    assert response.status_code == 413 and response.json()["issue"][0]["code"] == "too-costly"
    assert jobs.jobs == {}
    assert not [p for p in (tmp_path / "bulk").iterdir()]  # the part that arrived is gone


def test_a_gateway_killed_mid_import_leaves_no_workers_and_its_upload_is_removed_at_restart(
    tmp_path: Path,
) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=1500, resources_per_patient=20))
    body = _ndjson(tmp_path / "export")
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        env = {"FHIR_GATEWAY_BULK_WORK_DIR": str(tmp_path / "bulk"), "FHIR_GATEWAY_BULK_WORKERS": "2"}
        gw = chain.start_gateway(extra_env=env)
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        response = httpx.post(
            f"{gw.url}/registries/{REGISTRY}/$import",
            content=body,
            headers=auth | {"Content-Type": "application/fhir+ndjson"},
            timeout=60,
        )
        assert response.status_code == 202
        deadline = time.monotonic() + 120
        while True:
            status = httpx.get(gw.url + response.headers["Content-Location"], headers=auth).json()
            if status["state"] == "delivering" and status["progress"]["done"] >= 1:
                break
            assert status["state"] not in ("completed", "failed") and time.monotonic() < deadline, status
            time.sleep(0.05)
        children = descendants(gw.proc.pid)
        assert len(children) >= 2  # the chain's worker processes (and multiprocessing's resource tracker)
        job_folder = tmp_path / "bulk" / status["job"]
        assert (job_folder / "upload.ndjson").stat().st_mode & 0o777 == 0o600  # the hospital's data in clear
        assert job_folder.stat().st_mode & 0o777 == 0o700
        gw.kill()  # SIGKILL: no clean-up runs in the gateway
        deadline = time.monotonic() + 30
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(children), "worker processes outlived the gateway"
        assert job_folder.exists()
        restarted = chain.start_gateway(extra_env=env)
        assert not job_folder.exists()  # the hospital's upload, in clear, does not stay behind
        assert "removed 1 bulk job folders" in restarted.logs()


def test_an_import_is_cut_into_bundles_of_the_registrys_bulk_bundle_size(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, _ = chain
    registries = c.runtime.config.registries
    registries[REGISTRY] = registries[REGISTRY].model_copy(update={"bulk_bundle_size": 8})
    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=5))
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=_auth(c)) as client:
        summary = _upload_and_wait(client, tmp_path / "export")["summary"]
    wait_received(c.receiver_url, summary["bundles"])
    counts = [d["resourceCounts"] for d in httpx.get(f"{c.receiver_url}/deliveries").json()]
    # a patient's 5 resources with the shared ones they refer to fill a Bundle of 8: one patient per Bundle
    # (a patient is never split; the default of 500 would carry all six in one)
    assert len(counts) == summary["bundles"] == 6
    assert [n["Patient"] for n in counts] == [1] * 6


def test_a_manifest_import_cut_off_by_a_killed_gateway_resumes_where_it_stopped(tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    write_export(imports / "year", SynthSpec(patients=1500, resources_per_patient=8))
    types = ("Patient", "Encounter", "Observation", "Condition", "Procedure", "Organization", "Practitioner")
    manifest = orjson.dumps({"output": [{"type": t, "url": f"year/{t}.ndjson"} for t in types]})
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        env = {
            "FHIR_GATEWAY_BULK_WORK_DIR": str(tmp_path / "bulk"),
            "FHIR_GATEWAY_BULK_IMPORT_DIR": str(imports),
            "FHIR_GATEWAY_WORKER_LEASE_SECONDS": "2",  # deliveries in flight at the kill are sent again soon
        }
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        headers = auth | {"Content-Type": "application/json"}
        gw = chain.start_gateway(extra_env=env)
        first = httpx.post(f"{gw.url}/registries/{REGISTRY}/$import", content=manifest, headers=headers)
        assert first.status_code == 202
        location = first.headers["Content-Location"]
        again = httpx.post(f"{gw.url}/registries/{REGISTRY}/$import", content=manifest, headers=headers)
        assert again.headers["Content-Location"] == location  # the same export while it runs: the same job
        started = httpx.get(gw.url + location, headers=auth).json()["startedAt"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", started), started
        deadline = time.monotonic() + 120
        while True:
            status = httpx.get(gw.url + location, headers=auth).json()
            if status["state"] == "delivering" and status["progress"]["done"] >= 2:
                break
            assert status["state"] not in ("completed", "failed") and time.monotonic() < deadline, status
            time.sleep(0.02)
        gw.kill()  # mid-job: some groups stored, the rest not
        gw = chain.start_gateway(extra_env=env)
        told = httpx.get(gw.url + location, headers=auth)  # a client polling across the restart learns why
        assert told.status_code == 200 and told.json()["state"] == "failed"
        assert "post the manifest again to resume" in told.json()["error"]
        assert told.json()["startedAt"] == started  # when it was posted, not when the restart found it
        resumed = httpx.post(f"{gw.url}/registries/{REGISTRY}/$import", content=manifest, headers=headers)
        assert resumed.status_code == 202 and resumed.headers["Content-Location"] == location
        with httpx.Client(base_url=gw.url, headers=auth, timeout=30) as client:
            status = wait_done(client, location, timeout=120)
        summary = status["summary"]
        assert status["state"] == "completed", status
        assert summary["groupsTotal"] == 8 and 2 <= summary["groupsResumed"] < 8, summary
        folder = tmp_path / "bulk" / status["job"]
        assert not (folder / "index.db").exists()  # the offsets go; the state stays for the resume window
        again = httpx.post(f"{gw.url}/registries/{REGISTRY}/$import", content=manifest, headers=headers)
        assert again.json()["state"] == "completed"  # the same export again: nothing is delivered twice
        gw.kill(signal.SIGTERM)
        gw = chain.start_gateway(extra_env=env)
        kept = httpx.get(gw.url + location, headers=auth).json()  # and after another restart, its summary
        assert kept["state"] == "completed" and kept["summary"]["sent"] == summary["sent"]
        assert kept["progress"] == {"done": 8, "total": 8}  # was 0/0 after a restart
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            accepted = httpx.get(f"{chain.receiver_url}/_accepted").json()
            received = httpx.get(f"{chain.receiver_url}/deliveries").json()
            patients = {d["identifier"]: d["resourceCounts"].get("Patient", 0) for d in received}
            if sum(patients.values()) >= 1500:
                break
            time.sleep(0.2)
    # every patient reached the registry in exactly one Bundle; a Bundle sent twice is one in flight at the
    # kill (sent, not yet recorded), the same Bundle.identifier, which the registry's upsert absorbs
    counts = {k: v for k, v in summary.items() if k not in ("resourcesIn", "sent")}
    assert sum(patients.values()) == 1500, counts
    assert sum(n > 1 for n in accepted.values()) <= 4  # at most the worker's concurrency


def test_abandoned_folders_go_uploads_at_once_manifest_jobs_after_their_resume_window(tmp_path: Path) -> None:
    from gateway.bulk.service import OWNER_LOCK, remove_abandoned_jobs

    for name, data in (("upload-job", "upload.ndjson"), ("manifest-job", "manifest.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / OWNER_LOCK).touch()  # no process holds it: the job's gateway is gone
        (tmp_path / name / data).write_text("{}")
    assert remove_abandoned_jobs(tmp_path, resume_seconds=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest-job"]
    assert remove_abandoned_jobs(tmp_path, resume_seconds=0) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_same_export_again_delivers_nothing_a_changed_one_is_a_new_job(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, imports = chain
    write_export(imports / "exp", SynthSpec(patients=4, resources_per_patient=3))
    manifest = orjson.dumps(
        {"output": [{"type": t, "url": f"exp/{t}.ndjson"} for t in ("Patient", "Encounter", "Observation")]}
    )
    headers = {"Authorization": f"Bearer {c.ehr_api_key}", "Content-Type": "application/json"}

    def post() -> tuple[str, dict]:
        with httpx.Client(base_url=c.gateway_url, timeout=30, headers=headers) as client:
            answer = client.post(f"/registries/{REGISTRY}/$import", content=manifest)
            location = answer.headers["Content-Location"]
            return location, wait_done(client, location)

    first, status = post()
    assert status["state"] == "completed" and status["summary"]["sent"]["Patient"] == 4
    wait_received(c.receiver_url, status["summary"]["bundles"])
    received = len(httpx.get(f"{c.receiver_url}/_accepted").json())
    second, again = post()
    assert second == first and again == status  # answered from the finished job: nothing sent again
    changed = imports / "exp" / "Observation.ndjson"
    changed.write_bytes(changed.read_bytes())  # the hospital wrote this year's export again
    third, fresh = post()
    assert third != first and fresh["state"] == "completed" and fresh["summary"]["groupsResumed"] == 0
    counts = wait_received(c.receiver_url, received + fresh["summary"]["bundles"])
    assert len(counts) == received + fresh["summary"]["bundles"]  # delivered once more, as new Bundles


def test_a_client_lists_its_jobs_and_the_metrics_count_them(chain, tmp_path: Path) -> None:  # noqa: ANN001
    c, _ = chain
    write_export(tmp_path / "export", SynthSpec(patients=2, resources_per_patient=3))
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=_auth(c)) as client:
        done = _upload_and_wait(client, tmp_path / "export")
        listing = client.get("/bulk").json()
    assert [j["job"] for j in listing] == [done["job"]]
    assert listing[0]["state"] == "completed" and "summary" not in listing[0]
    assert httpx.get(f"{c.gateway_url}/bulk").status_code == 401
    admin = {"Authorization": f"Bearer {c.admin_api_key}"}
    metrics = httpx.get(f"{c.gateway_url}/metrics", headers=admin).text
    assert f'gateway_bulk_jobs{{registry="{REGISTRY}",state="completed"}} 1.0' in metrics


def test_finished_statuses_are_kept_up_to_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.bulk import service

    monkeypatch.setattr(service, "KEEP_FINISHED", 3)
    jobs = service.BulkJobs(None, work_root=tmp_path, import_dirs={})
    made = []
    for n in range(6):
        job = jobs.new_job("ura:1", REGISTRY)
        job.state, job.finished = "completed", float(n)
        made.append(job.id)
    running = jobs.new_job("ura:1", REGISTRY)  # still queued: never pruned
    assert set(jobs.jobs) == {*made[-3:], running.id}


def test_a_lock_held_elsewhere_is_refused_without_leaking_a_descriptor(tmp_path: Path) -> None:
    import os

    from gateway.bulk.service import _hold_lock

    held = _hold_lock(tmp_path / "lock")
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            with pytest.raises(BlockingIOError):
                _hold_lock(tmp_path / "lock")  # flock: another open file description, as another process
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(held)


def test_the_upload_limit_comes_from_the_environment(tmp_path: Path) -> None:
    write_export(tmp_path / "export", SynthSpec(patients=20, resources_per_patient=5))
    body = _ndjson(tmp_path / "export")
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        env = {"FHIR_GATEWAY_BULK_WORK_DIR": str(tmp_path / "bulk")}
        gw = chain.start_gateway(extra_env=env | {"FHIR_GATEWAY_BULK_MAX_UPLOAD_BYTES": "5000"})
        headers = {"Authorization": f"Bearer {chain.ehr_api_key}", "Content-Type": "application/fhir+ndjson"}
        url = f"{gw.url}/registries/{REGISTRY}/$import"
        response = httpx.post(url, content=body, headers=headers, timeout=30)
    assert len(body) > 5000 and response.status_code == 413
    assert not [p for p in (tmp_path / "bulk").iterdir()]


def test_the_bulk_cli_with_the_ttp_down_says_how_to_resume_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from gateway.serving import free_port

    write_export(tmp_path / "export", SynthSpec(patients=4, resources_per_patient=3))
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        config = yaml.safe_load(chain.config_path.read_text())
        config["ttp"]["url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        config["ttp"]["timeout_seconds"] = 1
        down = tmp_path / "ttp-down.yaml"
        down.write_text(yaml.safe_dump(config))
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "bulk", str(tmp_path / "export"), "--registry", REGISTRY,
             "--config", str(down), "--work-dir", str(tmp_path / "w"), "--no-wait"],
            capture_output=True, text=True, timeout=300, env=chain.env, cwd=tmp_path,
        )
    assert out.returncode == 3, out.stderr[-2000:]
    said = " ".join(out.stderr.split())  # the console wraps long lines
    assert "run again with the same --work-dir to resume" in said and "Traceback" not in said


@pytest.mark.postgres
def test_the_bulk_cli_losing_its_store_mid_run_says_how_to_resume_without_a_traceback(
    tmp_path: Path, pg_url: str
) -> None:
    """A chaos probe: a store lost during a run (here a table another session holds locked, past the lock
    timeout) ended in a traceback and exit 1 ("a line was invalid"); it is exit 3, as for the TTP."""
    import subprocess
    import sys

    import psycopg

    from gateway.store import open_store

    open_store(pg_url).close()  # the schema is there: the run starts, and its first stored Bundle waits
    write_export(tmp_path / "export", SynthSpec(patients=4, resources_per_patient=3))
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain, psycopg.connect(pg_url) as holder:
        holder.execute("LOCK TABLE delivery_patients IN ACCESS EXCLUSIVE MODE")
        env = {**chain.env, "FHIR_GATEWAY_STORE_URL": pg_url + "%20-clock_timeout%3D300"}
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "bulk", str(tmp_path / "export"), "--registry", REGISTRY,
             "--config", str(chain.config_path), "--work-dir", str(tmp_path / "w"), "--no-wait"],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )
        holder.rollback()
    said = " ".join(out.stderr.split())
    assert out.returncode == 3 and "Traceback" not in said, out.stderr[-2000:]
    assert "store unavailable" in said and "run again with the same --work-dir to resume" in said


def test_the_bulk_cli_with_a_configuration_waits_until_its_bundles_arrive(tmp_path: Path) -> None:
    import subprocess
    import sys

    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=3))
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "bulk", str(tmp_path / "export"), "--registry", REGISTRY,
             "--config", str(chain.config_path), "--work-dir", str(tmp_path / "w"), "--bundle-size", "8",
             "--workers", "0", "--json"],
            capture_output=True, text=True, timeout=300, env=chain.env, cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        stored = orjson.loads(out.stdout)["bundles"]
        # when the command returns, every Bundle it stored is at the registry (it waited for them)
        assert stored >= 2 and len(httpx.get(f"{chain.receiver_url}/_accepted").json()) == stored


def test_the_bulk_cli_run_again_waits_for_what_an_earlier_run_left_in_the_outbox(tmp_path: Path) -> None:
    """A run cut off while forwarding, then run again: the job is complete, so nothing is stored anew, and
    the second run returned at once (exit 0) with Bundles still queued and nothing saying so."""
    import subprocess
    import sys

    import yaml

    from gateway.serving import free_port

    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=3))
    (tmp_path / "c").mkdir()
    with process_chain(tmp_path / "c") as chain:
        config = yaml.safe_load(chain.config_path.read_text())
        config["registries"][REGISTRY]["endpoint"] = f"http://127.0.0.1:{free_port()}"  # nobody listens
        unreachable = tmp_path / "unreachable.yaml"
        unreachable.write_text(yaml.safe_dump(config))

        def bulk(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "gateway.cli", "bulk", str(tmp_path / "export"),
                 "--registry", REGISTRY, "--config", str(config_path), "--work-dir", str(tmp_path / "w"),
                 "--bundle-size", "8", "--workers", "0", "--json", *extra],
                capture_output=True, text=True, timeout=300, env=chain.env, cwd=tmp_path,
            )  # fmt: skip

        first = bulk(unreachable, "--no-wait")
        assert first.returncode == 0, first.stderr[-2000:]
        stored = orjson.loads(first.stdout)["bundles"]
        assert stored >= 2 and len(httpx.get(f"{chain.receiver_url}/_accepted").json()) == 0
        again = bulk(chain.config_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert orjson.loads(again.stdout)["bundles"] == stored  # the stored summary: nothing new
        assert len(httpx.get(f"{chain.receiver_url}/_accepted").json()) == stored  # and it waited for them


def test_a_manifest_names_files_only_in_its_own_providers_folder(tmp_path: Path) -> None:
    """One import folder for every caller: a second hospital's EHR posted a manifest of the first one's
    files and delivered them as its own, past the first hospital's objection register."""
    from types import SimpleNamespace

    from gateway.bulk import service

    first, second = SimpleNamespace(id="ura:1", import_dir=None), SimpleNamespace(id="ura:2", import_dir=None)
    shared = tmp_path / "imports"
    assert import_dirs([first], shared) == {"ura:1": shared}  # one provider: the gateway's folder is its own
    assert import_dirs([first, second], shared) == {}  # several: only a folder of its own
    second.import_dir = tmp_path / "second"
    assert import_dirs([first, second], shared) == {"ura:2": tmp_path / "second"}
    (tmp_path / "second").mkdir()
    shared.mkdir()
    (shared / "Patient.ndjson").write_bytes(b"{}\n")
    folders = import_dirs([first, second], shared)
    jobs = service.BulkJobs(None, work_root=tmp_path / "bulk", import_dirs=folders)
    manifest = orjson.dumps({"output": [{"type": "Patient", "url": "../imports/Patient.ndjson"}]})
    for provider, status in (("ura:1", 403), ("ura:2", 400)):
        with pytest.raises(FhirError) as refused:
            jobs.manifest_job(provider, REGISTRY, manifest)
        assert refused.value.status == status
        # a probe posted a Bundle here and read only "manifest imports are not enabled"
        assert status == 400 or f"/registries/{REGISTRY}/Bundle" in refused.value.issues[0].diagnostics


def test_an_upload_is_checked_as_a_posted_bundle_is(chain) -> None:  # noqa: ANN001
    """A probe: a latin-1 or gzip upload became a "completed" job of malformed lines, an empty one a
    "completed" job of nothing; none of them could ever deliver anything."""
    import gzip

    c, _ = chain
    line = b'{"resourceType": "Patient", "id": "p1"}\n'
    auth = {"Authorization": f"Bearer {c.ehr_api_key}"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        before = len(client.get("/bulk").json())
        ndjson = {"Content-Type": "application/fhir+ndjson"}
        for content, headers, status in [
            (line, {"Content-Type": "application/fhir+ndjson; charset=latin1"}, 415),
            (gzip.compress(line), ndjson | {"Content-Encoding": "gzip"}, 415),
            (b"", ndjson, 400),
            (line.decode().encode("utf-16"), ndjson, 415),  # a BOM, then every other byte NUL
        ]:
            response = client.post(f"/registries/{REGISTRY}/$import", content=content, headers=headers)
            assert response.status_code == status, response.text
            assert response.json()["resourceType"] == "OperationOutcome"
        assert len(client.get("/bulk").json()) == before  # no job, and no folder left behind


def test_bulk_jobs_beyond_the_limit_are_answered_429(tmp_path: Path) -> None:
    """30 uploads at once started 30 jobs and 31 processes (a probe)."""
    from gateway.bulk import service

    jobs = service.BulkJobs(None, work_root=tmp_path, import_dirs={}, max_jobs=1)
    first = jobs.new_job("ura:1", REGISTRY)
    with pytest.raises(FhirError) as refused:
        jobs.new_job("ura:1", REGISTRY)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]
    first.state = "completed"
    assert jobs.new_job("ura:1", REGISTRY).running


def test_one_export_posted_to_two_gateways_of_one_store_is_delivered_once(tmp_path: Path) -> None:
    """A probe: two scale-out gateways on one store, each with its own bulk folder (two hosts), each ran the
    same manifest as a job of its own random id, and the registry got every patient twice. The bulk job's
    id now follows from the export, so the second finds every Bundle in the outbox already."""
    imports = tmp_path / "imports"
    write_export(imports / "year", SynthSpec(patients=200, resources_per_patient=4))
    types = ("Patient", "Encounter", "Observation", "Condition", "Organization", "Practitioner")
    manifest = orjson.dumps({"output": [{"type": t, "url": f"year/{t}.ndjson"} for t in types]})
    (tmp_path / "c").mkdir()
    summaries = []
    with process_chain(tmp_path / "c") as chain:
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        for host in ("a", "b"):
            env = {"FHIR_GATEWAY_BULK_WORK_DIR": str(tmp_path / host)}
            gw = chain.start_gateway(extra_env=env | {"FHIR_GATEWAY_BULK_IMPORT_DIR": str(imports)})
            posted = httpx.post(
                f"{gw.url}/registries/{REGISTRY}/$import",
                content=manifest,
                headers=auth | {"Content-Type": "application/json"},
            )
            assert posted.status_code == 202, posted.text
            with httpx.Client(base_url=gw.url, headers=auth, timeout=30) as client:
                status = wait_done(client, posted.headers["Content-Location"], timeout=120)
            assert status["state"] == "completed", status
            summaries.append(status["summary"])
        first, second = summaries
        assert first["bundles"] > 1 and first["bundlesAlreadyStored"] == 0
        assert (second["bundles"], second["bundlesAlreadyStored"]) == (0, first["bundles"])
        admin = {"Authorization": f"Bearer {chain.admin_api_key}"}
        outbox = httpx.get(f"{gw.url}/admin/deliveries", headers=admin).json()
        assert len(outbox) == first["bundles"]  # what is in the outbox is all the registry can ever get
        wait_received(chain.receiver_url, first["bundles"])
        assert len(httpx.get(f"{chain.receiver_url}/deliveries").json()) == first["bundles"]


def test_replay_sends_an_export_folder_as_one_import_and_waits_for_its_job(chain, tmp_path: Path) -> None:  # noqa: ANN001
    """A probe: `replay EXPORT/` posted each NDJSON file as a job of its own (Condition.ndjson alone: every
    line without its patient; Consent.ndjson alone failed) and showed outcome "?" without waiting."""
    from gateway.replay import expand, replay

    c, _ = chain
    write_export(tmp_path / "export", SynthSpec(patients=6, resources_per_patient=5, objecting={2}))
    files = expand([tmp_path / "export"])
    assert files == [tmp_path / "export"]
    (result,) = replay(files, base_url=c.gateway_url, registry=REGISTRY, api_key=c.ehr_api_key)
    assert (result.status, result.outcome) == (200, "completed"), result
    assert "patients 6, opted out 1" in result.detail and result.delivery


def test_one_hospital_cannot_take_every_bulk_job_slot(tmp_path: Path) -> None:
    """A probe: two uploads trickled a byte every 10 s held both job slots for as long as they liked, and the
    other hospital's uploads and manifests were 429. Where several providers share the gateway, one runs at
    most half of FHIR_GATEWAY_BULK_MAX_JOBS."""
    from gateway.bulk import service

    jobs = service.BulkJobs(None, work_root=tmp_path, import_dirs={}, max_jobs=2, providers=2)
    jobs.new_job("ura:1", REGISTRY)
    with pytest.raises(FhirError) as refused:
        jobs.new_job("ura:1", REGISTRY)
    assert refused.value.status == 429
    assert jobs.new_job("ura:2", REGISTRY).running
    alone = service.BulkJobs(None, work_root=tmp_path / "alone", import_dirs={}, max_jobs=2, providers=1)
    assert alone.new_job("ura:1", REGISTRY).running and alone.new_job("ura:1", REGISTRY).running


def test_an_upload_of_only_invalid_lines_is_a_failed_job(chain) -> None:  # noqa: ANN001
    """A probe: `hello\\nworld` uploaded became a "completed" job (with two invalid lines), where the CLI
    exits 1: nothing could ever be delivered from it."""
    c, _ = chain
    auth = {"Authorization": f"Bearer {c.ehr_api_key}", "Content-Type": "application/fhir+ndjson"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        response = client.post(f"/registries/{REGISTRY}/$import", content=b"hello\nworld\n")
        assert response.status_code == 202, response.text
        status = wait_done(client, response.headers["Content-Location"])
    assert status["state"] == "failed" and "nothing was delivered" in status["error"], status
    assert len(status["summary"]["invalidLines"]) == 2


def test_a_running_jobs_status_counts_the_bundles_it_has_stored(chain, tmp_path: Path) -> None:  # noqa: ANN001
    """A re-probe: while a job stored its Bundles (`delivering`), its `outbox` counts were all zero: they
    were looked up under the status's job id, not the id in the Bundles' outbox keys."""
    c, _ = chain
    write_export(tmp_path / "export", SynthSpec(patients=600, resources_per_patient=6))
    body = b"".join(p.read_bytes() for p in sorted((tmp_path / "export").glob("*.ndjson")))
    store = c.runtime.store
    before = sum(store.depth().values())
    auth = {"Authorization": f"Bearer {c.ehr_api_key}"}
    seen = []
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        headers = {"Content-Type": "application/fhir+ndjson"}
        response = client.post(f"/registries/{REGISTRY}/$import", content=body, headers=headers)
        assert response.status_code == 202, response.text
        location = response.headers["Content-Location"]
        deadline = time.monotonic() + 120
        while (status := client.get(location).json())["state"] not in ("completed", "failed"):
            stored = sum(store.depth().values()) - before  # read after the status: at least what it saw
            if status["state"] == "delivering" and "outbox" in status:
                seen.append((sum(status["outbox"].values()), stored))
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
    assert seen, "the job was never seen storing its Bundles"
    assert any(counted > 0 for counted, _ in seen), seen
    assert all(counted <= stored for counted, stored in seen), seen


def test_a_manifests_files_are_looked_at_off_the_event_loop(chain) -> None:  # noqa: ANN001
    """A probe: a manifest's files were checked inside the request handler, and one of 21,000 entries held
    every other hospital's posts (and /healthz) for 2.3 s; four at once for 5.7 s."""
    c, imports = chain
    write_export(imports / "exp", SynthSpec(patients=2, resources_per_patient=2))
    jobs = c.app.state.bulk_jobs
    checked, looked_at = jobs.manifest_job_id, []

    def on_which_thread(*args: object) -> str:
        try:
            asyncio.get_running_loop()
            looked_at.append("event loop")
        except RuntimeError:
            looked_at.append("thread")
        return checked(*args)

    jobs.manifest_job_id = on_which_thread
    once = {"type": "Patient", "url": "exp/Patient.ndjson"}
    auth = {"Authorization": f"Bearer {c.ehr_api_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=c.gateway_url, timeout=30, headers=auth) as client:
        thrice = orjson.dumps({"output": [once] * 3})
        response = client.post(f"/registries/{REGISTRY}/$import", content=thrice)
        assert response.status_code == 202, response.text
        status = wait_done(client, response.headers["Content-Location"])
    assert looked_at == ["thread"]
    assert status["state"] == "completed" and status["summary"]["sent"]["Patient"] == 2  # once, not thrice
