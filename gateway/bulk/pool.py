"""Groups through the chain on several cores: worker processes that each build the chain once.

The chain is CPU-bound Python (validation, de-identification, the leak gate) and holds the GIL, so threads
do not help; processes do. A worker cannot share the parent's I/O objects (TTP client, store pool), so it
builds its own from a picklable `ChainSpec`: offline (embedded TTP, keys under the work dir) or from the
gateway configuration (TTP client and opt-out sources as configured; the TTP API key from the environment,
as `fhir-gateway serve` reads it). Each worker reads its group's lines by offset itself and returns the
finished transaction Bundles (bytes); the parent alone writes to the outbox and the job state, so resume
and idempotency work as in-process. Every group is still ONE TTP batch, sent by the worker that runs it.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.bulk.group import Chains, GroupResult, run_group
from gateway.bulk.index import Line
from gateway.children import end_with_parent
from gateway.memory import freeze_start_up_objects, paused_gc, return_large_buffers_to_the_os


@dataclass(frozen=True)
class ChainSpec:
    registry: str
    offline_root: Path | None = None  # offline: keys under this folder (as offline_chains)
    config: Any = None  # GatewayConfig (pydantic, picklable)
    settings: Any = None  # Settings
    provider: str | None = None
    strict: bool = False  # strict mode on top of the configuration (`bulk --strict`)


def build_chains(spec: ChainSpec) -> Chains:
    from gateway.bulk.chains import from_runtime, offline_chains, strict_chains

    if spec.offline_root is not None:
        chains = offline_chains(spec.registry, spec.offline_root)
    else:
        from gateway.bootstrap import runtime_from_config

        runtime = runtime_from_config(spec.config, spec.settings)
        chains = from_runtime(runtime, spec.registry, spec.provider or spec.config.providers[0].id)
    return strict_chains(chains) if spec.strict else chains


def runtime_spec(runtime: Any, registry: str, provider: str) -> ChainSpec | None:
    """A spec workers can rebuild the runtime's chain from, or None: a runtime given parts its configuration
    does not describe (tests, the demo) or whose TTP key is not in the environment runs its chain in-process.
    A worker with a different chain (another TTP, other opt-out sources) must never stand in for it."""
    if not runtime.from_config_alone:
        return None
    ttp = runtime.config.ttp
    key_env = runtime.config.provider(provider).ttp_api_key_env or ttp.api_key_env
    if ttp.url != "embedded" and not os.environ.get(key_env):
        return None
    return ChainSpec(registry, config=runtime.config, settings=runtime.settings, provider=provider)


# -- in the worker process ----------------------------------------------------------------------------------
_worker: dict[str, Any] = {}  # per-process state of a pool worker (its chain, loop and open files)


def _init(spec: ChainSpec, nice: int, parent: int) -> None:
    end_with_parent(parent)
    return_large_buffers_to_the_os()  # each group's Bundles pass through as bytes (see gateway/memory.py)
    if nice:
        # The yearly delivery is batch work: the gateway's live ingest and its outbox forwarding (and on a
        # test machine the registry) go first. Lower priority costs bulk nothing when the cores are free.
        os.nice(nice)
    _worker["chains"] = build_chains(spec)
    _worker["loop"] = asyncio.new_event_loop()
    _worker["fds"] = {}
    freeze_start_up_objects()


def _read(paths: list[str], line: Line) -> bytes:
    fds = _worker["fds"]
    path = paths[line.file]
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    return os.pread(fds[path], line.length, line.off)


def _run(
    paths: list[str],
    lines: list[Line],
    tag: str,
    bundle_size: int,
    max_line_bytes: int,
    recorded: str,
    patients_per_call: int,
) -> GroupResult:
    try:
        with paused_gc():  # see job.InProcessRunner: no cycles, so collect once per group
            return _worker["loop"].run_until_complete(
                run_group(
                    lines,
                    lambda line: _read(paths, line),
                    _worker["chains"],
                    tag=tag,
                    bundle_size=bundle_size,
                    max_line_bytes=max_line_bytes,
                    recorded=recorded,
                    patients_per_call=patients_per_call,
                )
            )
    finally:
        gc.collect()


# -- in the parent ------------------------------------------------------------------------------------------
class PoolRunner:
    def __init__(
        self, spec: ChainSpec, workers: int, paths: list[str], patients_per_call: int, nice: int = 0
    ) -> None:
        # one group queued ahead of the workers: a worker that finishes finds its next group waiting instead
        # of idling while the parent stores the finished group's Bundles and reads the next group's lines
        self.parallelism = workers + 1
        self.workers = workers
        self.paths, self.patients_per_call = paths, patients_per_call
        # spawn, not fork: the parent has threads (asyncio.to_thread, store pool, a server's loop) and a
        # child forked while one of them holds a lock hangs for ever (seen: the initializer never returned).
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(spec, nice, os.getpid()),
        )

    async def run(
        self, lines: list[Line], tag: str, bundle_size: int, max_line_bytes: int, recorded: str
    ) -> GroupResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool,
            _run,
            self.paths,
            lines,
            tag,
            bundle_size,
            max_line_bytes,
            recorded,
            self.patients_per_call,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
