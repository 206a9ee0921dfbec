"""Reading a request body safely: content type, declared and actual size, before anything is parsed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request

from gateway.outcome import FhirError

FHIR_JSON = "application/fhir+json"
ACCEPTED_TYPES = {FHIR_JSON, "application/json"}
R4_VERSIONS = {"4.0", "4.0.0", "4.0.1"}
NDJSON_TYPES = {"application/fhir+ndjson", "application/ndjson", "application/x-ndjson"}
# A client that sends nothing of its body for this long, or not all of a Bundle in the second bound, is
# refused (408): a stalled body holds one of the gateway's intake slots (`in_flight`) while it lasts.
BODY_IDLE_SECONDS = 15.0
BODY_TOTAL_SECONDS = 120.0


def check_content_encoding(request: Request) -> None:
    """Bodies are read as sent: a compressed one would be read as bytes of JSON (a gzip body was refused as
    "UTF-16" and a gzip upload became a job of malformed lines)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FhirError.single(415, "not-supported", "Content-Encoding is not supported: send it as is")


def check_content_type(request: Request, accepted: set[str] = ACCEPTED_TYPES) -> None:
    check_content_encoding(request)
    raw = request.headers.get("content-type", "")
    media, _, params = raw.partition(";")
    if media.strip().lower() not in accepted:
        raise FhirError.single(
            415, "not-supported", f"content type must be one of {', '.join(sorted(accepted))}"
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "charset" and value.lower() not in ("utf-8", "utf8"):
            raise FhirError.single(415, "not-supported", "FHIR JSON must be UTF-8")
        # FHIR's mime-type parameter: a body declared as STU3 or R5 would otherwise be read as R4
        if name == "fhirversion" and value not in R4_VERSIONS:
            raise FhirError.single(415, "not-supported", "only FHIR R4 is accepted (fhirVersion=4.0)")


def check_accept(request: Request) -> None:
    """406 when the client accepts no JSON answer (an `Accept: application/fhir+xml` got JSON with 200)."""
    raw = ",".join(request.headers.getlist("accept"))
    if not raw.strip():
        return
    for media_range in raw.split(","):
        media, *params = (part.strip().lower() for part in media_range.split(";"))
        if any(_quality(p) == 0 for p in params):
            continue
        kind, _, subtype = media.partition("/")
        if media == "*/*" or (kind in ("application", "*") and (subtype == "*" or "json" in subtype)):
            return
    raise FhirError.single(
        406, "not-supported", "answers are FHIR JSON: accept application/fhir+json or application/json"
    )


def _quality(param: str) -> float | None:
    """An Accept parameter's q value (RFC 9110: "0", "0.", "0.000" are all zero), None for another one."""
    name, _, value = param.replace(" ", "").partition("=")
    if name != "q":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def single_header(request: Request, name: str) -> str | None:
    """A header that may be given once, with a value: twice is refused, not read as the first (or the last),
    and so is an empty one (an EHR's template that lost its key would have its posts keyed by content)."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise FhirError.single(400, "structure", f"the {name} header is given more than once")
    if values and not values[0].strip():
        raise FhirError.single(400, "structure", f"the {name} header is empty")
    return values[0] if values else None


def prefers(request: Request, preference: str) -> bool:
    """Whether a `Prefer` header names `preference` (RFC 7240: comma-separated, each with parameters)."""
    for value in request.headers.getlist("prefer"):
        for item in value.split(","):
            if item.split(";", 1)[0].split("=", 1)[0].strip().lower() == preference:
                return True
    return False


async def read_limited(
    request: Request, max_bytes: int, *, idle: float = BODY_IDLE_SECONDS, total: float = BODY_TOTAL_SECONDS
) -> bytes:
    """The whole body, refusing (413) before reading past the limit, and (408) a body that stalls."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise FhirError.single(400, "structure", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(request, idle=idle, total=total):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def body_chunks(
    request: Request, *, idle: float = BODY_IDLE_SECONDS, total: float | None = None
) -> AsyncIterator[bytes]:
    """The body as it arrives; 408 when nothing arrives for `idle` seconds or it is not all there after
    `total` seconds (None: no bound, a bulk upload of many GB)."""
    chunks = request.stream().__aiter__()
    deadline = None if total is None else time.monotonic() + total
    while True:
        wait = idle if deadline is None else min(idle, deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0)):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise FhirError.single(408, "timeout", "the request body did not arrive in time") from None
        yield chunk


def _too_large(max_bytes: int) -> FhirError:
    return FhirError.single(413, "too-costly", f"body larger than the limit of {max_bytes} bytes")
