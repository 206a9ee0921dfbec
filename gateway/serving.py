"""Run ASGI apps under uvicorn in a background thread on 127.0.0.1 (the demo, tests and benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from gateway.service.protocol import HEADER_TIMEOUT_SECONDS, with_header_timeout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(
    app,
    *,
    port: int | None = None,
    ready_timeout: float = 20.0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread; yield its base URL (https with a certificate); shut it
    down gracefully afterwards."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        log_config=None,
        proxy_headers=False,  # trust is decided on the peer address, never on X-Forwarded-For
        http=with_header_timeout(HEADER_TIMEOUT_SECONDS),
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if ssl_certfile else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
