"""The gateway's HTTP service: EHRs post bundles here; the outbox worker forwards them to the registries."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from gateway.config import provider_share
from gateway.optout.base import OptOutUnavailable
from gateway.optout.register import PATIENT_NUMBER
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.process import cpu_work
from gateway.runtime import Runtime, bundle_identifier
from gateway.service import errors
from gateway.service.auth import MTLS_HEADER, Caller, require_admin, require_registry
from gateway.service.body import check_accept, check_content_type, prefers, read_limited, single_header
from gateway.service.capability import capability_statement
from gateway.service.logs import request_id
from gateway.service.responses import fhir_response
from gateway.service.summary import delivery_parameters
from gateway.store import StoreUnavailable, Superseded
from gateway.store.model import STATUSES, iso_instant
from gateway.ttp.backend import TTPUnavailable

log = logging.getLogger("gateway.service")

SYNC_WAIT_SECONDS = 20.0

# What a dependency outage means for the EHR: nothing stored, try again later (metric outcome, text, seconds).
UNAVAILABLE: dict[type, tuple[str, str, str]] = {
    TTPUnavailable: (
        "ttp-unavailable",
        "the pseudonymisation service (TTP) cannot answer; nothing was stored or delivered",
        "30",
    ),
    StoreUnavailable: (
        "store-unavailable",
        "the delivery store cannot take the bundle; nothing was stored",
        "10",
    ),
    OptOutUnavailable: (
        "optout-unavailable",
        "an opt-out (objection) source cannot answer; nothing was stored or delivered",
        "30",
    ),
}

# Request bodies are read raw (size limit first, orjson, schema per resource), so FastAPI cannot derive
# their description; these keep the OpenAPI document (and schemathesis) truthful.
BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {
                "schema": {
                    "type": "object",
                    "required": ["resourceType", "type"],
                    "properties": {
                        "resourceType": {"type": "string", "enum": ["Bundle"]},
                        "type": {"type": "string", "enum": ["transaction", "batch", "collection"]},
                        "entry": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
            for media in ("application/fhir+json", "application/json")
        },
    }
}
OBJECTION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["patientNumber"],
                    "properties": {
                        "patientNumber": {"type": "string"},
                        "registry": {"type": "string", "default": "*"},
                    },
                }
            }
        },
    }
}


# A body above this is parsed, and processed, in a worker thread: a 10 MB Bundle takes its 100 ms of parsing
# off the event loop, and a probe's 7 MB of unknown top-level elements (no entries) its 2 s of validation.
PARSE_OFF_LOOP_BYTES = 2 * 1024 * 1024


def create_app(runtime: Runtime, *, run_worker: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start(run_worker=run_worker)
        try:
            yield
        finally:
            await runtime.stop()

    # the API description is served behind the admin key (see _operations_routes); no CDN-loaded doc pages
    app = FastAPI(
        title="FHIR delivery gateway",
        version=runtime.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # a 307 to `path/` was built from the Host header and always http://: an EHR following it behind a
        # TLS proxy would re-post the Bundle in clear text (a probe). Such a path is a 404 like any other.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    errors.install(app)
    _install_request_ids(app, runtime)
    _operations_routes(app, runtime)
    _ingest_routes(app, runtime)
    _delivery_routes(app, runtime)
    _admin_routes(app, runtime)
    from gateway.service.bulk_routes import install_bulk_routes  # it builds on this module's routes

    install_bulk_routes(app, runtime)  # folders from runtime.settings
    return app


def _install_request_ids(app: FastAPI, runtime: Runtime) -> None:
    app.add_middleware(RequestIds)


class RequestIds:
    """Every request gets an id (X-Request-ID, the request log line, every log line while it runs) and an
    unexpected error becomes a 500 OperationOutcome carrying that id. A plain ASGI middleware: Starlette's
    `@app.middleware("http")` costs ~0.3 ms per request (measured: a bare echo endpoint went from
    ~7,500-10,800 to ~2,500-2,900 requests/s with it).

    Errors are answered here, not by the outermost (Exception) handler, which runs only after this middleware
    has returned: so the 500, its "unexpected error" log line and the request line carry the id."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            state["status"] = 499  # the client went away mid-body: nobody to answer, nothing went wrong here
        except Exception as exc:  # noqa: BLE001
            if state["started"]:
                raise  # the answer is already on its way: nothing better to send
            await errors.unexpected(exc)(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "route": getattr(scope.get("route"), "path", "unmatched"),
                    "status": state["status"],
                    "request_id": rid,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )


def caller_of(runtime: Runtime, request: Request) -> Caller:
    peer = request.client.host if request.client else None
    headers = request.headers
    keys = len(headers.getlist("authorization")) + len(headers.getlist("x-api-key"))
    subjects = len(headers.getlist(MTLS_HEADER)) if runtime.authenticator.trusts(peer) else 0
    if keys + subjects > 1:
        # one would silently win: a proxy that adds its header beside the client's would let the client
        # choose who it is (a probe), and a key beside a certificate subject names two clients (a re-probe)
        raise FhirError.single(
            401, "login", "send one credential (one key, one certificate subject)",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return runtime.authenticator.authenticate({k.lower(): v for k, v in headers.items()}, peer)


def _operations_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/metadata")
    async def metadata() -> Response:
        return fhir_response(capability_statement(list(runtime.registries)))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = await runtime.readiness()
        body = {"status": "ready" if not problems else "not-ready", "problems": problems}
        return Response(
            orjson.dumps(body), status_code=200 if not problems else 503, media_type="application/json"
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        require_admin(caller_of(runtime, request))
        return Response(orjson.dumps(app.openapi()), media_type="application/json")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        require_admin(caller_of(runtime, request))
        runtime.metrics.refresh_outbox(await asyncio.to_thread(runtime.store.depth))
        bulk_jobs = getattr(request.app.state, "bulk_jobs", None)
        if bulk_jobs is not None:
            runtime.metrics.refresh_bulk(bulk_jobs.counts())
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _InFlight:
    """Bundles this process is working on (one event loop, so plain counters): back-pressure. Where several
    providers share the gateway, one holds at most its share of the slots (a probe's hospital held them all
    with bodies trickled a byte at a time, and the other hospital's posts were 429 for minutes)."""

    def __init__(self) -> None:
        self.count = 0
        self.by_provider: Counter[str] = Counter()

    @contextlib.contextmanager
    def admit(self, runtime: Runtime, provider: str) -> Iterator[None]:
        limit = runtime.settings.max_inflight_bundles
        share = _provider_share(runtime, limit)
        if (limit and self.count >= limit) or (share and self.by_provider[provider] >= share):
            runtime.metrics.bundles.labels(outcome="throttled").inc()
            text = "too many bundles in progress at this gateway; post again after Retry-After seconds"
            raise FhirError.single(429, "throttled", text, headers={"Retry-After": "1"})
        self.count += 1
        self.by_provider[provider] += 1
        try:
            yield
        finally:
            self.count -= 1
            self.by_provider[provider] -= 1


def _provider_share(runtime: Runtime, limit: int) -> int:
    """The slots one provider may hold: FHIR_GATEWAY_MAX_INFLIGHT_PER_PROVIDER, by default
    `config.provider_share` (0: no limit of its own)."""
    configured = runtime.settings.max_inflight_per_provider
    return provider_share(limit, len(runtime.providers)) if configured is None else configured


def _ingest_routes(app: FastAPI, runtime: Runtime) -> None:
    in_flight = _InFlight()

    @app.post("/registries/{registry}/Bundle", openapi_extra=BUNDLE_BODY)
    async def post_bundle(registry: str, request: Request) -> Response:
        caller = caller_of(runtime, request)
        require_registry(caller, registry, runtime.registries)
        check_content_type(request)
        check_accept(request)
        idempotency = single_header(request, "Idempotency-Key")
        # before the body is read: a refused post costs next to nothing
        with in_flight.admit(runtime, caller.provider or ""):
            return await _accept(runtime, caller, registry, request, idempotency)


async def _accept(
    runtime: Runtime, caller: Caller, registry: str, request: Request, idempotency: str | None
) -> Response:
    """Read, process and store one posted Bundle; answer sync (wait for the registry) or async."""
    body = await read_limited(
        request, runtime.settings.max_body_bytes, idle=runtime.settings.body_idle_timeout_seconds
    )
    large = len(body) > PARSE_OFF_LOOP_BYTES
    try:
        bundle = await cpu_work(large, parse_json, body, max_bytes=runtime.settings.max_body_bytes)
    except FhirError as err:  # a duplicate key, a NUL in a code: a near miss the privacy officer counts too
        await runtime.record_refusal(caller, registry, err)
        raise
    try:
        accepted = await runtime.accept_bundle(
            bundle,
            caller=caller,
            registry=registry,
            idempotency_key=idempotency,
            body_digest=hashlib.sha256(body).hexdigest(),
            large=large,
        )
    except (TTPUnavailable, StoreUnavailable, OptOutUnavailable) as exc:
        key = next(kind for kind in UNAVAILABLE if isinstance(exc, kind))  # and subclasses
        outcome, text, retry_after = UNAVAILABLE[key]
        runtime.metrics.bundles.labels(outcome=outcome).inc()
        log.warning("a post could not be taken: %s; nothing stored", outcome, extra={"registry": registry})
        raise FhirError.single(503, "transient", text, headers={"Retry-After": retry_after}) from None
    if accepted.delivery_id is None:
        return fhir_response(delivery_parameters(None, "nothing-to-deliver", accepted.report), 200)
    status_url = f"/deliveries/{accepted.delivery_id}"
    headers = {"Content-Location": status_url}
    if prefers(request, "respond-async"):
        return fhir_response(
            delivery_parameters(accepted.delivery_id, "queued", accepted.report), 202, headers=headers
        )
    try:
        delivery = await runtime.wait_for(accepted.delivery_id, SYNC_WAIT_SECONDS)
    except StoreUnavailable:  # it IS stored (committed above): say so, and let the EHR poll
        delivery = None
    status = delivery.status if delivery else "queued"
    http_status = {"delivered": 200, "dead": 422}.get(status, 202)
    body_out = delivery_parameters(
        accepted.delivery_id, status, accepted.report, delivery.registry_status if delivery else None
    )
    return fhir_response(body_out, http_status, headers=headers)


async def _requeued(requeue: Any, delivery_id: str) -> bool:
    try:
        return bool(await asyncio.to_thread(requeue, delivery_id))
    except Superseded:
        raise FhirError.single(
            409,
            "conflict",
            "a newer delivery carries one of this delivery's patients: requeued, this older one would "
            "overwrite it at the registry (requeue with force=true to send it all the same)",
        ) from None


def _delivery_view(d: Any) -> dict[str, Any]:
    """What a client may see of a delivery: status and counts, never the payload."""
    return {
        "id": d.id,
        "registry": d.registry,
        "status": d.status,
        "attempts": d.attempts,
        "createdAt": iso_instant(d.created_at),
        "updatedAt": iso_instant(d.updated_at),
        "registryStatus": d.registry_status,
        "lastError": d.last_error,
        "bundleIdentifier": bundle_identifier(d.idempotency_key),  # as the registry has it
    }


def _client_registries(caller: Caller) -> frozenset[str] | None:
    """The registries whose deliveries an EHR client sees (None: the admin, who sees every one)."""
    return None if caller.admin else caller.registries


async def _own_delivery(runtime: Runtime, caller: Caller, delivery_id: str) -> Any:
    """The delivery, if it is the caller's hospital's to a registry the caller may deliver to (a probe's
    client of one registry requeued a dead letter to another)."""
    d = await asyncio.to_thread(runtime.store.get, delivery_id, provider=caller.provider)
    allowed = _client_registries(caller)
    return None if d is None or (allowed is not None and d.registry not in allowed) else d


async def _listing(
    runtime: Runtime,
    provider: str | None,
    status: str | None,
    registry: str | None,
    limit: int,
    registries: frozenset[str] | None = None,
) -> Response:
    """Deliveries newest first; `provider` None lists every provider's (admin only); `registries`: only
    those (a client sees its hospital's deliveries to the registries it may deliver to)."""
    if status is not None and status not in STATUSES:
        text = f"status must be one of {', '.join(STATUSES)}"  # never the value sent
        raise FhirError.single(400, "value", text, "status")
    if registries is not None and registry is not None and registry not in registries:
        raise FhirError.single(403, "forbidden", "this client may not deliver to this registry", "registry")
    rows = await asyncio.to_thread(
        runtime.store.list_deliveries,
        provider=provider,
        status=status,
        registry=registry,
        limit=min(max(limit, 1), 1000),
        registries=registries,
    )
    return Response(orjson.dumps([_delivery_view(d) for d in rows]), media_type="application/json")


def _delivery_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/deliveries")
    async def list_deliveries(
        request: Request, status: str | None = None, registry: str | None = None, limit: int = 100
    ) -> Response:
        caller = caller_of(runtime, request)
        return await _listing(runtime, caller.provider, status, registry, limit, _client_registries(caller))

    @app.get("/deliveries/{delivery_id}")
    async def delivery_status(delivery_id: str, request: Request) -> Response:
        caller = caller_of(runtime, request)
        d = await _own_delivery(runtime, caller, delivery_id)
        if d is None:
            raise FhirError.single(404, "not-found", "no such delivery for this client")
        if d.status in ("queued", "delivering"):
            # still on its way: where it stands (attempts, the registry's last answer, when it goes again)
            # and when to ask next, not every second while its retry is minutes away (a probe)
            view = _delivery_view(d)
            wait = 1
            if d.status == "queued" and d.attempts:
                view["nextAttemptAt"] = iso_instant(d.next_attempt_at)
                wait = min(300, max(1, math.ceil(d.next_attempt_at - time.time())))
            headers = {"X-Progress": d.status, "Retry-After": str(wait)}
            return Response(orjson.dumps(view), 202, headers=headers, media_type="application/json")
        return Response(orjson.dumps(_delivery_view(d)), media_type="application/json")

    @app.post("/deliveries/{delivery_id}/$requeue")
    async def requeue(delivery_id: str, request: Request, force: bool = False) -> Response:
        caller = caller_of(runtime, request)
        requeue = functools.partial(
            runtime.store.requeue, provider=caller.provider, actor=caller.client_id, force=force
        )
        mine = await _own_delivery(runtime, caller, delivery_id) is not None
        ok = mine and await _requeued(requeue, delivery_id)
        if not ok:
            raise FhirError.single(404, "not-found", "no dead delivery with this id for this client")
        return Response(orjson.dumps({"id": delivery_id, "status": "queued"}), media_type="application/json")

    @app.post("/objections", status_code=204, openapi_extra=OBJECTION_BODY)
    async def add_objection(request: Request) -> Response:
        caller = _provider_caller(runtime, request)
        patient_number, registry = await _objection_body(request, runtime)
        _may_object_for(caller, registry, runtime)
        await runtime.objections_add(caller, patient_number, registry)
        return Response(status_code=204)

    @app.post("/objections/$withdraw", status_code=204, openapi_extra=OBJECTION_BODY)
    async def withdraw_objection(request: Request) -> Response:
        caller = _provider_caller(runtime, request)
        patient_number, registry = await _objection_body(request, runtime)
        _may_object_for(caller, registry, runtime)
        if not await runtime.objections_withdraw(caller, patient_number, registry):
            # an objection for '*' is withdrawn as '*': said, so the EHR does not think the patient is back in
            text = "no objection is registered for this patient number and registry ('*' is its own entry)"
            raise FhirError.single(404, "not-found", text, "registry")
        return Response(status_code=204)


def _may_object_for(caller: Caller, registry: str, runtime: Runtime) -> None:
    """A client changes objections for the registries it may deliver to ('*': only one that may deliver to
    every registry): a re-probe's one-registry client withdrew another client's objection for another
    registry, and the patient's data went there."""
    scope = set(runtime.registries) if registry == "*" else {registry}
    if not scope <= caller.registries:
        text = "this client may not deliver to this registry, so it may not change its objections"
        raise FhirError.single(403, "forbidden", text, "registry")


def _provider_caller(runtime: Runtime, request: Request) -> Caller:
    """Objections belong to a provider's patients: the admin (no provider) may not record them."""
    caller = caller_of(runtime, request)
    if caller.provider is None:
        raise FhirError.single(403, "forbidden", "objections are recorded by a provider's own client")
    return caller


async def _objection_body(request: Request, runtime: Runtime) -> tuple[str, str]:
    check_content_type(request)
    # as strict as a Bundle: with a duplicate key the last value would win, while a client or middleware
    # that reads the first believes another patient objected (a probe); a BOM is taken alike
    data = parse_json(await read_limited(request, 10_000), max_bytes=10_000, max_depth=2, resource=False)
    unknown = sorted(set(data) - {"patientNumber", "registry"})
    if unknown:  # a name or a BSN sent beside the number must not look accepted (it is not kept)
        raise FhirError.single(400, "structure", "send patientNumber and registry only", "patientNumber")
    number, registry = data.get("patientNumber"), data.get("registry", "*")
    if number is None or (isinstance(number, str) and not number.strip()):
        raise FhirError.single(400, "required", "patientNumber is required", "patientNumber")
    if not isinstance(number, str) or not PATIENT_NUMBER.fullmatch(number.strip()):
        # as in the CSV import: an objection under anything else would never match the patient's number
        text = "patientNumber must be 1-64 letters, digits and .-/ (the provider's patient number), a string"
        raise FhirError.single(400, "value", text, "patientNumber")
    if not isinstance(registry, str):
        raise FhirError.single(400, "value", "registry must be a string", "registry")
    if registry != "*" and registry not in runtime.registries:
        # only known registries: the register must not keep (in clear) whatever text a client sends here
        raise FhirError.single(404, "not-found", "unknown registry ('*' means every registry)", "registry")
    return number.strip(), registry


def _admin_routes(app: FastAPI, runtime: Runtime) -> None:
    @app.get("/admin/deliveries")
    async def admin_deliveries(
        request: Request, status: str | None = None, registry: str | None = None, limit: int = 100
    ) -> Response:
        require_admin(caller_of(runtime, request))
        return await _listing(runtime, None, status, registry, limit)

    @app.post("/admin/deliveries/{delivery_id}/$requeue")
    async def admin_requeue(delivery_id: str, request: Request, force: bool = False) -> Response:
        require_admin(caller_of(runtime, request))
        requeue = functools.partial(runtime.store.requeue, provider=None, actor="admin", force=force)
        if not await _requeued(requeue, delivery_id):
            raise FhirError.single(404, "not-found", "no dead delivery with this id")
        return Response(orjson.dumps({"id": delivery_id, "status": "queued"}), media_type="application/json")

    @app.get("/admin/audit")
    async def audit(
        request: Request,
        registry: str | None = None,
        provider: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,  # an id the store can hold
        limit: int = 100,
    ) -> Response:
        """Oldest first; page on with `after` = the id of the last event received."""
        require_admin(caller_of(runtime, request))
        start, end = period(since, until)
        rows = await asyncio.to_thread(
            runtime.store.list_audit,
            registry=registry,
            provider=provider,
            since=start,
            until=end,
            after_id=after,
            limit=min(max(limit, 1), 10000),
        )
        events = [{**dataclasses.asdict(e), "at": iso_instant(e.at)} for e in rows]
        return Response(orjson.dumps(events, default=_plain), media_type="application/json")

    @app.get("/admin/processing-record/{registry}")
    async def processing_record(
        registry: str,
        request: Request,
        since: str | None = None,
        until: str | None = None,
        provider: str | None = None,
    ) -> Response:
        require_admin(caller_of(runtime, request))
        if registry not in runtime.registries:
            raise FhirError.single(404, "not-found", "unknown registry", "registry")
        if provider is not None and provider not in runtime.providers:
            raise FhirError.single(404, "not-found", "unknown provider", "provider")
        start, end = period(since, until)
        record = await asyncio.to_thread(runtime.store.processing_record, registry, start, end, provider)
        record |= runtime.processing_context(registry)
        record["reportingPeriod"] = {"since": since, "until": until}
        if provider is not None:  # each hospital is its own controller: its own record
            record["provider"] = provider
        return Response(orjson.dumps(record, default=_plain), media_type="application/json")


def period(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    """Both bounds; an `until` at or before `since` is a mistake (it used to answer an empty record)."""
    start, end = period_bound(since, "since"), period_bound(until, "until")
    if start is not None and end is not None and end <= start:
        raise FhirError.single(400, "value", "until must be after since (until is exclusive)", "until")
    return start, end


def period_bound(value: str | None, name: str) -> float | None:
    """A period bound as epoch seconds: `2026`, `2026-03`, `2026-03-01` (UTC midnight) or an ISO date-time
    with a time zone. `until` is exclusive, so `since=2026&until=2027` is the year 2026."""
    if value is None:
        return None
    text = value.strip()
    try:
        moment = datetime.fromisoformat({4: f"{text}-01-01", 7: f"{text}-01"}.get(len(text), text))
    except ValueError:
        moment = None
    if moment is None or (moment.tzinfo is None and "T" in text):
        text = "give a date (2026, 2026-03, 2026-03-01) or a date-time with a time zone"
        raise FhirError.single(400, "value", text, name) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _plain(value: Any) -> Any:
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)
