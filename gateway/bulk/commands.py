"""`fhir-gateway bulk DIR-or-FILES --registry ID`: deliver a Bulk Data export, with a progress bar.

With `--config` the configured gateway runs the job: Bundles go into its outbox and its worker forwards them
(the command waits until the Bundles this run stored are delivered or dead, unless `--no-wait`). With
`--to-dir` the offline chain (embedded reference TTP, test keys under the work dir) writes the de-identified
transaction Bundles as files instead: for trying a profile on an export without a registry.
Re-running with the same `--work-dir` resumes an interrupted job; finished groups are not sent again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.bulk import BulkOptions, BulkSummary, JobMismatch, SourceError, run_bulk_async
from gateway.bulk.sinks import StoreSink
from gateway.optout.base import OptOutUnavailable
from gateway.store import StoreUnavailable
from gateway.ttp.backend import TTPUnavailable


def bulk(
    paths: list[Path] = typer.Argument(..., help="export folder, NDJSON files, or a manifest .json"),
    registry: str = typer.Option(..., "--registry", help="registry (delivery profile) to deliver to"),
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="gateway configuration: deliver through its outbox and worker (default without --to-dir: "
        "FHIR_GATEWAY_CONFIG)",
    ),
    to_dir: Path = typer.Option(None, "--to-dir", help="offline: write the transaction Bundles here"),
    work_dir: Path = typer.Option(
        Path("bulk-work"), "--work-dir", help="job state and index; reuse it to resume an interrupted job"
    ),
    provider: str = typer.Option(
        None, "--provider", help="delivering provider (default: the first configured)"
    ),
    group_size: int = typer.Option(200, "--group-size", min=1, help="patients per TTP batch"),
    max_group_resources: int = typer.Option(
        5000,
        "--max-group-resources",
        min=1,
        help="resources of one patient group held at once (bounds memory; a group is cut before it)",
    ),
    bundle_size: int | None = typer.Option(
        None,
        "--bundle-size",
        min=1,
        help="entries per transaction Bundle (default: the registry's bulk_bundle_size, offline 500)",
    ),
    workers: int = typer.Option(
        min(2, os.cpu_count() or 1), "--workers", min=0, help="worker processes for the chain (0: in-process)"
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="with --config: wait until this run's Bundles are delivered (or dead)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
    strict: bool = typer.Option(
        False, "--strict", help="also check every input and output resource with its fhir.resources R4B model"
    ),
) -> None:
    """Deliver a FHIR Bulk Data export: per patient, opt-out filtered, pseudonymised, de-identified."""
    console = Console(stderr=True)
    if config is None and to_dir is None and os.environ.get("FHIR_GATEWAY_CONFIG"):
        # the hospital's configuration, exported for `serve`, is the default only when no --to-dir asks
        # for an offline run
        config = Path(os.environ["FHIR_GATEWAY_CONFIG"])
    if (config is None) == (to_dir is None):
        console.print("[red]fhir-gateway bulk: give exactly one of --config or --to-dir[/red]")
        raise typer.Exit(2)
    options = BulkOptions(
        group_size=group_size,
        max_group_resources=max_group_resources,
        bundle_size=bundle_size or BulkOptions.bundle_size,
        workers=workers,
    )
    registry_sized = bundle_size is None and config is not None  # the registry's bulk_bundle_size
    try:
        summary = asyncio.run(
            _run(
                paths,
                registry,
                config,
                to_dir,
                work_dir,
                provider,
                options,
                registry_sized,
                wait,
                console,
                strict,
            )
        )
    except (SourceError, JobMismatch, ValueError) as exc:
        console.print(f"[red]fhir-gateway bulk: {exc}[/red]")
        raise typer.Exit(2) from None
    except (TTPUnavailable, OptOutUnavailable, StoreUnavailable) as exc:
        # fixed texts; what was stored stays stored
        console.print(f"[red]fhir-gateway bulk: {exc}; run again with the same --work-dir to resume[/red]")
        raise typer.Exit(3) from None
    if json_out:
        typer.echo(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(summary_table(summary, offline=to_dir is not None))
    rejected = any(reason.startswith("rejected") for reason in summary.dropped)
    raise typer.Exit(1 if summary.invalid_lines or rejected else 0)


async def _run(
    paths: list[Path],
    registry: str,
    config: Path | None,
    to_dir: Path | None,
    work_dir: Path,
    provider: str | None,
    options: BulkOptions,
    registry_bundle_size: bool,
    wait: bool,
    console: Console,
    strict: bool = False,
) -> BulkSummary:
    with _progress(console) as bar:
        tasks = {
            "index": bar.add_task("index (bytes)", total=None),
            "deliver": bar.add_task("deliver (groups)", total=None),
        }

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(tasks[phase], completed=done, total=total)

        def run(**where: Any) -> Awaitable[BulkSummary]:  # the job's own arguments, and where it goes
            return run_bulk_async(
                paths, registry=registry, work_dir=work_dir, progress=progress, strict=strict, **where
            )

        if config is None:
            return await run(to_dir=to_dir, options=options)
        runtime = _runtime(config)
        if registry_bundle_size and registry in runtime.config.registries:
            options = replace(options, bundle_size=runtime.config.registries[registry].bulk_bundle_size)
        await runtime.start(run_worker=True)
        try:
            sink = StoreSink(
                runtime.store,
                provider=provider or next(iter(runtime.providers)),
                registry=registry,
                sender="bulk-cli",
            )
            summary = await run(runtime=runtime, provider=provider, sink=sink, options=options)
            if wait:
                # also those a run cut off left in the outbox: a run again after it has nothing to put
                earlier = await asyncio.to_thread(
                    runtime.store.ids_by_key_prefix, sink.provider, registry, f"bulk|{summary.job}|"
                )
                ids = list(dict.fromkeys([*earlier, *sink.delivery_ids]))
                drain = bar.add_task("forward (this export's bundles)", total=len(ids))
                await _drain(runtime, ids, lambda done: bar.update(drain, completed=done))
            return summary
        finally:
            await runtime.stop()


def _runtime(config: Path):  # noqa: ANN202 - a Runtime; imported lazily (heavy start-up)
    from gateway.bootstrap import startup_runtime

    def fail(message: str) -> None:
        raise ValueError(message)

    runtime, _ = startup_runtime(config, fail)  # type: ignore[arg-type]
    return runtime


async def _drain(runtime, delivery_ids: list[str], show, poll: float = 0.5) -> None:  # noqa: ANN001
    """Until each of this export's deliveries is delivered or dead; other deliveries of the registry (live
    traffic, one in a long backoff) are not waited for. The outbox forwards roughly in the order stored, so
    each poll reads on from the first one still pending."""
    done = 0
    while True:
        while done < len(delivery_ids):
            delivery = await asyncio.to_thread(runtime.store.get, delivery_ids[done])
            if delivery is not None and delivery.status not in ("delivered", "dead"):
                break
            done += 1
        show(done)
        if done == len(delivery_ids):
            return
        await asyncio.sleep(poll)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def summary_table(summary: BulkSummary, *, offline: bool = False) -> Table:
    """`offline`: Bundles written to files, and opt-out from the export's Consents only (say so)."""
    table = Table(title=f"Bulk delivery {summary.job} to {summary.registry} ({summary.seconds:.1f} s)")
    table.add_column("resource type")
    table.add_column("in", justify="right")
    table.add_column("in Bundles", justify="right")
    table.add_column("dropped (reason=count)")
    types = sorted(set(summary.resources_in) | set(summary.sent))
    for rtype in types:
        dropped = ", ".join(
            f"{reason}={c[rtype]}" for reason, c in sorted(summary.dropped.items()) if c.get(rtype)
        )
        table.add_row(
            rtype, str(summary.resources_in.get(rtype, 0)), str(summary.sent.get(rtype, 0)), dropped
        )
    where = "written to files" if offline else "stored in the outbox, delivered by its worker"
    table.caption = (
        f"patients {summary.patients}, opted out {summary.patients_opted_out}, opt-out unknown "
        f"{summary.patients_unknown_optout}, no pseudonym {summary.patients_no_pseudonym}; groups "
        f"{summary.groups_done}/{summary.groups_total} ({summary.groups_resumed} resumed); Bundles "
        f"{summary.bundles} new, {summary.bundles_already_stored} already stored ({where}); invalid lines "
        f"{len(summary.invalid_lines)} (file and line: --json).\n'in Bundles' counts entries: a shared "
        "resource (Practitioner, Organization...) goes in every Bundle that refers to it, and each Bundle "
        "gets a Provenance."
    )
    if summary.groups_total and summary.groups_resumed == summary.groups_total:
        # a re-probe read "Bundles 1 new" for a rerun that wrote nothing (to a new --to-dir)
        table.caption += (
            "\nthis work dir's job was complete already: nothing was run again; the counts are its first "
            "run's, and its Bundles are where that run put them"
        )
    if offline:
        # as `deidentify` says: a served gateway also asks the registry's opt-out sources
        table.caption += (
            "\nopt-out: only Consents in the export were read (no objection register, no EHR search); "
            "give --config for the hospital's sources and keys"
        )
    return table
