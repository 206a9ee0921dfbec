"""`POST /registries/{registry}/$import` (NDJSON upload or a manifest of files in the import folder) and
`GET /bulk/{job}` (status, progress, counts). Same authentication and registry authorisation as the Bundle
endpoint; a job is visible only to callers of the provider that started it.

    install_bulk_routes(app, runtime)   # work folder and import folder from runtime.settings (see below)

FHIR_GATEWAY_BULK_WORK_DIR (default `var/bulk`): per-job index and state. FHIR_GATEWAY_BULK_IMPORT_DIR (no
default): the only folder a manifest may name files in; without it only uploads are accepted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.bulk.job import BulkOptions
from gateway.bulk.service import BulkJobs, JobStatus
from gateway.outcome import FhirError
from gateway.service.app import caller_of
from gateway.service.auth import Caller, require_registry
from gateway.service.body import NDJSON_TYPES, body_chunks, check_accept, check_content_type, read_limited
from gateway.store import StoreUnavailable

MANIFEST_TYPES = {"application/json", "application/fhir+json"}
MAX_MANIFEST_BYTES = 1024 * 1024


def import_dirs(providers: Sequence[Any], shared: Path | None) -> dict[str, Path]:
    """Each provider's import folder: its own, else the gateway's, when it is the only provider. With
    several, one folder for all would let one hospital's EHR deliver another's files, past that hospital's
    objection register: such a provider posts uploads only."""
    only = len(providers) == 1
    found = {p.id: p.import_dir or (shared if only else None) for p in providers}
    return {provider: folder for provider, folder in found.items() if folder is not None}


def install_bulk_routes(
    app: FastAPI,
    runtime,
    *,
    work_root: Path | None = None,  # noqa: ANN001
    import_dir: Path | None = None,
) -> BulkJobs:
    settings = runtime.settings  # FHIR_GATEWAY_BULK_* (gateway/config.py Settings)
    jobs = BulkJobs(
        runtime,
        work_root=work_root or settings.bulk_work_dir,
        import_dirs=import_dirs(runtime.config.providers, import_dir or settings.bulk_import_dir),
        options=BulkOptions(workers=settings.bulk_workers),
        max_upload_bytes=settings.bulk_max_upload_bytes,
        max_jobs=settings.bulk_max_jobs,
        providers=len(runtime.config.providers),
    )
    app.state.bulk_jobs = jobs

    # A probe's 1 MiB manifests (21,000 entries) held the event loop 2.3 s each, every hospital's posts with
    # it; four at once held threads the store needs as well. One check at a time per hospital: a slow file
    # system under one hospital's import folder does not hold another's imports (a re-probe).
    manifest_checks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    @app.post("/registries/{registry}/$import")
    async def bulk_import(registry: str, request: Request) -> Response:
        caller = caller_of(runtime, request)
        require_registry(caller, registry, runtime.registries)
        # as the Bundle endpoint: no compression, UTF-8, R4 (an upload is not read otherwise)
        check_content_type(request, NDJSON_TYPES | MANIFEST_TYPES)
        check_accept(request)
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        idle = settings.body_idle_timeout_seconds
        if media in NDJSON_TYPES:
            job = jobs.new_job(caller.provider or "", registry)
            try:
                upload = await jobs.receive_upload(job, body_chunks(request, idle=idle))
            except BaseException:  # too large, or the client went away: nothing of it stays
                jobs.discard(job)
                raise
            jobs.start(job, [upload], sender=caller.client_id)
        else:
            manifest = await read_limited(request, MAX_MANIFEST_BYTES, idle=idle)
            provider = caller.provider or ""
            async with manifest_checks[provider]:  # its files are looked at off the event loop
                job_id = await asyncio.to_thread(jobs.manifest_job_id, provider, registry, manifest)
            job, manifest_file = jobs.manifest_job(provider, registry, manifest, job_id)
            if manifest_file is not None:  # else: this manifest's job is running; answer with its status
                jobs.start(job, [manifest_file], sender=caller.client_id)
        location = f"/bulk/{job.id}"
        return Response(
            orjson.dumps(job.view()),
            status_code=202,
            media_type="application/json",
            headers={"Content-Location": location},
        )

    @app.get("/bulk")
    async def bulk_jobs(request: Request) -> Response:
        """This client's provider's jobs (an admin: all), newest first: to find a job whose
        Content-Location was lost."""
        caller = caller_of(runtime, request)
        mine = [j for j in jobs.jobs.values() if _sees(caller, j)]
        mine.sort(key=lambda j: j.started, reverse=True)
        listing = [{k: v for k, v in j.view().items() if k != "summary"} for j in mine]
        return Response(orjson.dumps(listing), media_type="application/json")

    @app.get("/bulk/{job_id}")
    async def bulk_status(job_id: str, request: Request) -> Response:
        caller = caller_of(runtime, request)
        job = jobs.jobs.get(job_id)
        if job is None or not _sees(caller, job):
            raise FhirError.single(
                404,
                "not-found",
                "no such bulk job for this client (jobs do not outlive a gateway restart: post the same "
                "manifest again to resume its job, or upload the export again)",
            )
        # whether it runs, read before what it says: read after the outbox look-up below, a job that ended
        # meanwhile was answered 200 with the view of a running one ("delivering": a clean-clone CI saw it)
        running = job.running
        headers = {"X-Progress": f"{job.state} {job.phase_done}/{job.phase_total}"}
        if running:
            headers["Retry-After"] = "2"
        view = job.view()
        if job.state in ("delivering", "completed"):
            # "completed" is the job's part (every Bundle in the outbox); what the registry has is the
            # outbox's (a probe read "completed" while the registry, down, had nothing), also while the job
            # is still storing them
            prefix = f"bulk|{job.bulk_id or (job.summary.job if job.summary else job.id)}|"
            with contextlib.suppress(StoreUnavailable):
                view["outbox"] = await asyncio.to_thread(
                    runtime.store.depth_by_key_prefix, job.provider, job.registry, prefix
                )
        return Response(
            orjson.dumps(view),
            status_code=202 if running else 200,
            media_type="application/json",
            headers=headers,
        )

    return jobs


def _sees(caller: Caller, job: JobStatus) -> bool:
    """An admin sees every job; a client its hospital's jobs for the registries it may deliver to."""
    return caller.admin or (job.provider == caller.provider and job.registry in caller.registries)
