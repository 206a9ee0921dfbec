"""Scale-out: API processes (`serve --no-worker`) and `fhir-gateway worker` processes against one store.

Real processes on loopback: the TTP and the receiver in threads of the test, each gateway part its own OS
process, the store a SQLite file or PostgreSQL (the CI server)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.serving import free_port
from tests.processes import ProcessChain, process_chain
from tests.soak.common import delivery_id_of, variant

REGISTRY = "example-generic"


@contextmanager
def _worker(chain: ProcessChain, metrics_port: int | None = None) -> Iterator[subprocess.Popen]:
    args = [sys.executable, "-m", "gateway.cli", "worker", "--config", str(chain.config_path)]
    args += ["--metrics-port", str(metrics_port)] if metrics_port else []
    log = open(chain.work_dir / f"worker-{time.monotonic_ns()}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=chain.env, stdout=log, stderr=subprocess.STDOUT, cwd=chain.work_dir)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _post_async(url: str, key: str, body: bytes) -> httpx.Response:
    headers = {
        "Content-Type": "application/fhir+json",
        "Authorization": f"Bearer {key}",
        "Prefer": "respond-async",
    }
    return httpx.post(f"{url}/registries/{REGISTRY}/Bundle", content=body, headers=headers, timeout=60)


def _receipts(chain: ProcessChain) -> list[dict]:
    return httpx.get(f"{chain.receiver_url}/deliveries").json()


def _delivered_count(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/").text
    found = re.search(
        r'^gateway_outbox_delivery_attempts_total\{(?=[^}]*outcome="delivered")[^}]*\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def _wait_for(predicate, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_an_api_without_worker_stores_and_worker_processes_forward_each_bundle_once(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    store_url = request.getfixturevalue("pg_url") if store == "postgresql" else None
    with process_chain(tmp_path, store_url=store_url, receiver_faults=False) as chain:
        api = chain.start_gateway(extra_env={"FHIR_GATEWAY_RUN_WORKER": "false"})
        first = _post_async(api.url, chain.ehr_api_key, variant(0, 0, run="scale"))
        assert first.status_code == 202, first.text
        time.sleep(1.0)  # twenty poll intervals of a worker (0.05 s here), had there been one
        assert _receipts(chain) == []  # committed to the outbox, not forwarded: no worker in the API
        auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
        status_url = f"{api.url}/deliveries/{delivery_id_of(first)}"
        assert httpx.get(status_url, headers=auth).headers["X-Progress"] == "queued"

        ports = [free_port(), free_port()]
        with _worker(chain, ports[0]) as one, _worker(chain, ports[1]) as two:
            bodies = [variant(n, n % 4, run="scale") for n in range(1, 12)]
            more = [_post_async(api.url, chain.ehr_api_key, body) for body in bodies]
            assert all(r.status_code == 202 for r in more), [r.text for r in more]
            _wait_for(lambda: len(_receipts(chain)) >= 12)
            time.sleep(0.5)  # a second copy of any bundle would arrive now
            identifiers = [r["identifier"] for r in _receipts(chain)]
            assert len(identifiers) == 12 and len(set(identifiers)) == 12  # each delivered once
            # each worker's own metrics: together they count every delivery once
            assert sum(_delivered_count(port) for port in ports) == 12
            for worker in (one, two):
                worker.send_signal(signal.SIGTERM)
            assert [one.wait(timeout=30), two.wait(timeout=30)] == [0, 0]
        delivered = httpx.get(status_url, headers=auth).json()
        assert delivered["status"] == "delivered", delivered


def _payload_sizes(chain: ProcessChain) -> list[int]:
    import sqlite3

    with sqlite3.connect(chain.work_dir / "gateway.db") as conn:
        rows = conn.execute("SELECT length(payload) FROM deliveries WHERE status = 'delivered'")
        return [n for (n,) in rows]


def test_a_delivered_payload_is_emptied_after_the_retention_the_operator_set(tmp_path: Path) -> None:
    """A probe: the pseudonymised payloads of delivered Bundles were kept for good (the worker could purge
    them, but no setting reached it)."""
    with process_chain(tmp_path, receiver_faults=False) as chain:
        kept = chain.start_gateway()
        assert _post_async(kept.url, chain.ehr_api_key, variant(0, 0, run="kept")).status_code == 202
        _wait_for(lambda: len(_receipts(chain)) == 1)
        time.sleep(0.5)  # ten idle polls: a purge would have run
        assert [n > 0 for n in _payload_sizes(chain)] == [True]  # the default keeps them for 30 days
        kept.kill(signal.SIGTERM)
        gw = chain.start_gateway(extra_env={"FHIR_GATEWAY_PAYLOAD_RETENTION_DAYS": "0"})
        assert _post_async(gw.url, chain.ehr_api_key, variant(1, 1, run="gone")).status_code == 202
        _wait_for(lambda: len(_receipts(chain)) == 2)
        _wait_for(lambda: _payload_sizes(chain) == [0, 0])
        # and the Provenance names the kind of TTP, not its address inside the hospital (a probe)
        received = [httpx.get(f"{chain.receiver_url}/Bundle/{r['id']}").text for r in _receipts(chain)]
        assert all('"TTP nlps1"' in text and chain.ttp_url.split("//")[1] not in text for text in received)
