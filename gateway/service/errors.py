"""Every error leaves the service as a FHIR OperationOutcome; no exception text ever reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.outcome import FhirError, Issue, operation_outcome
from gateway.service.responses import fhir_response
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway.service")

_HTTP_CODES = {
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    413: "too-costly",
    415: "not-supported",
}


def install(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, exc: FhirError) -> Response:
        return fhir_response(exc.outcome(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        # names the parameter (location), never the value pydantic saw
        issues = [
            Issue("invalid", "request parameter is missing or invalid", (".".join(map(str, e["loc"])),))
            for e in exc.errors()
        ]
        return fhir_response(operation_outcome(issues), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "processing")
        text = "not found" if exc.status_code == 404 else "request not accepted"
        return fhir_response(operation_outcome([Issue(code, text)]), exc.status_code)

    @app.exception_handler(StoreUnavailable)
    async def _store(_: Request, exc: StoreUnavailable) -> Response:
        # a read or write the store could not do (it rolled back): say so and when to ask again, on every
        # route; a listing or status poll answered 500 "nothing was stored" (a probe, PostgreSQL restarted)
        log.warning("the store could not answer", extra={"exc_type": type(exc).__name__})
        text = "the gateway's store cannot be reached now; try again shortly"
        outcome = operation_outcome([Issue("transient", text)])
        return fhir_response(outcome, 503, headers={"Retry-After": "10"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return unexpected(exc)


def unexpected(exc: Exception) -> Response:
    """A 500 with a fixed text; the log line names the exception type only (its text may quote input)."""
    log.error("unexpected error", extra={"exc_type": type(exc).__name__})
    return fhir_response(operation_outcome([Issue("exception", "internal error; nothing was stored")]), 500)
