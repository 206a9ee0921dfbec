"""Structured JSON logs with the request id on every line.

Log calls pass fixed messages and counts only (never bundle content); `extra` fields are copied as they are,
so callers must not put patient values there either — the end-to-end privacy test scans every line.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# color_message: uvicorn's copy of msg with terminal colour codes
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_TRACEBACK = "Traceback (most recent call last)"


def _one_line(message: str) -> str:
    """A traceback handed over as a message (uvicorn's 'startup failed' passes the ASGI app's) becomes its
    last line, the exception: one line for the operator, as every other start-up failure."""
    if message.startswith(_TRACEBACK):
        lines = [line for line in message.splitlines() if line.strip()]
        return lines[-1].strip() if lines else message
    return message


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": _one_line(record.getMessage()),
            "request_id": request_id.get(),
        }
        line |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info and record.exc_info[0] is not None:
            # the type only: exception texts can quote input values
            line["exc_type"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn.access",):  # access lines carry query strings; our middleware logs requests instead
        logging.getLogger(name).disabled = True
    # httpx logs every outgoing URL at INFO; an EHR Consent search URL names the patient
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
