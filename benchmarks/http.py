"""The gateway over HTTP: accepted bundles/s and latency under bounded load, beside a bare echo endpoint.

The reference TTP, a receiver and the gateway (one uvicorn worker each, threads of this process, SQLite
outbox, worker on) run on 127.0.0.1 via gateway.demo.embedded_chain; the load comes from a second process (a
minimal keep-alive HTTP/1.1 client on asyncio streams, so the client costs little CPU). Requests use
`Prefer: respond-async` (202 once stored in the outbox). Each scenario is bounded by a request count and a
duration. At the end the outbox depth is printed: the worker must have forwarded everything.

    .venv/bin/python benchmarks/http.py [--small 2000] [--large 60] [--concurrency 8] [--max-seconds 60]
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
import statistics
import subprocess
import tempfile
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.demo import MRN_SYSTEM


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


# -- the servers (this process) ---------------------------------------------------------------------------
def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/fhir+json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url")
    parser.add_argument("--path")
    parser.add_argument("--bodies")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--small", type=int, default=2000, help="requests with 10-entry bundles")
    parser.add_argument("--large", type=int, default=60, help="requests with 1,000-entry bundles")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.load:
        load_main(args)
        return
    from gateway.demo import embedded_chain
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
        with embedded_chain(work / "chain", [REGISTRY]) as chain:
            headers = [
                "Content-Type: application/fhir+json",
                "Prefer: respond-async",
                f"Authorization: Bearer {chain.ehr_api_key}",
            ]
            for name, n, count in scenarios:
                r = run_load(
                    chain.gateway_url,
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


def _row(name: str, r: dict, folder: Path) -> None:
    size = sum(p.stat().st_size for p in folder.glob("*.json")) / len(list(folder.glob("*.json")))
    print(
        f"{name:<34} {r['requests']:>8} {r['per_second']:>8.1f} {r['per_second'] * size / 1e6:>7.1f} "
        f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}  {r['statuses']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
