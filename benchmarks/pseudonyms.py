"""Pseudonym throughput: the source stage, the TTP over real HTTP, and the raw primitives, in one run.

    .venv/bin/python benchmarks/pseudonyms.py [--patients 1,100,10000] [--plain] [--quick]

(a) source stage alone (gateway.pseudonym.source.SourceStage: 9 HMAC types + MRN per patient);
(b) the TTP round trip over real HTTP: the reference TTP under uvicorn in a child process, HttpTTPClient in
    this one, 1 / 100 / 10,000 patients per request with 10 values each; wall-clock values/s plus the CPU time
    the TTP process and the client process spent per value (so "per core" is visible on any machine);
    also the same service logic in-process (EmbeddedTTP) as the ceiling;
(c) the raw HMAC-SHA-256 and AES-SIV rates of `cryptography` on this machine.
Test keys only, generated into a temporary directory.
"""

# ruff: noqa: E402 - imports follow the sys.path guard below (benchmarks/http.py shadows `http`)
from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/http.py would shadow the standard `http` package: keep this folder off sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import multiprocessing
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable

import httpx
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.auth import hash_key
from gateway.ttp.client import HttpTTPClient
from gateway.ttp.embedded import EmbeddedTTP
from gateway.ttp.keystore import KeyStore
from gateway.ttp.testing import make_test_ttp

REGISTRY = "registry-example"
PROVIDER = "ura:00000000"
TYPES = ("B", "NGGV", "SNGGV", "NGG", "SNGG", "C", "RGG", "GG", "A")  # + MRN = 10 values per patient
CLK_TCK = os.sysconf("SC_CLK_TCK")


def best_rate(fn: Callable[[], int], repeat: int = 5) -> float:
    """Values per second of the fastest of `repeat` runs (the least disturbed by the machine)."""
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - started))
    return max(rates)


# --- (c) raw primitives -------------------------------------------------------------------------------------

def raw_rates(n: int) -> dict[str, float]:
    data = [secrets.token_bytes(32) for _ in range(n)]
    keyed = hmac.HMAC(secrets.token_bytes(32), hashes.SHA256())
    siv = AESSIV(secrets.token_bytes(64))
    ad = [b"NLPS1|B"]

    def run_hmac() -> int:
        for d in data:
            mac = keyed.copy()
            mac.update(d)
            mac.finalize()
        return n

    def run_siv() -> int:
        for d in data:
            siv.encrypt(d, ad)
        return n

    return {"HMAC-SHA-256 (pre-keyed .copy(), 32 B)": best_rate(run_hmac),
            "AES-SIV encrypt (reused object, 32 B)": best_rate(run_siv)}


# --- (a) source stage ---------------------------------------------------------------------------------------

def source_rate(patients: int) -> tuple[str, float]:
    try:
        from gateway.pseudonym.source import SourceStage
        from gateway.pseudonym.types import Extraction, PseudonymInput
    except ImportError:  # the source stage not there yet: the primitive it is built on
        key = nlps1.SourceKey(secrets.token_bytes(32), 1)
        canon = [f"NLPS1|B|{100000000 + i}" for i in range(patients * 10)]
        return "nlps1.SourceKey.pre (HMAC)", best_rate(lambda: len([key.pre(c) for c in canon]))
    stage = SourceStage({1: secrets.token_bytes(32)}, 1, secrets.token_bytes(32), PROVIDER)
    extractions = []
    for i in range(patients):
        inputs = [PseudonymInput(t, (str(i),), f"NLPS1|{t}|{i:09d}|19700101|V") for t in TYPES]
        inputs.append(PseudonymInput("MRN", (f"P{i:07d}",), f"NLPS1|MRN|P{i:07d}"))
        extractions.append(Extraction(inputs=inputs))

    def run() -> int:
        return sum(len(stage.pre_pseudonyms(e, REGISTRY)) for e in extractions)

    return "SourceStage.pre_pseudonyms (9 HMAC + 1 MRN per patient)", best_rate(run)


# --- (b) the TTP over HTTP ----------------------------------------------------------------------------------

def _serve(key_dir: str, callers: list[dict], port: int, plain_ok: bool) -> None:
    import uvicorn

    from gateway.ttp.app import create_app
    from gateway.ttp.auth import TTPAuth

    app = create_app(KeyStore.load(key_dir, env={}), TTPAuth.from_entries(callers), allow_plain=plain_ok)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _items(patients: int) -> list[PrePseudonym]:
    items = []
    for _ in range(patients):
        items.extend(PrePseudonym(t, 1, secrets.token_bytes(32)) for t in TYPES)
        items.append(PrePseudonym("MRN", 1, secrets.token_bytes(40)))
    return items


async def _http_round(base: str, key: str, patients: int, total_values: int, sealed: bool,
                      server_pid: int, inflight: int = 1) -> dict[str, float]:
    requests = max(inflight, total_values // (patients * 10))
    batches = [_items(patients) for _ in range(requests)]
    async with HttpTTPClient(base, key, sealed=sealed, timeout=120, max_concurrency=inflight) as client:
        await client.pseudonymise(REGISTRY, batches[0])  # warm-up: connection, public key
        runs = []
        for _ in range(3):
            server_cpu, client_cpu = _cpu_seconds(server_pid), time.process_time()
            started = time.perf_counter()
            for at in range(0, requests, inflight):
                # inflight > 1: the client prepares/reads one batch while the TTP works on the other
                answers = await asyncio.gather(*(client.pseudonymise(REGISTRY, b)
                                                 for b in batches[at:at + inflight]))
                assert all(a[-1].identifier_value is not None for a in answers)
            wall = time.perf_counter() - started
            values = requests * patients * 10
            runs.append({"rate": values / wall, "requests/s": requests / wall,
                         "server_us": (_cpu_seconds(server_pid) - server_cpu) / values * 1e6,
                         "client_us": (time.process_time() - client_cpu) / values * 1e6})
    best = max(runs, key=lambda r: r["rate"])
    return best


def http_rates(sizes: list[int], sealed_modes: list[bool], total_values: int) -> list[tuple[str, dict]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = make_test_ttp(Path(tmp) / "keys", [REGISTRY])
        callers = [{"name": "bench", "role": "provider", "provider": PROVIDER,
                    "key_sha256": hash_key("bench-key")}]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(str(fixture.key_dir), callers, port, True), daemon=True)
        proc.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    httpx.get(f"{base}/metadata", timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            for sealed in sealed_modes:
                for patients in sizes:
                    values = max(total_values, patients * 10)
                    if patients == 1:
                        values = min(values, 5_000)  # 500 requests are enough to see the per-request cost
                    stats = asyncio.run(_http_round(base, "bench-key", patients, values, sealed, proc.pid))
                    out.append((f"{'sealed' if sealed else 'plain '} {patients:>6} patients/request", stats))
                    if patients >= 1000:
                        stats = asyncio.run(_http_round(base, "bench-key", patients, values, sealed,
                                                        proc.pid, inflight=2))
                        out.append((f"{'sealed' if sealed else 'plain '} {patients:>6} patients/request, "
                                    "2 in flight", stats))
        finally:
            proc.terminate()
            proc.join(5)
        embedded = EmbeddedTTP(fixture.keystore, PROVIDER)
        items = _items(10_000)
        rate = best_rate(lambda: len(asyncio.run(embedded.pseudonymise(REGISTRY, items))), repeat=3)
        out.append(("in-process service (EmbeddedTTP), 10,000 patients", {"rate": rate}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", default="1,100,10000")
    parser.add_argument("--plain", action="store_true", help="also measure the plain (unsealed) variant")
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    args = parser.parse_args()
    sizes = [int(x) for x in args.patients.split(",")]
    total = 100_000 if args.quick else 300_000
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; values/s (best of runs)\n")

    print("(c) raw primitives (one core)")
    for name, rate in raw_rates(50_000 if args.quick else 200_000).items():
        print(f"    {name:<58} {rate:>12,.0f} /s")

    print("(a) source stage (one core)")
    name, rate = source_rate(1_000 if args.quick else 10_000)
    print(f"    {name:<58} {rate:>12,.0f} values/s")

    print("(b) TTP round trip over HTTP (TTP in a child process; CPU µs per value on each side)")
    for name, stats in http_rates(sizes, [True, False] if args.plain else [True], total):
        line = f"    {name:<58} {stats['rate']:>12,.0f} values/s"
        if "server_us" in stats:
            per_core = 1e6 / stats["server_us"] if stats["server_us"] else float("inf")
            line += (f"  {stats['requests/s']:>8,.1f} req/s  TTP {stats['server_us']:.2f} µs/value "
                     f"(= {per_core:,.0f}/s per TTP core)  client {stats['client_us']:.2f} µs/value")
        print(line)


if __name__ == "__main__":
    main()
