"""Bulk jobs inside the running gateway (`POST /registries/{r}/$import`, `GET /bulk/{job}`).

Each job runs in its own thread with its own event loop, so a yearly export does not stall the Bundle
endpoint's loop. The chain runs in worker processes at lower priority (gateway/bulk/pool.py) when the
gateway was started from its configuration (`fhir-gateway serve`), so live deliveries keep the cores they
need; otherwise (a runtime built with parts handed in, or `FHIR_GATEWAY_BULK_WORKERS=0`) in the job thread,
where the chain's I/O objects (TTP client, opt-out sources) belong to the server's loop and their calls are
handed back to it (`_OnLoop`). The outbox worker of the server forwards what the job
stores. Job state is in memory (status) and in `<work_root>/<job>/state.db` (resume on a re-run of the job).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.bulk import BulkOptions, BulkSummary, run_bulk_async
from gateway.bulk.chains import from_runtime
from gateway.bulk.group import Chains
from gateway.bulk.job import JobMismatch, finished_summary
from gateway.bulk.pool import ChainSpec, runtime_spec
from gateway.bulk.sources import SourceError, SourceFile, parse_manifest
from gateway.config import provider_share
from gateway.optout.base import Decision, OptOutUnavailable, PatientRef
from gateway.outcome import FhirError
from gateway.pipeline.parse import check_encoding_prefix
from gateway.pseudonym.types import PrePseudonym
from gateway.store import StoreUnavailable
from gateway.store.model import iso_instant
from gateway.ttp.backend import TTPResult, TTPUnavailable

log = logging.getLogger("gateway.bulk")
KEEP_FINISHED = 200  # statuses of finished jobs kept in memory (a long-running gateway must not grow)


@dataclass
class JobStatus:
    id: str
    provider: str
    registry: str
    state: str = "queued"  # queued | indexing | delivering | completed | failed
    phase_done: int = 0
    phase_total: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    summary: BulkSummary | None = None
    error: str | None = None
    resumable: bool = False  # a manifest job: its folder (offsets, keyed hashes, state) outlives a failure
    upload_sha256: str | None = None  # an upload's content, so that the same export sent again is one job
    bulk_id: str | None = None  # the job id in its Bundles' outbox keys (`bulk|<bulk_id>|...`), once it runs

    @property
    def running(self) -> bool:
        return self.state not in ("completed", "failed")

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.id,
            "registry": self.registry,
            "state": self.state,
            "progress": {"done": self.phase_done, "total": self.phase_total},
            "startedAt": iso_instant(self.started),
            "finishedAt": None if self.finished is None else iso_instant(self.finished),
        }
        if self.summary is not None:
            out["summary"] = self.summary.as_dict()
        if self.error:
            out["error"] = self.error
        return out


class BulkJobs:
    def __init__(
        self,
        runtime: Any,
        *,
        work_root: Path,
        import_dirs: Mapping[str, Path],
        options: BulkOptions | None = None,
        max_upload_bytes: int = 20 * 1024**3,
        max_jobs: int = 2,
        providers: int = 1,
    ) -> None:
        # provider → the only folder its manifests may name files in (none: uploads only)
        self.runtime, self.work_root, self.import_dirs = runtime, work_root, dict(import_dirs)
        self.options = options or BulkOptions()
        self.max_upload_bytes, self.max_jobs = max_upload_bytes, max_jobs
        # where several providers share the gateway, one runs at most half of the jobs: a probe's two
        # uploads trickled a byte every 10 s held every slot, and the other hospital's imports were 429
        self.provider_share = provider_share(max_jobs, providers)
        self.jobs: dict[str, JobStatus] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._locks: dict[str, int] = {}
        self._remove_expired()
        for job in _manifest_jobs_on_disk(work_root):
            self._remember(job)

    def _remove_expired(self) -> None:
        removed = remove_abandoned_jobs(self.work_root)
        if removed:
            log.info("removed %d bulk job folders (stopped uploads, manifest jobs past resume)", removed)

    def counts(self) -> Counter[tuple[str, str]]:
        """Jobs by (registry, state), for the metrics."""
        return Counter((job.registry, job.state) for job in self.jobs.values())

    def _remember(self, job: JobStatus) -> None:
        """Keep the status of every running job and of the last KEEP_FINISHED finished ones."""
        self.jobs[job.id] = job
        finished = sorted((j for j in self.jobs.values() if not j.running), key=lambda j: j.finished or 0)
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[old.id]

    def new_job(self, provider: str, registry: str) -> JobStatus:
        self._admit(provider)
        job = JobStatus(uuid.uuid4().hex, provider, registry)
        self._open_folder(job.id, exist_ok=False)
        self._remember(job)
        return job

    def _admit(self, provider: str) -> None:
        """A new job only while fewer than `max_jobs` run (each one takes worker processes and disk: 30
        uploads at once made 31 processes), and fewer than its share of them are the provider's."""
        running = [job for job in self.jobs.values() if job.running]
        mine = sum(job.provider == provider for job in running)
        if len(running) >= self.max_jobs or mine >= self.provider_share:
            text = "this gateway runs as many bulk jobs as it may at once; post again after Retry-After"
            raise FhirError.single(429, "throttled", text, headers={"Retry-After": "60"})

    def _open_folder(self, job_id: str, *, exist_ok: bool) -> Path:
        """The job's folder, made (0700: an upload is the hospital's data in clear) and locked by this
        process; BlockingIOError when another live process holds it. Expired folders go first."""
        self._remove_expired()
        folder = self.work_root / job_id
        self.work_root.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=exist_ok)
        self._locks[job_id] = _hold_lock(folder / OWNER_LOCK)
        return folder

    def discard(self, job: JobStatus) -> None:
        """A job whose upload never arrived whole: no status, no folder."""
        self.jobs.pop(job.id, None)
        self._release(job.id, remove=True)

    def _release(self, job_id: str, *, remove: bool) -> None:
        if remove:
            shutil.rmtree(self.work_root / job_id, ignore_errors=True)
        lock = self._locks.pop(job_id, None)
        if lock is not None:
            os.close(lock)

    async def receive_upload(self, job: JobStatus, chunks: AsyncIterator[bytes]) -> Path:
        """Stream an NDJSON upload to the job's folder (never whole in memory)."""
        target = self.work_root / job.id / "upload.ndjson"
        size = 0
        digest = hashlib.sha256()
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            async for chunk in chunks:
                if size == 0 and chunk:
                    check_encoding_prefix(chunk)  # UTF-16 or -32: every line would be unreadable
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise FhirError.single(413, "too-costly", "upload larger than the bulk limit")
                handle.write(chunk)
                digest.update(chunk)
        if size == 0:
            raise FhirError.single(400, "required", "the upload is empty: nothing to deliver")
        job.upload_sha256 = digest.hexdigest()
        return target

    def manifest_job_id(self, provider: str, registry: str, manifest: bytes) -> str:
        """Check the files a manifest names and return the id of the export's job as the files are now
        (sizes, modification times). File-system work only, for a thread: it touches no job state."""
        import_dir = self.import_dirs.get(provider)
        if import_dir is None:
            raise FhirError.single(
                403,
                "forbidden",
                "a JSON body is read as a Bulk Data manifest, and manifest imports are not enabled for this "
                "provider (no import folder configured for it): upload NDJSON (application/fhir+ndjson) "
                f"instead; a Bundle goes to /registries/{registry}/Bundle",
            )
        try:  # a manifest that cannot be read, or names files it may not, is the request's fault: 400 now
            sources = parse_manifest(manifest, base=import_dir, allowed_root=import_dir)
        except SourceError as exc:
            raise FhirError.single(400, "invalid", str(exc)) from None
        return _manifest_job_id(provider, registry, manifest, sources)

    def manifest_job(
        self, provider: str, registry: str, manifest: bytes, job_id: str | None = None
    ) -> tuple[JobStatus, Path | None]:
        """The job of this manifest (`job_id`: `manifest_job_id`'s answer, when a thread has found it). A
        post of the same export while its job runs or after it completed gets that job (and None: nothing
        to start, nothing delivered twice); after an interruption (a failure, a gateway that stopped) the
        job resumes from its folder's state. A changed export is another job."""
        job_id = job_id or self.manifest_job_id(provider, registry, manifest)
        current = self.jobs.get(job_id)
        if current is not None and current.state != "failed":
            return current, None
        self._admit(provider)
        try:
            folder = self._open_folder(job_id, exist_ok=True)
        except BlockingIOError:
            raise FhirError.single(
                409, "conflict", "another gateway process is delivering this export; ask it for the status"
            ) from None
        job = JobStatus(job_id, provider, registry, resumable=True)
        self._remember(job)
        owner = {"provider": provider, "registry": registry, "startedAt": job.started}
        (folder / JOB_FILE).write_bytes(orjson.dumps(owner))
        target = folder / "manifest.json"
        # kept for the resume window: only what names the export's files (which only the gateway's user may
        # read), not the rest of what was posted (a kick-off `request` url may carry a BSN in its filter)
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            handle.write(orjson.dumps(_files_of(manifest)))
        return job, target

    def start(self, job: JobStatus, sources: list[Path], *, sender: str) -> None:
        loop = asyncio.get_running_loop()
        chains = _on_loop(from_runtime(self.runtime, job.registry, job.provider), loop)
        # Worker processes (niced) when they can build this very chain; else the job thread runs it.
        spec = runtime_spec(self.runtime, job.registry, job.provider) if self.options.workers else None
        bundle_size = self.runtime.config.registries[job.registry].bulk_bundle_size
        options = replace(self.options, bundle_size=bundle_size)
        # The same export makes the same bulk job, whose Bundles the outbox already holds are not stored
        # (nor delivered) twice: an upload cut off by a restart (its folder goes when its job ends) sent
        # again; a manifest posted to another gateway of the same store (a probe's two scale-out hosts
        # delivered one export twice, each job under its own random id), or after its state expired.
        options = replace(options, job_id=_bulk_job_id(job, options))
        job.bulk_id = options.job_id
        thread = threading.Thread(
            target=self._run,
            args=(job, sources, chains, spec, options, sender),
            daemon=True,
            name=f"bulk-{job.id[:8]}",
        )
        self._threads[job.id] = thread
        thread.start()

    def _run(
        self,
        job: JobStatus,
        sources: list[Path],
        chains: Chains,
        spec: ChainSpec | None,
        options: BulkOptions,
        sender: str,
    ) -> None:
        def progress(phase: str, done: int, total: int) -> None:
            job.state, job.phase_done, job.phase_total = (
                "indexing" if phase == "index" else "delivering",
                done,
                total,
            )

        work_dir = self.work_root / job.id

        def run() -> BulkSummary:
            return asyncio.run(
                run_bulk_async(
                    sources,
                    registry=job.registry,
                    work_dir=work_dir,
                    runtime=self.runtime,
                    chains=chains,
                    provider=job.provider,
                    sender=sender,
                    options=options,
                    progress=progress,
                    allowed_root=self.import_dirs.get(job.provider),
                    spec=spec,
                )
            )

        # An upload is the hospital's data in clear: its folder goes when the job ends, whatever the outcome
        # (a new upload is a new job; the registry's upserts absorb what was delivered). A manifest job's
        # folder holds offsets, keyed hashes and its state only: kept for the resume window, so that the
        # same export posted again resumes (after a failure) or delivers nothing (after completion), also
        # after a restart. The status stays in memory.
        keep = job.resumable
        again = "post the same manifest again to resume" if job.resumable else "upload the export again"
        try:
            try:
                job.summary = run()
            except JobMismatch:  # a state from an earlier export under the same name: start afresh
                for name in ("state.db", "index.db"):
                    (work_dir / name).unlink(missing_ok=True)
                job.summary = run()
            job.state = "completed"
            if _nothing_readable(job.summary):
                # invalid lines and no patient: it could never deliver anything, not "completed" (a probe)
                job.state = "failed"
                job.error = "no patient in the export could be read: nothing was delivered (see invalidLines)"
        except SourceError as exc:
            keep = False
            job.state, job.error = "failed", str(exc)
        except TTPUnavailable:
            job.state, job.error = "failed", f"the TTP could not be reached; {again}"
        except OptOutUnavailable:
            job.state, job.error = "failed", f"an opt-out source could not be reached; {again}"
        except StoreUnavailable:
            job.state, job.error = "failed", f"the gateway's store could not be reached; {again}"
        except Exception as exc:  # noqa: BLE001 - reported as a fixed text with the error class only
            log.exception("bulk job %s failed", job.id)
            job.state, job.error = "failed", f"internal error ({type(exc).__name__}); {again}"
        finally:
            job.finished = time.time()
            self._release(job.id, remove=not keep)

    def wait(self, job_id: str, timeout: float | None = None) -> None:
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)


def _manifest_jobs_on_disk(work_root: Path) -> list[JobStatus]:
    """The statuses of manifest jobs an earlier gateway process left (within their resume window), so that a
    client polling across a restart reads what became of its job instead of a 404: completed (the summary
    kept in the job's state) or interrupted (post the same manifest again to resume)."""
    found = []
    for meta in sorted(work_root.glob(f"*/{JOB_FILE}")) if work_root.is_dir() else ():
        folder = meta.parent
        if _held_elsewhere(folder / OWNER_LOCK):
            continue  # another live gateway process runs it: its status is there
        try:
            owner = orjson.loads(meta.read_bytes())
            summary = _kept_summary(folder / "state.db")
        except (OSError, orjson.JSONDecodeError, sqlite3.Error):
            continue
        job = JobStatus(folder.name, owner["provider"], owner["registry"], resumable=True)
        # when it was posted (kept in its folder since this was added) and when its state was last written
        last_write = (folder / "state.db").stat().st_mtime if (folder / "state.db").exists() else None
        job.started = owner.get("startedAt") or folder.stat().st_mtime
        job.finished = last_write or job.started
        if summary is not None:
            job.state, job.summary = "completed", summary
            job.phase_done = job.phase_total = summary.groups_total
        else:
            job.state = "failed"
            job.error = "interrupted: the gateway stopped during this job; post the manifest again to resume"
        found.append(job)
    return found


def _bulk_job_id(job: JobStatus, options: BulkOptions) -> str:
    """An upload's by its content; a manifest job's by its id (the manifest, its files' sizes and times)."""
    export = job.upload_sha256 or job.id
    parts = (job.provider, job.registry, export, options.group_size, options.max_group_resources)
    text = "|".join(map(str, (*parts, options.bundle_size)))
    return ("u" if job.upload_sha256 else "m") + hashlib.sha256(text.encode()).hexdigest()[:31]


def _kept_summary(state_db: Path) -> BulkSummary | None:
    if not state_db.exists():
        return None
    with contextlib.closing(sqlite3.connect(state_db)) as conn:
        return finished_summary(conn)


def _files_of(manifest: bytes) -> dict[str, Any]:
    """A read manifest (see `parse_manifest`) down to its files: each url, and its type if an R4 type name."""
    from gateway.deid.r4 import r4

    outputs = orjson.loads(manifest)["output"]
    types = r4().resources
    return {
        "output": [
            {"url": item["url"], **({"type": item["type"]} if item.get("type") in types else {})}
            for item in outputs
        ]
    }


def _manifest_job_id(provider: str, registry: str, manifest: bytes, sources: list[SourceFile]) -> str:
    parts = [provider.encode(), registry.encode(), manifest]
    try:
        for source in sources:
            st = source.path.stat()
            parts.append(f"{source.path}|{st.st_size}|{st.st_mtime_ns}".encode())
    except OSError:
        pass  # gone since it was parsed: the job fails with the reason when it runs
    return hashlib.sha256(b"\n".join(parts)).hexdigest()[:32]


# -- job folders: owned through a lock the kernel releases when the owning process dies ---------------------
OWNER_LOCK = ".owner.lock"
JOB_FILE = "job.json"  # a manifest job's provider and registry (who may see its status after a restart)
UNLOCKED_GRACE_SECONDS = 60  # a folder between mkdir and its lock, in a gateway starting at this moment
MANIFEST_RESUME_SECONDS = 7 * 24 * 3600  # how long an interrupted manifest job can be resumed


def _hold_lock(path: Path) -> int:
    """An open descriptor holding the folder's lock; BlockingIOError when a live process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _held_elsewhere(lock: Path) -> bool:
    """Whether a live process (this one through another descriptor, or another) holds the folder's lock."""
    try:
        os.close(_hold_lock(lock))
    except BlockingIOError:
        return True
    return False


def remove_abandoned_jobs(work_root: Path, resume_seconds: float = MANIFEST_RESUME_SECONDS) -> int:
    """Remove the folders of jobs whose gateway process is gone (killed, crashed, stopped mid-job). An
    upload there is the hospital's data in clear and goes at once; a manifest job's folder (offsets, keyed
    hashes, state), ended or not, stays `resume_seconds` for a re-post of its manifest. Folders of jobs that a
    live gateway process runs (a shared work folder) are locked by it and stay."""
    removed = 0
    for folder in work_root.glob("*/") if work_root.is_dir() else ():
        lock = folder / OWNER_LOCK
        age = time.time() - folder.stat().st_mtime
        if not lock.exists():
            if age < UNLOCKED_GRACE_SECONDS:
                continue
        else:
            if _held_elsewhere(lock):
                continue  # a live job
            if (folder / "manifest.json").exists() and age < resume_seconds:
                continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


# -- the chain's I/O objects, called on the server's loop --------------------------------------------------
class _OnLoop:
    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target, self._loop = target, loop

    async def _call(self, name: str, *args: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(getattr(self._target, name)(*args), self._loop)
        return await asyncio.wrap_future(future)


class _TTPOnLoop(_OnLoop):
    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        return await self._call("pseudonymise", registry, items)

    async def probe(self) -> None:
        await self._call("probe")


class _OptOutOnLoop(_OnLoop):
    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        return await self._call("check", patients)


def _on_loop(chains: Chains, loop: asyncio.AbstractEventLoop) -> Chains:
    registry = replace(chains.registry, optout=tuple(_OptOutOnLoop(s, loop) for s in chains.registry.optout))
    provider = replace(chains.provider, ttp=_TTPOnLoop(chains.provider.ttp, loop))
    return Chains(registry, provider, chains.validator, chains.mapping)


def _nothing_readable(summary: BulkSummary) -> bool:
    return bool(summary.invalid_lines) and summary.patients == 0 and not summary.sent
