"""The gateway over HTTP: accepted bundles/s and latency under bounded load, beside a bare echo endpoint.

The gateway (one uvicorn worker, SQLite outbox, outbox worker on) runs on 127.0.0.1 in this process; the
reference TTP and the registry receiver (leak scan and SQLite write for every forwarded bundle) run where
`--peers` says:

- `other-process` (default): in a second OS process (benchmarks/bulk.py's serve_main), as in a deployment,
  where the TTP and the registry are other machines; this process runs only the gateway.
- `same-process`: uvicorn threads of this process via gateway.demo.embedded_chain; all three share one GIL,
  so the TTP's and the receiver's CPU is taken from the gateway.

`--worker separate`: the gateway process serves the API only (`serve --no-worker`) and a `fhir-gateway worker`
process forwards, as scale-out runs it; the worker's CPU is printed apart.

The load comes from another process (a minimal keep-alive HTTP/1.1 client on asyncio streams, so the client
costs little CPU). Requests use `Prefer: respond-async` (202 once stored in the outbox) and a fresh
Bundle.identifier each. Each scenario is bounded by a request count and a duration. At the end the outbox
depth is printed: the worker must have forwarded everything (0 queued, 0 dead).

    .venv/bin/python benchmarks/http.py [--small 2000] [--large 60] [--concurrency 8] [--max-seconds 60]
        [--peers other-process|same-process] [--worker in-process|separate]
"""

# ruff: noqa: E402 - imports follow the sys.path guard below (benchmarks/http.py shadows `http`)
from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py: keep its folder off sys.path, or it would shadow the standard `http` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.demo import MRN_SYSTEM, PROVIDER


def _sibling(name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_bundle = _sibling("validate").make_bundle

REGISTRY = "example-generic"
DISTINCT = 50  # different patients, so the TTP answers real batches rather than one cached value


def bundles(n: int) -> list[bytes]:
    out = []
    for k in range(DISTINCT):
        bundle = make_bundle(n, seed=k + 1)
        patient = bundle["entry"][0]["resource"]
        patient["name"][0]["family"] = f"Jansen{k}"
        patient["identifier"][0]["value"] = f"{100000000 + k * 7}"
        # the demo gateway checks its objection register by the hospital's patient number (fails closed
        # without one), so the benchmark patients carry one
        patient["identifier"].append({"system": MRN_SYSTEM, "value": f"MRN{k:06d}"})
        out.append(orjson.dumps(bundle))
    return out


# -- load generator (runs in the second process) ----------------------------------------------------------
async def _connection(
    host: str,
    port: int,
    path: str,
    headers: str,
    bodies: list[bytes],
    todo: list[int],
    deadline: float,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while todo and time.perf_counter() < deadline:
            i = todo.pop()
            # a Bundle.identifier per request: every request is a new delivery (no idempotency shortcut)
            base = bodies[i % len(bodies)]
            ident = b'"identifier":{"system":"urn:bench","value":"%d-%d"},' % (os.getpid(), i)
            body = base[:1] + ident + base[1:]
            start = time.perf_counter()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _load(
    url: str, path: str, headers: str, bodies: list[bytes], count: int, concurrency: int, max_seconds: float
) -> dict:
    host, port = url.removeprefix("http://").split(":")
    todo = list(range(count))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + max_seconds
    await asyncio.gather(
        *(
            _connection(host, int(port), path, headers, bodies, todo, deadline, latencies, statuses)
            for _ in range(concurrency)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": statuses,
    }


def load_main(args: argparse.Namespace) -> None:
    bodies = [p.read_bytes() for p in sorted(Path(args.bodies).glob("*.json"))]
    headers = "".join(f"{h}\r\n" for h in args.header)
    result = asyncio.run(
        _load(args.url, args.path, headers, bodies, args.count, args.concurrency, args.max_seconds)
    )
    print(json.dumps(result))


def run_load(
    url: str, path: str, headers: list[str], folder: Path, count: int, concurrency: int, max_seconds: float
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--load",
        "--url",
        url,
        "--path",
        path,
        "--bodies",
        str(folder),
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
        "--max-seconds",
        str(max_seconds),
    ]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=max_seconds + 120)
    return json.loads(out.stdout)


# -- the servers ------------------------------------------------------------------------------------------
def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/fhir+json")

    return app


@contextmanager
def gateway_chain(work: Path, peers: str, worker: str) -> Iterator[tuple[str, str, dict]]:
    """The gateway with its TTP and receiver; yields (gateway URL, EHR API key, peers' and the separate
    worker's usage, set at exit)."""
    from gateway.demo import embedded_chain

    usage: dict = {}
    if peers == "same-process":
        assert worker == "in-process", "--worker separate needs --peers other-process"
        with embedded_chain(work, [REGISTRY]) as chain:
            yield chain.gateway_url, chain.ehr_api_key, usage
        return
    bulk = _sibling("bulk")
    assert (bulk.PROVIDER, bulk.REGISTRY) == (PROVIDER, REGISTRY)
    (work / "peers").mkdir(parents=True)
    # a second process: `http.py --serve-peers DIR` runs bulk.py's serve_main (reference TTP + receiver)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-peers", str(work / "peers")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        urls = json.loads(server.stdout.readline())
        with _gateway_alone(work, urls, worker, usage) as (url, key):
            yield url, key, usage
    finally:
        server.stdin.close()
        usage.update(json.loads(server.stdout.readline() or "{}"))
        server.wait(timeout=60)


@contextmanager
def _gateway_alone(work: Path, urls: dict, worker: str, usage: dict) -> Iterator[tuple[str, str]]:
    """The gateway as embedded_chain configures it (objection register + bundle consent, MRN system), against
    the TTP and receiver at `urls`, served by one uvicorn worker in a thread of this process; with
    `worker="separate"` its outbox worker is a `fhir-gateway worker` process (its CPU goes into `usage`)."""
    from gateway.config import (
        ClientConfig,
        GatewayConfig,
        ProviderConfig,
        RegistryConfig,
        Settings,
        TTPConfig,
    )
    from gateway.keys import init_keys
    from gateway.memory import freeze_start_up_objects
    from gateway.runtime import build_runtime
    from gateway.service.app import create_app
    from gateway.service.auth import hash_api_key
    from gateway.serving import serve_in_thread
    from gateway.ttp.client import HttpTTPClient

    ehr_key = os.urandom(24).hex()
    init_keys(work / "keys", [PROVIDER])
    config = GatewayConfig(
        providers=[ProviderConfig(id=PROVIDER, name="bench", mrn_system=MRN_SYSTEM)],
        clients=[
            ClientConfig(
                id="ehr-0", provider=PROVIDER, api_key_sha256=hash_api_key(ehr_key), registries=[REGISTRY]
            )
        ],
        registries={REGISTRY: RegistryConfig(profile=REGISTRY, endpoint=urls["receiver"])},
        ttp=TTPConfig(url=urls["ttp"]),
    )
    settings = Settings(
        store_url=f"sqlite:///{work / 'gateway.db'}",
        key_dir=work / "keys",
        worker_poll_seconds=0.05,
        bulk_work_dir=work / "bulk",
    )
    runtime = build_runtime(
        config, settings, ttps={PROVIDER: (HttpTTPClient(urls["ttp"], urls["secret"]), urls["ttp"])}
    )
    app = create_app(runtime, run_worker=worker == "in-process")
    freeze_start_up_objects()  # as `fhir-gateway serve` does
    with serve_in_thread(app) as url, _worker_process(work, config, settings, urls, worker, usage):
        yield url, ehr_key


@contextmanager
def _worker_process(work: Path, config, settings, urls: dict, worker: str, usage: dict) -> Iterator[None]:  # noqa: ANN001
    if worker == "in-process":
        yield
        return
    import signal

    import yaml

    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    env = os.environ | {
        "FHIR_GATEWAY_STORE_URL": settings.store_url,
        "FHIR_GATEWAY_KEY_DIR": str(settings.key_dir),
        "FHIR_GATEWAY_WORKER_POLL_SECONDS": str(settings.worker_poll_seconds),
        "FHIR_GATEWAY_TTP_API_KEY": urls["secret"],
        "FHIR_GATEWAY_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--config", str(path)], env=env)
    try:
        yield
    finally:
        stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        usage["worker_cpu"] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-peers", help=argparse.SUPPRESS)
    parser.add_argument("--url")
    parser.add_argument("--path")
    parser.add_argument("--bodies")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--small", type=int, default=2000, help="requests with 10-entry bundles")
    parser.add_argument("--large", type=int, default=60, help="requests with 1,000-entry bundles")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument(
        "--worker",
        choices=["in-process", "separate"],
        default="in-process",
        help="the outbox worker inside the gateway process (default) or a `fhir-gateway worker` process",
    )
    parser.add_argument(
        "--peers",
        choices=["same-process", "other-process"],
        default="other-process",
        help="where the reference TTP and the receiver run (default: a second process, as in a deployment)",
    )
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return
    if args.serve_peers:
        _sibling("bulk").serve_main(Path(args.serve_peers))
        return
    from gateway.serving import serve_in_thread
    from gateway.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scenarios = [("10-entry", 10, args.small), ("1,000-entry", 1000, args.large)]
        folders = {}
        for _, n, _ in scenarios:
            folders[n] = work / f"bodies-{n}"
            folders[n].mkdir()
            for i, body in enumerate(bundles(n)):
                (folders[n] / f"{i:03d}.json").write_bytes(body)
        where = {
            "other-process": "TTP + receiver in a second process; this process runs only the gateway",
            "same-process": "TTP + receiver + gateway in threads of this process (one GIL)",
        }[args.peers]
        print(
            f"peers: {args.peers} ({where}); gateway: one uvicorn worker, outbox worker {args.worker}; "
            "load: a separate process"
        )
        print(
            f"{'scenario':<34} {'requests':>8} {'req/s':>8} {'MB/s':>7} {'p50 ms':>8} {'p99 ms':>8}  statuses"
        )
        with serve_in_thread(echo_app()) as echo_url:
            for name, n, count in scenarios:
                r = run_load(
                    echo_url,
                    "/echo",
                    ["Content-Type: application/fhir+json"],
                    folders[n],
                    count,
                    args.concurrency,
                    args.max_seconds,
                )
                _row(f"echo (bare FastAPI) {name}", r, folders[n])
        cpu_before = _cpu_seconds()
        with gateway_chain(work / "chain", args.peers, args.worker) as (gateway_url, ehr_key, peers_usage):
            headers = [
                "Content-Type: application/fhir+json",
                "Prefer: respond-async",
                f"Authorization: Bearer {ehr_key}",
            ]
            for name, n, count in scenarios:
                r = run_load(
                    gateway_url,
                    f"/registries/{REGISTRY}/Bundle",
                    headers,
                    folders[n],
                    count,
                    args.concurrency,
                    args.max_seconds,
                )
                _row(f"gateway async {name}", r, folders[n])
            store = open_store(f"sqlite:///{work / 'chain' / 'gateway.db'}")
            deadline = time.monotonic() + 120
            depth = store.depth()
            while depth["queued"] + depth["delivering"] and time.monotonic() < deadline:
                time.sleep(0.5)
                depth = store.depth()
            print(f"outbox at the end (after waiting up to 120 s for the worker): {depth}")
        own = _cpu_seconds() - cpu_before
        if args.peers == "other-process":
            separate = ""
            if "worker_cpu" in peers_usage:
                separate = f"; the outbox worker process {peers_usage['worker_cpu']:.1f}"
            print(
                f"CPU seconds from gateway start to drained outbox: this process (gateway) {own:.1f}; "
                f"TTP + receiver process (its whole life) {peers_usage.get('cpu', 0.0):.1f}{separate}"
            )
        else:
            print(
                f"CPU seconds from gateway start to drained outbox: this process (gateway, TTP, receiver) "
                f"{own:.1f}"
            )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _row(name: str, r: dict, folder: Path) -> None:
    size = sum(p.stat().st_size for p in folder.glob("*.json")) / len(list(folder.glob("*.json")))
    print(
        f"{name:<34} {r['requests']:>8} {r['per_second']:>8.1f} {r['per_second'] * size / 1e6:>7.1f} "
        f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}  {r['statuses']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
