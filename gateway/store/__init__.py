"""The durable outbox, audit trail and opt-out register: `open_store(url)`.

    store = open_store("sqlite:////var/lib/gateway/outbox.db")          # or
    store = open_store("postgresql://gateway@db/gateway?pool_size=8")

SQLite URL options: busy_timeout (ms, default 5000), synchronous (full|normal|extra, default full),
pool_size. PostgreSQL: pool_size, plus anything libpq accepts (options=-csearch_path%3Dname, sslmode, ...).
The store methods are synchronous and thread-safe; use `AsyncStore(store)` from async code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.store.aio import AsyncStore
from gateway.store.dialects import postgres_dialect, sqlite_dialect
from gateway.store.model import (
    STATUSES,
    AuditEvent,
    AuditInput,
    Delivery,
    DeliveryStatus,
    StoreUnavailable,
    Superseded,
)
from gateway.store.sql import SqlStore

Store = SqlStore

__all__ = [
    "STATUSES",
    "AsyncStore",
    "AuditEvent",
    "AuditInput",
    "Delivery",
    "DeliveryStatus",
    "Store",
    "StoreUnavailable",
    "Superseded",
    "open_store",
]


def open_store(
    url: str,
    *,
    clock: Callable[[], float] = time.time,
    on_connect: Callable[[Any], None] | None = None,
    pool_timeout: float = 10.0,
) -> Store:
    """Open (and migrate) the store named by `url`.

    `on_connect` runs on every new driver connection (tests use it to simulate a full disk).
    Raises StoreUnavailable when the database cannot be reached.
    """
    if url.startswith("sqlite:"):
        dialect, pool_size = sqlite_dialect(url, on_connect)
    elif url.startswith(("postgresql:", "postgres:", "postgresql+psycopg:")):
        dialect, pool_size = postgres_dialect(url.replace("postgres://", "postgresql://", 1), on_connect)
    else:
        raise ValueError("store URL must start with sqlite:/// or postgresql://")
    return SqlStore(dialect, pool_size=pool_size, pool_timeout=pool_timeout, clock=clock)
