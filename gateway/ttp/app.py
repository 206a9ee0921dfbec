"""The reference NLPS1 TTP as a FastAPI app: ``create_app(keystore, auth) -> FastAPI``.

Operations follow the gPAS TTP-FHIR gateway's ``$pseudonymizeAllowCreate`` (a ``Parameters`` with one
``target`` — here the registry domain — and 1..n ``original`` valueString parts; the answer holds one
``pseudonym`` parameter per original with the parts ``original``, ``target`` and ``pseudonym``, each a
valueIdentifier). NLPS1 is stateless (the final pseudonym is a deterministic encryption), so "allow create" is
always true and ``allowCreate`` is accepted and ignored. Extensions of the gPAS shape:

- every answer part carries ``index`` (valueInteger, the position of the original in the request), so clients
  need not match on the echoed value;
- a value that cannot be processed yields an ``error`` parameter (parts ``index``, ``target``, ``code``
  valueCode from ``gateway.ttp.service.ERROR_CODES``) instead of failing the batch; the value is not echoed;
- the sealed variant: instead of the ``original`` parts the request carries ``requestId``, ``timestamp``,
  ``keyId``, ``enc`` and ``sealed`` (HPKE, see ``gateway.ttp.envelope``) and the answer is sealed to the
  caller's one-time response key; inside both envelopes the batch is compact JSON (``{"original": [...]}``
  in, ``{"target", "pseudonym"|"pre": [value|null, ...], "error": [[index, code], ...]}`` out).
  ``create_app(..., allow_plain=False)`` refuses unsealed batches.

Endpoints:

    GET  /metadata                       CapabilityStatement (no authentication: it is a liveness probe too)
    GET  /.well-known/nlps1-public-key   the HPKE public key as a JWK Set (kid = keyId of the envelope)
    POST /$pseudonymize                  provider: ``<TYPE>:<srcVersion>:<base64url pre>`` → ``v<n>.<final>``
    POST /$translate                     registry holder: ``<TYPE>:<v<n> value>`` → current version
    POST /$de-pseudonymize               provider: ``MRN:<v<n> value>`` → its own inner layer (``pre`` part)
    POST /$rotate                        admin: ``target`` → a new current version (``version`` part)

Limits: ``max_values`` values per request (default 100,000: 10,000 patients with 10 types each) and
``max_body`` bytes (default 32 MiB); beyond them 413. Every error is an OperationOutcome with a fixed text:
no value, key or pre-pseudonym is ever echoed in an error or written to a log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from gateway.outcome import FhirError, Issue, operation_outcome
from gateway.ttp import envelope, service
from gateway.ttp.auth import Caller, CallersUnreadable, TTPAuth
from gateway.ttp.keystore import KeyStore, KeyStoreError

FHIR_JSON = "application/fhir+json"
ORIGINAL_SYSTEM = "urn:nlps1:pre-pseudonym"
DOMAIN_SYSTEM = "urn:nlps1:domain"
PSEUDONYM_SYSTEM = "urn:nlps1:pseudonym"
OPERATIONS = ("pseudonymize", "translate", "de-pseudonymize", "rotate")
# Batches above this many values run in a worker thread so /metadata and small batches stay responsive.
THREAD_THRESHOLD = 2_000
_ALLOWED_PARAMS = frozenset({"target", "original", "allowCreate", "requestId", "timestamp", "keyId", "enc",
                             "sealed"})

log = logging.getLogger("gateway.ttp")


def _fhir(body: bytes | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status_code=status, media_type=FHIR_JSON, headers=headers)


async def _read_body(request: Request, max_body: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise FhirError.single(413, "too-costly", "request body too large")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted while streaming: chunked uploads cannot bypass the limit
        size += len(chunk)
        if size > max_body:
            raise FhirError.single(413, "too-costly", "request body too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_parameters(body: bytes) -> dict[str, Any]:
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FhirError.single(400, "structure", "body is not JSON") from None
    if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
        raise FhirError.single(400, "structure", "body must be a Parameters resource", "Parameters")
    if not isinstance(params.get("parameter"), list):
        raise FhirError.single(400, "required", "Parameters.parameter is required", "Parameters.parameter")
    return params


def _target(params: dict[str, Any]) -> str:
    targets = [p.get("valueString") for p in params["parameter"]
               if isinstance(p, dict) and p.get("name") == "target"]
    if len(targets) != 1 or not isinstance(targets[0], str) or not targets[0]:
        raise FhirError.single(400, "required", "exactly one target (valueString) is required",
                               "Parameters.parameter.where(name='target')")
    return targets[0]


def _originals(params: dict[str, Any]) -> list[Any]:
    originals = []
    for i, p in enumerate(params["parameter"]):
        if not isinstance(p, dict) or p.get("name") not in _ALLOWED_PARAMS:
            raise FhirError.single(400, "not-supported", "unknown parameter", f"Parameters.parameter[{i}]")
        if p["name"] == "original":
            originals.append(p.get("valueString"))  # a missing/odd value becomes a per-value error
    return originals


def _capability_statement() -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement", "status": "active", "kind": "instance", "date": "2026-11-24",
        "fhirVersion": "4.0.1", "format": ["json"],
        "software": {"name": "NLPS1 reference TTP (fhir-delivery-gateway)"},
        "implementation": {"description": "NLPS1 TTP: final pseudonyms, rotation, MRN reversal; no tables"},
        "rest": [{"mode": "server", "security": {"description": "Bearer API key or mTLS via a trusted proxy"},
                  "operation": [{"name": op, "definition": f"urn:nlps1:OperationDefinition/{op}"}
                                for op in OPERATIONS]}],
    }


def _answer(name: str, value_part: str, registry: str, originals: Sequence[Any],
            results: Sequence[service.Result], *, echo: bool) -> bytes:
    """The answer Parameters as JSON text, written from templates: the hot path for 100,000 values.

    Templates instead of dicts + orjson because 9 small dicts per value cost more than the encryption. Safe
    without escaping: pseudonyms and codes are our own base64url/words, and an original is echoed only when
    it matched the service's patterns, which admit no character that JSON would escape.
    """
    target = orjson.dumps({"name": "target", "valueIdentifier": {"system": DOMAIN_SYSTEM, "value": registry}})
    tgt = target.decode("utf-8")
    system = ORIGINAL_SYSTEM if value_part == "pre" else PSEUDONYM_SYSTEM
    ok_head = '{"name":"' + name + '","part":[{"name":"index","valueInteger":'
    orig_head = '},{"name":"original","valueIdentifier":{"system":"' + ORIGINAL_SYSTEM + '","value":"'
    val_head = ',{"name":"' + value_part + '","valueIdentifier":{"system":"' + system + '","value":"'
    err_head = '{"name":"error","part":[{"name":"index","valueInteger":'
    pieces: list[str] = []
    add = pieces.append
    for i, (value, code) in enumerate(results):
        if value is None:
            add(f'{err_head}{i}}},{tgt},{{"name":"code","valueCode":"{code}"}}]}}')
        elif echo:
            add(f'{ok_head}{i}{orig_head}{originals[i]}"}}}},{tgt}{val_head}{value}"}}}}]}}')
        else:
            add(f'{ok_head}{i}}},{tgt}{val_head}{value}"}}}}]}}')
    return ('{"resourceType":"Parameters","parameter":[' + ",".join(pieces) + "]}").encode("utf-8")


def _compact_answer(value_part: str, registry: str, results: Sequence[service.Result]) -> bytes:
    """The sealed variant's inner answer, as compact as its request: values by position, errors apart.

    ``{"target": registry, "<pseudonym|pre>": [value or null, ...], "error": [[index, code], ...]}``: one
    list instead of ~10 JSON objects per value halves the client's CPU per value (parsing, freeing).
    """
    values = [value for value, _ in results]
    errors = [[i, code] for i, (value, code) in enumerate(results) if value is None]
    return orjson.dumps({"target": registry, value_part: values, "error": errors})


def create_app(keystore: KeyStore, auth: TTPAuth, *, allow_plain: bool = True, max_values: int = 100_000,
               max_body: int = 32 * 1024 * 1024, replay_guard: envelope.ReplayGuard | None = None) -> FastAPI:
    app = FastAPI(title="NLPS1 TTP", docs_url=None, redoc_url=None, openapi_url=None)
    guard = replay_guard or envelope.ReplayGuard()

    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, exc: FhirError) -> Response:
        return _fhir(exc.outcome(), exc.status, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnect):  # the caller went away mid-request (e.g. a killed gateway)
            log.info("caller disconnected before the request was read")
            return _fhir(operation_outcome([Issue("incomplete", "request not received whole")]), 400)
        # Log the exception type only: messages and tracebacks may carry locals from a batch.
        log.error("TTP internal error: %s", type(exc).__name__)
        return _fhir(operation_outcome([Issue("exception", "internal error")]), 500)

    def _authenticate(request: Request) -> Caller:
        peer = request.client.host if request.client else None
        try:
            caller = auth.authenticate(request.headers, peer)
        except CallersUnreadable:
            log.error("the callers file cannot be read: every caller is refused until it can")
            raise FhirError.single(503, "transient", "the TTP cannot read its callers now; try again later",
                                   headers={"Retry-After": "30"}) from None
        if caller is None:
            raise FhirError.single(401, "login", "authentication required",
                                   headers={"WWW-Authenticate": "Bearer"})
        return caller

    def _forbidden() -> FhirError:
        return FhirError.single(403, "forbidden", "caller not authorised for this operation or target")

    async def _batch(request: Request, operation: str, allowed: Callable[[Caller, str], bool],
                     run: Callable[[Caller, str, list[Any]], list[service.Result]], name: str,
                     value_part: str, echo: bool) -> Response:
        caller = _authenticate(request)
        raw = await _read_body(request, max_body)
        # ~50 bytes per value on the wire: estimate the batch size before parsing it
        with service.paused_gc(len(raw) // 50):
            return await _run_batch(caller, raw, operation, allowed, run, name, value_part, echo)

    async def _run_batch(caller: Caller, raw: bytes, operation: str, allowed: Callable[[Caller, str], bool],
                         run: Callable[[Caller, str, list[Any]], list[service.Result]], name: str,
                         value_part: str, echo: bool) -> Response:
        params = _parse_parameters(raw)
        registry = _target(params)
        try:
            keystore.reload_if_changed()
        except (KeyStoreError, OSError):
            log.error("TTP keyring reload failed; the previous keyring stays in force")
        if not allowed(caller, registry):
            raise _forbidden()
        if keystore.versions(registry) is None:
            raise FhirError.single(404, "not-found", "unknown target domain",
                                   "Parameters.parameter.where(name='target')")
        opened = None
        if envelope.is_sealed(params):
            try:
                opened = envelope.open_request(params, keystore.hpke_private, keystore.key_id, operation,
                                               registry, guard)
            except envelope.EnvelopeError as exc:
                raise FhirError.single(exc.status, exc.code, exc.diagnostics) from None
            originals = opened.originals
        elif not allow_plain:
            raise FhirError.single(400, "security", "this TTP accepts sealed (HPKE) batches only")
        else:
            originals = _originals(params)
        if len(originals) > max_values:
            raise FhirError.single(413, "too-costly", f"at most {max_values} values per request")
        started = time.perf_counter()

        def work() -> bytes:
            results = run(caller, registry, originals)
            if opened is not None:
                return _compact_answer(value_part, registry, results)
            return _answer(name, value_part, registry, originals, results, echo=echo)

        body = await anyio.to_thread.run_sync(work) if len(originals) > THREAD_THRESHOLD else work()
        # Counts and timings only: never values.
        log.info("%s by %s: %d values in %.1f ms", operation, caller.name, len(originals),
                 (time.perf_counter() - started) * 1000)
        if opened is not None:
            body = envelope.seal_response(body, opened)
        return _fhir(body)

    @app.get("/metadata")
    async def metadata() -> Response:
        return _fhir(_capability_statement())

    @app.get("/.well-known/nlps1-public-key")
    async def public_key() -> Response:
        jwks = orjson.dumps({"keys": [keystore.public_jwk()]})
        return Response(jwks, media_type="application/jwk-set+json")

    @app.post("/$pseudonymize")
    async def pseudonymize(request: Request) -> Response:
        return await _batch(request, "pseudonymize", Caller.may_pseudonymise,
                            lambda c, r, o: service.pseudonymise(keystore, r, c.provider, o),
                            "pseudonym", "pseudonym", echo=True)

    @app.post("/$translate")
    async def translate(request: Request) -> Response:
        return await _batch(request, "translate", Caller.may_translate,
                            lambda c, r, o: service.translate(keystore, r, o),
                            "pseudonym", "pseudonym", echo=True)

    @app.post("/$de-pseudonymize")
    async def depseudonymize(request: Request) -> Response:
        # Any provider may ask; the MRN layer opens only under the provider id it was bound to at creation.
        return await _batch(request, "de-pseudonymize", lambda c, r: c.role == "provider",
                            lambda c, r, o: service.depseudonymise(keystore, r, c.provider or "", o),
                            "original", "pre", echo=False)

    @app.post("/$rotate")
    async def rotate(request: Request) -> Response:
        caller = _authenticate(request)
        if caller.role != "admin":
            raise _forbidden()
        registry = _target(_parse_parameters(await _read_body(request, 64 * 1024)))
        try:
            keystore.reload_if_changed()  # rotate from the newest keyring, never from a stale copy
        except (KeyStoreError, OSError):
            log.error("TTP keyring unreadable; rotation refused")
            raise FhirError.single(503, "transient", "keyring unavailable; rotation refused") from None
        if keystore.versions(registry) is None:
            raise FhirError.single(404, "not-found", "unknown target domain")
        try:
            version = keystore.rotate(registry)
        except (KeyStoreError, OSError):
            log.error("TTP keyring write failed; rotation refused")
            raise FhirError.single(503, "transient", "keyring not writable; rotation refused") from None
        log.info("rotate by %s: %s now at version %d", caller.name, registry, version)
        return _fhir({"resourceType": "Parameters", "parameter": [
            {"name": "target", "valueString": registry}, {"name": "version", "valueInteger": version}]})

    return app
