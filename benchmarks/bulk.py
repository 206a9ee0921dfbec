"""The yearly bulk delivery end to end: a synthetic export through the gateway's bulk job and outbox worker to
the registry receiver, with the reference TTP over HTTP. Prints wall time per phase and peak memory.

Layout (two cores): this process runs the bulk job (index, groups through the chain, outbox) and the outbox
worker in one event loop; a second process runs the reference TTP and the receiver (leak scan on arrival,
SQLite) under uvicorn on 127.0.0.1. The export is generated into a temp dir and deleted afterwards.

    .venv/bin/python benchmarks/bulk.py [--resources 1000000] [--per-patient 100] [--group-size 200]
"""

# ruff: noqa: E402 - imports follow the sys.path guard below (benchmarks/http.py shadows `http`)
from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/http.py would shadow the standard `http` package: keep this folder off sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import json
import os
import resource
import subprocess
import tempfile
import threading
import time

PROVIDER = "ura:00000000"
REGISTRY = "example-generic"


def serve_main(work: Path) -> None:
    """Second process: reference TTP + receiver on loopback; prints their URLs; runs until stdin closes."""
    from contextlib import ExitStack

    from gateway.deid.leakscan import scan
    from gateway.memory import return_large_buffers_to_the_os
    from gateway.receiver.app import create_receiver_app
    from gateway.serving import serve_in_thread
    from gateway.ttp.app import create_app as create_ttp_app
    from gateway.ttp.auth import TTPAuth, hash_key
    from gateway.ttp.keystore import init_keys as init_ttp_keys

    return_large_buffers_to_the_os()  # as `fhir-gateway receiver serve` does (the CLI sets it)
    secret = os.urandom(24).hex()
    keys = init_ttp_keys(work / "ttp-keys", [REGISTRY])
    auth = TTPAuth.from_entries(
        [{"name": "bench-gateway", "role": "provider", "provider": PROVIDER, "key_sha256": hash_key(secret)}]
    )
    with ExitStack() as stack:
        ttp_url = stack.enter_context(serve_in_thread(create_ttp_app(keys, auth)))
        receiver_url = stack.enter_context(serve_in_thread(create_receiver_app(work / "receiver", scan=scan)))
        print(json.dumps({"ttp": ttp_url, "receiver": receiver_url, "secret": secret}), flush=True)
        sys.stdin.read()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps({"cpu": usage.ru_utime + usage.ru_stime, "maxrss_mb": usage.ru_maxrss / 1024}), flush=True
    )


async def deliver(
    export: Path, work: Path, urls: dict, args: argparse.Namespace, sampler: MemorySampler | None = None
) -> dict:
    from gateway.bootstrap import runtime_from_config
    from gateway.bulk import BulkOptions, run_bulk_async
    from gateway.config import GatewayConfig, ProviderConfig, RegistryConfig, Settings, TTPConfig
    from gateway.keys import init_keys

    init_keys(work / "keys", [PROVIDER])
    # Worker processes rebuild the chain from the configuration, reading the TTP key as `serve` does.
    os.environ["FHIR_GATEWAY_TTP_API_KEY"] = urls["secret"]
    config = GatewayConfig(
        providers=[ProviderConfig(id=PROVIDER, name="bench", mrn_system=args.mrn_system)],
        registries={
            REGISTRY: RegistryConfig(profile=REGISTRY, endpoint=urls["receiver"], optout=["bundle-consent"])
        },
        ttp=TTPConfig(url=urls["ttp"]),
    )
    settings = Settings(
        store_url=f"sqlite:///{work / 'gateway.db'}",
        key_dir=work / "keys",
        worker_poll_seconds=0.05,
        worker_concurrency=4,
    )
    runtime = runtime_from_config(config, settings)
    await runtime.start(run_worker=True)
    marks = {"start": time.perf_counter()}
    last = {"phase": ""}

    def progress(phase: str, done: int, total: int) -> None:
        if phase != last["phase"]:
            marks[f"{phase}-start"] = time.perf_counter()
            last["phase"] = phase
            if sampler is not None:
                sampler.phase = phase

    try:
        summary = await run_bulk_async(
            [export],
            registry=REGISTRY,
            work_dir=work / "job",
            runtime=runtime,
            provider=PROVIDER,
            sender="bench",
            progress=progress,
            options=BulkOptions(
                group_size=args.group_size,
                max_group_resources=args.max_group_resources,
                bundle_size=args.bundle_size,
                workers=args.workers,
            ),
        )
        marks["stored"] = time.perf_counter()
        if sampler is not None:
            sampler.phase = "drain"
        while True:
            depth = await asyncio.to_thread(runtime.store.depth)
            if depth["queued"] + depth["delivering"] == 0:
                break
            await asyncio.sleep(0.2)
        marks["forwarded"] = time.perf_counter()
    finally:
        await runtime.stop()
    return {"summary": summary.as_dict(), "marks": marks, "depth": depth}


class MemorySampler(threading.Thread):
    """Every 0.25 s: the memory of this process and all its descendants (the chain workers, the TTP +
    receiver process), summed. `ru_maxrss` is per process and the per-process peaks need not coincide; this
    is the peak of the sum. RSS counts shared pages (libraries, copy-on-write) once per process; PSS shares
    them out, so its sum is the machine's real total. The sampler runs on the cores it measures: `cpu_seconds`
    is its own (the kernel walks every process's page tables for smaps_rollup), printed with the figures."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = self.peak_pss = 0.0
        self.at_peak: list[tuple[int, float]] = []  # (pid, PSS MB) of each process at the PSS peak
        self.phase_at_peak = ""
        self.phase = "start"
        self.stopped = threading.Event()
        self.cpu_seconds = 0.0

    def run(self) -> None:
        started = time.thread_time()
        while not self.stopped.wait(0.25):
            pids = _tree(os.getpid())
            self.peak_rss = max(self.peak_rss, sum(_rss_kb(pid) for pid in pids) / 1024)
            each = [(pid, _rollup_kb(pid, "Pss") / 1024) for pid in pids]
            pss = sum(mb for _, mb in each)
            if pss > self.peak_pss:
                self.peak_pss, self.at_peak, self.phase_at_peak = pss, each, self.phase
        self.cpu_seconds = time.thread_time() - started


def _tree(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KB
    except (OSError, ValueError, IndexError):
        return 0


def _rollup_kb(pid: int, field: str) -> int:
    return _field_kb(Path(f"/proc/{pid}/smaps_rollup"), field)


def _field_kb(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--resources", type=int, default=1_000_000)
    parser.add_argument(
        "--per-patient", type=int, default=100, help="resources per patient (Patient included)"
    )
    parser.add_argument("--group-size", type=int, default=200)
    parser.add_argument("--max-group-resources", type=int, default=5000)
    parser.add_argument("--bundle-size", type=int, default=500)
    parser.add_argument("--mrn-system", default=None)
    parser.add_argument("--workers", type=int, default=2, help="chain worker processes (0: in-process)")
    args = parser.parse_args()
    if args.serve:
        serve_main(Path(args.serve))
        return
    from gateway.bulk.synth import SynthSpec, write_export

    with tempfile.TemporaryDirectory(prefix="bulk-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        patients = max(1, args.resources // args.per_patient)
        counts = write_export(
            work / "export", SynthSpec(patients=patients, resources_per_patient=args.per_patient - 1)
        )
        size = sum(p.stat().st_size for p in (work / "export").glob("*.ndjson"))
        print(
            f"generated {sum(counts.values()):,} resources, {patients:,} patients, {size / 1e6:.0f} MB "
            f"in {time.perf_counter() - t0:.1f} s (not counted)",
            flush=True,
        )
        sampler = MemorySampler()
        sampler.start()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            urls = json.loads(server.stdout.readline())
            result = asyncio.run(deliver(work / "export", work, urls, args, sampler))
        finally:
            server.stdin.close()
            server_usage = json.loads(server.stdout.readline() or "{}")
            server.wait(timeout=60)
        sampler.stopped.set()
        sampler.join(timeout=5)
        _report(result, size, server_usage)
        print(
            f"peak memory of the whole run (sum over all processes, sampled every 0.25 s): "
            f"RSS {sampler.peak_rss:.0f} MB, PSS {sampler.peak_pss:.0f} MB (goal < 500 MB)"
        )
        roles = {os.getpid(): "this process", server.pid: "TTP + receiver"}
        parts = ", ".join(f"{roles.get(pid, 'worker')} {mb:.0f}" for pid, mb in sampler.at_peak if mb >= 1)
        print(f"  at the PSS peak ({sampler.phase_at_peak}): {parts} MB")
        print(f"  the memory sampler's own CPU: {sampler.cpu_seconds:.1f} s")


def _report(result: dict, size: int, server: dict) -> None:
    m, s = result["marks"], result["summary"]
    start = m["start"]
    index_s = m.get("deliver-start", m["stored"]) - m.get("index-start", start)
    print(f"pass 1 (index)            {index_s:8.1f} s   {size / 1e6 / max(index_s, 1e-9):7.1f} MB/s")
    print(f"pass 2 (chain → outbox)   {m['stored'] - m.get('deliver-start', start):8.1f} s")
    print(f"outbox drained after      {m['forwarded'] - m['stored']:8.1f} s more")
    total = m["forwarded"] - start
    resources = sum(s["resourcesIn"].values())
    print(
        f"wall time end to end      {total:8.1f} s   {resources / total:,.0f} resources/s  "
        f"({s['patients']:,} patients, {s['groupsTotal']} groups, {s['bundles']} bundles)"
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"peak RSS: this process {own:.0f} MB, TTP + receiver process {server.get('maxrss_mb', 0):.0f} MB, "
        f"largest child {children:.0f} MB"
    )
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = server.get("cpu", 0.0)
    workers_cpu = kids.ru_utime + kids.ru_stime - server_cpu
    print(
        f"CPU seconds: this process {me.ru_utime + me.ru_stime:.1f}, chain workers {workers_cpu:.1f}, "
        f"TTP + receiver {server_cpu:.1f}"
    )
    print(f"outbox at the end: {result['depth']}")
    print(f"sent: {s['sent']}")
    print(f"dropped: {s['dropped']}  invalid lines: {len(s['invalidLines'])}")


if __name__ == "__main__":
    main()
