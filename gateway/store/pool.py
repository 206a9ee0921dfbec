"""A tiny thread-safe connection pool (psycopg_pool is not a project dependency; this is all we need).

Each connection is used by one thread at a time. A connection that saw a driver-level failure is closed
instead of returned, and the idle ones with it (after a server restart they are all dead), so a dead server
connection never gets handed out twice.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

C = TypeVar("C")


class PoolTimeout(Exception):
    pass


class Pool(Generic[C]):
    def __init__(self, connect: Callable[[], C], *, size: int, timeout: float) -> None:
        self._connect = connect
        self._idle: queue.LifoQueue[C] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._timeout = timeout
        self._closed = False

    @contextlib.contextmanager
    def connection(self, discard_on: tuple[type[BaseException], ...] = ()) -> Iterator[C]:
        if self._closed:
            raise PoolTimeout("pool closed")
        if not self._slots.acquire(timeout=self._timeout):
            raise PoolTimeout("no free connection")
        conn: C | None = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            yield conn
        except discard_on:
            _close(conn)
            conn = None
            # the server went away (a restart, a failover): the idle connections are dead too, and each
            # would fail one more request before it was closed (a probe saw 503s and 500s for minutes)
            self._close_idle()
            raise
        finally:
            if conn is not None:
                if self._closed:
                    _close(conn)
                else:
                    self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        while True:
            try:
                _close(self._idle.get_nowait())
            except queue.Empty:
                return


def _close(conn: Any) -> None:
    if conn is None:
        return
    with contextlib.suppress(Exception):
        conn.close()
