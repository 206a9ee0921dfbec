"""A small registry-side FHIR receiver for testers and registry holders.

    POST /  and  POST /Bundle     a transaction Bundle (application/fhir+json) → transaction-response
    GET  /deliveries              received bundles: id, time, entry and resource counts, times accepted
    GET  /_accepted               accepted bundles per Bundle.identifier (exactly-once checks)
    GET  /Bundle/{id}             a received bundle (by receipt id or Bundle.id)
    GET  /{Type}/{id}             a stored resource (current version)
    GET  /metadata                CapabilityStatement
    POST /_rekey                  translate stored Patient pseudonyms after a TTP key rotation
    POST|GET|DELETE /_faults      test fault injection (only with test_faults=True)

Every bundle goes through the injected leak scanner before anything is stored; a finding rejects the whole
bundle with 422. Error texts name where and what kind, never a value.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.outcome import FhirError, Issue, operation_outcome
from gateway.receiver.db import ReceiverDB
from gateway.receiver.faults import FaultPlan
from gateway.receiver.rekey import Translate, rekey
from gateway.receiver.transaction import apply_transaction

FHIR_JSON = "application/fhir+json"
MAX_BODY = 64 * 1024 * 1024
log = logging.getLogger("gateway.receiver")

Scan = Callable[[dict[str, Any]], list[Any]]


def _fhir(
    body: dict[str, Any] | list[Any] | bytes,
    status: int = 200,
    headers: dict[str, str] | None = None,
    media_type: str = FHIR_JSON,
) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status_code=status, media_type=media_type, headers=headers)


def finding_issues(findings: list[Any]) -> list[Issue]:
    """Turn scanner findings into issues using only their location and rule name (never a matched value)."""
    issues = []
    for f in findings[:100]:
        get = f.get if isinstance(f, dict) else lambda k, f=f: getattr(f, k, None)
        where = next((str(get(k)) for k in ("path", "expression", "location") if get(k)), None)
        kind = next(
            (str(get(k)) for k in ("kind", "rule", "code", "category") if get(k)), "identifying content"
        )
        issues.append(Issue("security", f"leak scan: {kind[:80]}", (where[:300],) if where else ()))
    return issues


def create_receiver_app(
    data: str | Path,
    scan: Scan | None = None,
    *,
    translate: Translate | None = None,
    test_faults: bool = False,
    token: str | None = None,
    max_body: int = MAX_BODY,
) -> FastAPI:
    """`data`: a directory (receiver.sqlite inside) or a .sqlite file. `scan(bundle) -> findings` is the
    leak scanner (e.g. gateway.deid.leakscan.scan). `translate` serves POST /_rekey. `token`, if set, is the
    bearer token the gateway must send, and that every read but GET /metadata needs (a registry's data)."""
    db = ReceiverDB(data)
    faults = FaultPlan()
    # no 307 to `path/` built from the Host header (as the gateway: a re-probe found it here too)
    app = FastAPI(
        title="FHIR registry receiver",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.db = db
    app.state.faults = faults

    @app.exception_handler(FhirError)
    async def fhir_error(_: Request, exc: FhirError) -> Response:
        return _fhir(exc.outcome(), exc.status, exc.headers)

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise FhirError.single(
                401, "login", "bearer token missing or wrong", headers={"WWW-Authenticate": "Bearer"}
            )

    async def receive(request: Request) -> Response:
        check_token(request)
        if test_faults:
            fault = faults.take()
            if fault is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    raise fault.error()
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in (FHIR_JSON, "application/json"):
            raise FhirError.single(415, "not-supported", "send application/fhir+json")
        raw = await request.body()
        if len(raw) > max_body:
            raise FhirError.single(413, "too-costly", "bundle too large")
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise FhirError.single(400, "structure", "body is not valid JSON") from None
        # one hop to a worker thread for both: each hop costs some 70 µs of CPU
        return _fhir(await asyncio.to_thread(scan_and_apply, bundle, raw))

    def scan_and_apply(bundle: Any, raw: bytes) -> bytes:
        if scan is not None and isinstance(bundle, dict):
            try:
                findings = scan(bundle)
            except Exception as exc:  # a scanner crash must not let a bundle through: refuse, sender retries
                log.error("leak scan failed (%s); bundle refused", type(exc).__name__)
                raise FhirError.single(500, "exception", "leak scan failed; nothing was stored") from None
            if findings:
                log.warning("bundle rejected by the leak scan: %d finding(s)", len(findings))
                raise FhirError(422, finding_issues(list(findings)))
        return apply_transaction(db, bundle, raw)

    app.add_api_route("/", receive, methods=["POST"], include_in_schema=False)
    app.add_api_route("/Bundle", receive, methods=["POST"], include_in_schema=False)

    @app.get("/")
    def root(request: Request) -> Response:
        check_token(request)
        return _fhir(
            {"receiver": "fhir-gateway registry receiver", "bundles": db.receipt_count()},
            media_type="application/json",
        )

    @app.get("/metadata")
    def metadata() -> Response:
        return _fhir(
            {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "kind": "instance",
                "fhirVersion": "4.0.1",
                "format": ["application/fhir+json"],
                "date": "2026-01-01",
                "rest": [{"mode": "server", "interaction": [{"code": "transaction"}]}],
            }
        )

    @app.get("/deliveries")
    def deliveries(request: Request, limit: int = 1000) -> Response:
        check_token(request)
        return _fhir(db.receipts(max(1, min(limit, 100_000))), media_type="application/json")

    @app.get("/_accepted")
    def accepted(request: Request) -> Response:
        check_token(request)
        return _fhir(db.accepted_counts(), media_type="application/json")

    @app.post("/_rekey")
    async def rekey_route(request: Request) -> Response:
        check_token(request)
        if translate is None:
            raise FhirError.single(501, "not-supported", "this receiver has no TTP translate configured")
        result = await asyncio.to_thread(rekey, db, translate)
        return _fhir(result.as_dict(), media_type="application/json")

    if test_faults:

        @app.post("/_faults")
        async def add_fault(request: Request) -> Response:
            try:
                spec = orjson.loads(await request.body())
            except orjson.JSONDecodeError:
                raise FhirError.single(400, "structure", "body is not valid JSON") from None
            for item in spec if isinstance(spec, list) else [spec]:
                if not isinstance(item, dict):
                    raise FhirError.single(400, "structure", "a fault is a JSON object")
                faults.add(item)
            return _fhir(faults.pending(), media_type="application/json")

        @app.get("/_faults")
        def list_faults() -> Response:
            return _fhir(faults.pending(), media_type="application/json")

        @app.delete("/_faults")
        def clear_faults() -> Response:
            faults.clear()
            return Response(status_code=204)

    @app.get("/Bundle/{bundle_id}")
    def get_bundle(bundle_id: str, request: Request) -> Response:
        check_token(request)
        body = db.bundle(bundle_id)
        if body is None:
            raise FhirError.single(404, "not-found", "no such bundle")
        return _fhir(body)

    @app.get("/{rtype}/{rid}")
    def get_resource(rtype: str, rid: str, request: Request) -> Response:
        check_token(request)
        body = db.resource(rtype, rid)
        if body is None:
            raise FhirError.single(404, "not-found", "no such resource")
        return _fhir(body)

    return app


__all__ = ["create_receiver_app", "finding_issues", "operation_outcome"]
