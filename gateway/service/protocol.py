"""uvicorn's HTTP protocol with a deadline for each request's headers.

uvicorn closes an idle connection only after a response (its keep-alive timeout): a connection that never
sends a request, or stops half-way through its headers, stays open for good. A probe held 20,000 of them
without logging in, and the gateway ran out of file descriptors and answered nobody (slowloris). Here every
request's headers must arrive within `header_timeout` seconds of the connection, or of the request's first
byte on a kept-alive connection; the body has its own limits (gateway/service/body.py), and a request
answered before its body was all read has the same deadline for the rest of it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

HEADER_TIMEOUT_SECONDS = 15.0
# What uvicorn refuses before the gateway sees it (a malformed request line or header) is answered as every
# other refusal, not with uvicorn's text line: an EHR's FHIR client reads an OperationOutcome.
_NOT_HTTP = orjson.dumps(
    {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "structure",
                "diagnostics": "not a readable HTTP request (its request line or a header is malformed)",
            }
        ],
    }
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float = HEADER_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # Answered before its body was all there (a GET with a body, a post refused for its credentials):
        # what is left of the body would go on arriving, each byte putting off uvicorn's keep-alive timeout,
        # with no request's headers to time (a re-probe held connections so, for good). The deadline runs
        # again: the rest of the body and the next request's headers must come within it. Not closed at once:
        # unread bytes would make that a reset, which may lose the answer before the client reads it.
        unread = self.cycle is not None and self.cycle.more_body
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            self._arm()

    def send_400_response(self, msg: str) -> None:
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/fhir+json\r\n",
            b"content-length: %d\r\n" % len(_NOT_HTTP),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + _NOT_HTTP)
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


@functools.cache
def with_header_timeout(seconds: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to pass as uvicorn's `http=` for this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": seconds})
