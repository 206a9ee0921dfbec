"""Start real ASGI apps under uvicorn on 127.0.0.1 for tests (no mocks: real HTTP over loopback)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx

from gateway.serving import free_port, serve_in_thread

__all__ = ["free_port", "serve", "wait_http"]


@contextlib.contextmanager
def serve(app, *, probe: str = "/", ready_timeout: float = 15.0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread; yield its base URL; stop it afterwards."""
    with serve_in_thread(app, ready_timeout=ready_timeout) as base:
        yield base


def wait_http(url: str, timeout: float = 15.0) -> None:
    """Wait until a URL answers (any status), for servers started as subprocesses."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
