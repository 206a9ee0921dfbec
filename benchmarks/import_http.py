"""A yearly delivery over HTTP (`POST $import`) while the EHR keeps posting live Bundles.

The gateway runs as an operator runs it (`fhir-gateway serve --config`, its own OS process, SQLite); the
reference TTP and the registry receiver run in this process (tests/processes.py). For each worker setting
(`FHIR_GATEWAY_BULK_WORKERS`: chain in niced worker processes, or 0: in a thread of the gateway process)
the same synthetic NDJSON export is uploaded, and a second client posts the 10-entry example Bundle every
50 ms until the job is done. Printed: the time until the job is done and until the registry holds every
Bundle, and the latency of the live posts during the job (what bulk work costs the EHR's deliveries).

    .venv/bin/python benchmarks/import_http.py [--patients 1000] [--per-patient 100] [--workers 2,0]
"""

# ruff: noqa: E402 - imports follow the sys.path guard below
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/http.py would shadow the standard `http` package: keep this folder off sys.path; the repository
# root goes on it for tests.processes (the process chain the test suite uses).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import httpx
import orjson

from gateway.bulk.synth import SynthSpec, write_export
from tests.processes import process_chain

REGISTRY = "example-generic"
FINISHED = ("completed", "failed")
LIVE_BUNDLE = ROOT / "examples" / "02-nlps1-vector-patients-transaction.json"


def _post_live(url: str, auth: dict[str, str], stop: threading.Event, latencies: list[float]) -> None:
    bundle = orjson.loads(LIVE_BUNDLE.read_bytes())
    headers = auth | {"Content-Type": "application/fhir+json"}
    with httpx.Client(timeout=60, headers=headers) as client:
        while not stop.is_set():
            # a new Bundle.identifier each time: a new delivery, not a re-post of the same one
            bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
            body = orjson.dumps(bundle)
            started = time.perf_counter()
            response = client.post(f"{url}/registries/{REGISTRY}/Bundle", content=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)


def run_once(work: Path, body: bytes, workers: int) -> None:
    work.mkdir()
    with process_chain(work, receiver_faults=False) as chain:
        env = {"FHIR_GATEWAY_BULK_WORK_DIR": str(work / "bulk"), "FHIR_GATEWAY_BULK_WORKERS": str(workers)}
        gateway = chain.start_gateway(log_level="WARNING", extra_env=env)
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        latencies: list[float] = []
        stop = threading.Event()
        live = threading.Thread(target=_post_live, args=(gateway.url, auth, stop, latencies))
        started = time.perf_counter()
        live.start()
        try:
            response = httpx.post(
                f"{gateway.url}/registries/{REGISTRY}/$import",
                content=body,
                headers=auth | {"Content-Type": "application/fhir+ndjson"},
                timeout=600,
            )
            response.raise_for_status()
            status_url = gateway.url + response.headers["Content-Location"]
            while (status := httpx.get(status_url, headers=auth).json())["state"] not in FINISHED:
                time.sleep(0.2)
            job_done = time.perf_counter() - started
        finally:
            stop.set()
            live.join()
        summary = status["summary"]
        while httpx.get(f"{chain.receiver_url}/").json()["bundles"] < summary["bundles"] + len(latencies):
            time.sleep(0.2)
        at_registry = time.perf_counter() - started
    latencies.sort()
    print(
        f"workers {workers} (status: workerProcesses {summary['workerProcesses']}): "
        f"job done {job_done:.1f} s, "
        f"at the registry {at_registry:.1f} s, {summary['bundles']} Bundles; live posts during the job: "
        f"{len(latencies)}, p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--per-patient", type=int, default=100, help="resources per patient")
    parser.add_argument("--workers", default="2,0", help="comma-separated FHIR_GATEWAY_BULK_WORKERS values")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="import-http-"))
    write_export(work / "export", SynthSpec(patients=args.patients, resources_per_patient=args.per_patient))
    body = b"".join(p.read_bytes() for p in sorted((work / "export").glob("*.ndjson")))
    print(f"export: {args.patients * args.per_patient:,} resources, {len(body) / 1e6:.1f} MB", flush=True)
    for run, workers in enumerate(int(w) for w in args.workers.split(",")):
        run_once(work / f"run-{run}-workers-{workers}", body, workers)


if __name__ == "__main__":
    main()
