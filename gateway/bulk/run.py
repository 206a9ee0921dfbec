"""Run a bulk delivery: pick the chain, the sink and the worker spec, then `deliver_export` (job.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from gateway.bulk.chains import from_runtime, offline_chains, strict_chains
from gateway.bulk.group import Chains
from gateway.bulk.job import BulkOptions, Progress, deliver_export, make_work_dir
from gateway.bulk.pool import ChainSpec, runtime_spec
from gateway.bulk.sinks import DirSink, Sink, StoreSink
from gateway.bulk.sources import resolve_sources
from gateway.bulk.summary import BulkSummary


async def run_bulk_async(
    sources: list[Path],
    *,
    registry: str,
    work_dir: Path,
    runtime=None,  # noqa: ANN001
    chains: Chains | None = None,
    sink: Sink | None = None,
    to_dir: Path | None = None,
    provider: str | None = None,
    sender: str = "bulk",
    options: BulkOptions = BulkOptions(),
    progress: Progress | None = None,
    allowed_root: Path | None = None,
    spec: ChainSpec | None = None,
    strict: bool = False,
) -> BulkSummary:
    """One of: `runtime` (its chains, its outbox), `to_dir` (offline chain, files), or `chains` + `sink`.

    `options.workers` > 0 runs groups in worker processes when they can rebuild the chain (offline, or a
    runtime built from its configuration whose TTP key is in the environment); otherwise in this process.
    With explicit `chains`, workers are used only with a `spec` that rebuilds that same chain. `strict`: the
    chain in strict mode whatever the configuration says (`bulk --strict`)."""
    files = resolve_sources(sources, allowed_root=allowed_root)
    if runtime is not None:
        provider = provider or next(iter(runtime.providers))
        if chains is None:
            chains = from_runtime(runtime, registry, provider)
            spec = runtime_spec(runtime, registry, provider)
        sink = sink or StoreSink(runtime.store, provider=provider, registry=registry, sender=sender)
    elif chains is None:
        make_work_dir(work_dir)
        chains = offline_chains(registry, work_dir)
        spec = ChainSpec(registry, offline_root=work_dir)
    if strict:
        chains = strict_chains(chains)
        spec = replace(spec, strict=True) if spec is not None else None
    if sink is None:
        if to_dir is None:
            raise ValueError("run_bulk needs a runtime, a sink or to_dir")
        sink = DirSink(to_dir)
    return await deliver_export(
        files, chains=chains, sink=sink, work_dir=work_dir, options=options, progress=progress, spec=spec
    )


def run_bulk(sources: list[Path], **kwargs) -> BulkSummary:  # noqa: ANN003 - same keywords as run_bulk_async
    """Synchronous entry (CLI). With a `runtime`, the caller runs its worker to forward the outbox."""
    return asyncio.run(run_bulk_async(sources, **kwargs))
