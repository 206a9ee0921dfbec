"""A bulk delivery job: pass 1 (index), pass 2 (groups through the chain into the sink), resumable.

Job state lives in `<work_dir>/state.db` (SQLite, synchronous): the job id, the `recorded` instant used in
every Provenance, a fingerprint of the inputs and parameters, and one row per finished group with its counts.
A re-run with the same work dir skips finished groups; a group that was cut off half-way is run again and
its Bundles that were already stored are recognised by their idempotency key (`bulk|<job>|<group>...`).
A re-run with other input files or parameters is refused (the group numbering would not match).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway.bulk import index as ix
from gateway.bulk.group import Chains, GroupResult, line_reader, run_group
from gateway.bulk.pool import ChainSpec, PoolRunner
from gateway.bulk.sinks import Sink
from gateway.bulk.sources import SourceError
from gateway.bulk.summary import BulkSummary, shown_file_name
from gateway.memory import paused_gc, return_large_buffers_to_the_os

Progress = Callable[[str, int, int], None]  # (phase "index"|"deliver", done, total)
MAX_INVALID_LISTED = 1000


class JobMismatch(Exception):
    """The work dir belongs to a job over other files or with other parameters."""


def make_work_dir(work_dir: Path) -> None:
    """A new work dir is private to the job's user, like the service's job folders."""
    if not work_dir.exists():
        work_dir.mkdir(mode=0o700, parents=True)


class StopAfter(Exception):
    """Raised (tests, benchmarks) to simulate an interruption after k groups."""


@dataclass(frozen=True)
class BulkOptions:
    group_size: int = 200  # patients per TTP batch (one process_bundle call)
    max_group_resources: int = 5_000  # bounds a group's memory whatever the patients' sizes
    bundle_size: int = 500  # entries per forwarded transaction Bundle
    max_line_bytes: int = 16 * 1024 * 1024
    stop_after_groups: int | None = None  # simulate an interruption (tests)
    workers: int = 0  # 0: in this process; n: n worker processes (needs a ChainSpec)
    patients_per_call: int = 10  # patients per process_bundle slice (the TTP batch stays the whole group)
    worker_nice: int = 10  # niceness added to worker processes: live deliveries and forwarding go first
    # the job's identity (in its Bundles' outbox keys) when the caller derives it from the export itself: a
    # new work dir over the same export then stores nothing twice; by default a new one per work dir
    job_id: str | None = None


async def deliver_export(
    files: list[ix.SourceFile],
    *,
    chains: Chains,
    sink: Sink,
    work_dir: Path,
    options: BulkOptions = BulkOptions(),
    progress: Progress | None = None,
    spec: ChainSpec | None = None,
) -> BulkSummary:
    """Index `files`, then run every group not done yet through the chain into `sink`. With
    `options.workers` and a `spec`, groups run in worker processes (see gateway/bulk/pool.py)."""
    make_work_dir(work_dir)
    return_large_buffers_to_the_os()  # a job moves hundreds of MB of Bundle bytes (see gateway/memory.py)
    started = time.perf_counter()
    total_bytes = sum(f.path.stat().st_size for f in files)
    with contextlib.closing(_open_state(work_dir / "state.db")) as state:
        fingerprint = _fingerprint(files, options, chains.registry.registry)
        job_id, recorded = _job_identity(state, fingerprint, options.job_id)
        finished = finished_summary(state)
        if finished is not None:  # run again after it completed: nothing to index, nothing to send
            finished.groups_resumed = finished.groups_total
            finished.seconds = round(time.perf_counter() - started, 3)
            return finished
        summary = BulkSummary(job=job_id, registry=chains.registry.registry)
        stats = await asyncio.to_thread(
            ix.build_index_file,
            work_dir / "index.db",
            files,
            group_size=options.group_size,
            max_group_resources=options.max_group_resources,
            max_line_bytes=options.max_line_bytes,
            progress=(lambda done: progress("index", done, total_bytes)) if progress else None,
            nice=options.worker_nice,
        )
        with contextlib.closing(ix.reopen_index(work_dir / "index.db")) as conn:
            if chains.registry.bundle_consent:
                try:
                    _refuse_unattributed_consents(conn, files)
                except SourceError:
                    (work_dir / "index.db").unlink(missing_ok=True)  # it names the export's files
                    raise
            known_types = chains.validator.resource_types | {"(unknown)"}
            summary.absorb_index(stats, conn, MAX_INVALID_LISTED, known_types)
            runner, close = _runner(files, chains, spec, options)
            summary.worker_processes = runner.workers
            try:
                await _deliver_groups(conn, state, runner, sink, options, summary, recorded, progress)
            finally:
                close()
            summary.absorb_unsent(conn)
        summary.seconds = round(time.perf_counter() - started, 3)
        kept = orjson.dumps(summary.as_dict()).decode()
        state.execute("INSERT OR REPLACE INTO job (key, value) VALUES ('summary', ?)", (kept,))
    # Finished: the index (offsets into the export, keys under a key that is gone) has no further use.
    (work_dir / "index.db").unlink(missing_ok=True)
    return summary


def _refuse_unattributed_consents(conn: sqlite3.Connection, files: list[ix.SourceFile]) -> None:
    """Fail closed before anything is sent: a Consent that cannot be tied to one patient may be anyone's
    objection (a posted Bundle with one is refused whole, or withholds every patient)."""
    consent_files = [n for n, source in enumerate(files) if source.type_hint == "Consent"]
    lines = ix.unattributed_consents(conn, consent_files)
    if lines:
        names = ix.file_names(conn)
        file, line = lines[0]
        where = f"{shown_file_name(names.get(file, ''), file)} line {line}"
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise SourceError(
            f"{where}{more}: a Consent that names no single patient of the export in a way that can be "
            "followed; whose objection it is cannot be known, so nothing was delivered (correct or remove "
            "it, then run again)"
        )


def finished_summary(state: sqlite3.Connection) -> BulkSummary | None:
    """The summary a completed job left in its state (counts, file names, fixed reasons: no patient data);
    None while the job has not completed."""
    row = state.execute("SELECT value FROM job WHERE key = 'summary'").fetchone()
    return BulkSummary.from_dict(orjson.loads(row[0])) if row else None


class InProcessRunner:
    """Groups through the chain in this process (the service's job thread; one core)."""

    parallelism = 1
    workers = 0

    def __init__(self, chains: Chains, read: Callable[[ix.Line], bytes], patients_per_call: int) -> None:
        self.chains, self.read, self.patients_per_call = chains, read, patients_per_call

    async def run(
        self, lines: list[ix.Line], tag: str, bundle_size: int, max_line_bytes: int, recorded: str
    ) -> GroupResult:
        # A group allocates tens of thousands of containers and frees them all at once, with no cycles
        with paused_gc():
            return await run_group(
                lines,
                self.read,
                self.chains,
                tag=tag,
                bundle_size=bundle_size,
                max_line_bytes=max_line_bytes,
                recorded=recorded,
                patients_per_call=self.patients_per_call,
            )


async def _deliver_groups(
    conn: sqlite3.Connection,
    state: sqlite3.Connection,
    runner: Runner,
    sink: Sink,
    options: BulkOptions,
    summary: BulkSummary,
    recorded: str,
    progress: Progress | None,
) -> None:
    """Run the groups not done yet, `runner.parallelism` at a time; store each group's Bundles and mark it
    done (in one place, this process) as soon as it finishes, in whatever order they finish."""
    total = ix.group_count(conn)
    summary.groups_total = total
    done = dict(state.execute("SELECT id, counts FROM groups_done").fetchall())
    if progress:
        progress("deliver", 0, total)
    pending: dict[asyncio.Task, int] = {}
    started = 0
    try:
        for group in range(total):
            lines = await asyncio.to_thread(ix.group_lines, conn, group)
            if group in done:
                counts = orjson.loads(done[group])
                # a state from before the shared lines sent were kept: every shared line of the group
                sent = counts.get("sharedSent", [line.id for line in lines if line.owner is None])
                await asyncio.to_thread(ix.mark_sent, conn, sent)
                rejected = [row[0] for row in counts.get("sharedRejected", [])]
                await asyncio.to_thread(ix.mark_rejected, conn, rejected)
                summary.absorb_group(counts, resumed=True)
                _tick(progress, summary, total)
                continue
            if options.stop_after_groups is not None and started >= options.stop_after_groups:
                await _finish(pending, conn, state, sink, summary, progress, total, wait_all=True)
                raise StopAfter(f"stopped after {started} groups")
            task = asyncio.ensure_future(
                runner.run(
                    lines,
                    f"bulk|{summary.job}|{group}",
                    options.bundle_size,
                    options.max_line_bytes,
                    recorded,
                )
            )
            pending[task] = group
            started += 1
            if len(pending) >= runner.parallelism:
                await _finish(pending, conn, state, sink, summary, progress, total, wait_all=False)
        await _finish(pending, conn, state, sink, summary, progress, total, wait_all=True)
    finally:
        for task in pending:
            task.cancel()


async def _finish(
    pending: dict[asyncio.Task, int],
    conn: sqlite3.Connection,
    state: sqlite3.Connection,
    sink: Sink,
    summary: BulkSummary,
    progress: Progress | None,
    total: int,
    *,
    wait_all: bool,
) -> None:
    while pending:
        finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            group = pending.pop(task)
            result = task.result()
            counts = await _store(result, sink, summary.job, group)
            await asyncio.to_thread(ix.mark_sent, conn, result.shared_sent)
            await asyncio.to_thread(ix.mark_rejected, conn, result.shared_rejected)
            state.execute(
                "INSERT INTO groups_done (id, counts, at) VALUES (?, ?, ?)",
                (group, orjson.dumps(counts), time.time()),
            )
            summary.absorb_group(counts, resumed=False)
            _tick(progress, summary, total)
        if not wait_all:
            return


async def _store(result: GroupResult, sink: Sink, job: str, group: int) -> dict[str, Any]:
    created = duplicates = 0
    sent: Counter[str] = Counter()
    for chunk in result.chunks:
        delivered = sum(n for rtype, n in chunk.counts.items() if rtype != "Provenance")
        # as a posted delivery's counts, plus where it comes from and its types; resourcesIn: what of the
        # export this Bundle carries (what the group dropped is counted in its `withheld` event)
        counts = {"bulkJob": job, "group": str(group), "resourcesIn": delivered}
        counts["resourcesDelivered"] = delivered
        counts["patients"] = chunk.counts.get("Patient", 0)
        counts["resources"] = dict(chunk.counts)
        new = await asyncio.to_thread(
            functools.partial(
                sink.put, pseudonym_types=sorted(result.pseudonym_types), patient_keys=chunk.patient_keys
            ),
            chunk.tag,
            chunk.payload,
            order_key=chunk.order_key,
            counts=counts,
        )
        created += new
        duplicates += not new
        sent.update(chunk.counts)
    withheld = _withheld_counts(result)
    if withheld:
        counts = {"bulkJob": job, "group": str(group), **withheld}
        await asyncio.to_thread(sink.withheld, f"bulk|{job}|{group}", counts)
    return _group_counts(result, sent, created, duplicates)


def _withheld_counts(result: GroupResult) -> dict[str, Any]:
    """What a group kept back, in a posted delivery's terms (patients, resources dropped per reason and
    type): for the processing record. Empty when it kept nothing back."""
    counts = {
        "patientsDroppedOptOut": result.patients_opted_out,
        "patientsDroppedUnknownOptOut": result.patients_unknown_optout,
        "patientsDroppedNoPseudonym": result.patients_no_pseudonym,
        "resourcesDroppedOptOut": result.resources_opted_out,
    }
    dropped = {reason: dict(c) for reason, c in result.dropped.items() if c}
    if not any(counts.values()) and not dropped:
        return {}
    # the withheld patients and their resources only, as a posted Bundle of which nothing went: a probe saw
    # a group's every patient and line here, its delivered ones counted twice in the processing record
    patients = sum(counts[k] for k in counts if k.startswith("patientsDropped"))
    # every resource the group kept back, whatever the reason (a type the registry does not get too): what
    # came in is then what was delivered plus what was dropped, per type, as for a posted Bundle (a probe's
    # RelatedPerson was in `dropped` but in no `resourcesIn`)
    resources = sum(n for by_type in dropped.values() for n in by_type.values())
    reasons = {"optOutReasons": dict(result.opt_out_reasons)} if result.opt_out_reasons else {}
    return {"patients": patients, "resourcesIn": resources, **counts, "dropped": dropped, **reasons}


def _group_counts(result: GroupResult, sent: Counter[str], created: int, duplicates: int) -> dict[str, Any]:
    return {
        "patients": result.patients,
        "patientsOptedOut": result.patients_opted_out,
        "patientsUnknownOptOut": result.patients_unknown_optout,
        "patientsNoPseudonym": result.patients_no_pseudonym,
        "resourcesOptedOut": result.resources_opted_out,
        "sent": dict(sent),
        "bundles": created,
        "bundlesAlreadyStored": duplicates,
        "ttpBatches": result.ttp_calls,
        "dropped": {reason: dict(c) for reason, c in result.dropped.items()},
        "rejectedLines": [list(x) for x in result.rejected_lines[:MAX_INVALID_LISTED]],
        "sharedSent": sorted(result.shared_sent),  # resumed, the group marks these again in the new index
        "sharedRejected": [[line_id, *rest] for line_id, rest in sorted(result.shared_rejected.items())],
    }


class Runner(Protocol):
    parallelism: int  # groups in flight at once
    workers: int  # processes that run the chain; 0: this one

    async def run(
        self, lines: list[ix.Line], tag: str, bundle_size: int, max_line_bytes: int, recorded: str
    ) -> GroupResult: ...


def _runner(
    files: list[ix.SourceFile], chains: Chains, spec: ChainSpec | None, options: BulkOptions
) -> tuple[Runner, Callable[[], None]]:
    paths = [str(f.path) for f in files]
    if options.workers > 0 and spec is not None:
        pool = PoolRunner(spec, options.workers, paths, options.patients_per_call, options.worker_nice)
        return pool, pool.close
    read, close = line_reader(paths)
    return InProcessRunner(chains, read, options.patients_per_call), close


def _tick(progress: Progress | None, summary: BulkSummary, total: int) -> None:
    if progress:
        progress("deliver", summary.groups_done, total)


# -- state ------------------------------------------------------------------------------------------------
def _open_state(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.executescript("""PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
        CREATE TABLE IF NOT EXISTS job (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS groups_done (id INTEGER PRIMARY KEY, counts BLOB NOT NULL,
                                                at REAL NOT NULL);""")
    return conn


def _job_identity(state: sqlite3.Connection, fingerprint: str, job_id: str | None) -> tuple[str, str]:
    meta = dict(state.execute("SELECT key, value FROM job").fetchall())
    if meta:
        if meta["fingerprint"] != fingerprint:
            raise JobMismatch(
                "this work dir belongs to a bulk job over other files or with other parameters; "
                "use a new work dir"
            )
        return meta["job"], meta["recorded"]
    # the export's own: run again from another work dir into the same store, nothing is stored twice
    job = job_id or fingerprint[:32]
    recorded = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    state.executemany(
        "INSERT INTO job (key, value) VALUES (?, ?)",
        [("job", job), ("recorded", recorded), ("fingerprint", fingerprint)],
    )
    return job, recorded


def _fingerprint(files: list[ix.SourceFile], options: BulkOptions, registry: str) -> str:
    parts = [registry, str(options.group_size), str(options.max_group_resources), str(options.bundle_size)]
    for f in files:
        st = f.path.stat()
        parts.append(f"{f.path.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
