"""What differs between SQLite and PostgreSQL: connecting, transactions, errors and the claim statement.

SQL elsewhere is written once with `?` placeholders; the PostgreSQL dialect rewrites them to `%s`
(so no SQL text in this package may contain a literal `?` or `%`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

from gateway.store.pool import PoolTimeout

# Claimable: queued and due, or delivering with an expired lease (its worker died). Per-patient order: a
# delivery waits while an older one of the same registry that carries one of its patients (any of them:
# `delivery_patients`, not only the first) is still queued or in flight
# (including one waiting for its retry), so a registry never sees a patient's bundles out of order, and it
# waits while any other one of them is in flight under a live lease (an older dead one requeued by an
# operator must not go out next to a newer one still on the wire). Dead deliveries do not block (else one
# rejected bundle would stall a patient forever).
CLAIMABLE = """
    ((d.status = 'queued' AND d.next_attempt_at <= ?)
      OR (d.status = 'delivering' AND d.lease_expires_at <= ?))
    {registry_filter}
    AND NOT EXISTS (
        SELECT 1 FROM delivery_patients mine
        JOIN delivery_patients other
          ON other.registry = mine.registry AND other.patient_key = mine.patient_key AND other.seq <> mine.seq
        JOIN deliveries e ON e.seq = other.seq
        WHERE mine.seq = d.seq
          AND e.status IN ('queued', 'delivering')
          AND (e.seq < d.seq OR (e.status = 'delivering' AND e.lease_expires_at > ?)))
"""


# A bulk job's deliveries (idempotency keys `bulk|<job>|...`; a posted Bundle's key is a keyed hash) are
# claimed after the posted ones: a yearly delivery of thousands of Bundles in the outbox must not hold an
# EHR's live posts back until it has drained. Per-patient order still holds (CLAIMABLE): a patient's post
# waits for that patient's earlier bulk Bundle.
BULK_KEY = "substr({table}.idempotency_key, 1, 5) = 'bulk|'"
IS_KIND = {"posted": f"NOT ({BULK_KEY})", "bulk": BULK_KEY}  # each the predicate of an index (schema v7)
KINDS = {kind: "AND " + predicate.format(table="d") for kind, predicate in IS_KIND.items()}


def _claimable(now: float, registries: list[str] | None, kind: str) -> tuple[str, list[Any]]:
    if registries is None:
        return CLAIMABLE.format(registry_filter=KINDS[kind]), [now, now, now]
    marks = ", ".join("?" for _ in registries) or "NULL"
    where = CLAIMABLE.format(registry_filter=f"AND d.registry IN ({marks}) {KINDS[kind]}")
    return where, [now, now, *registries, now]


# The claim reads the head of the queue first: the `window` oldest pending deliveries of the kind, walked
# in `seq` order on the kind's partial index (schema v7), so that a claim costs the same with a backlog of a
# hundred thousand as with ten. Only when the head is full and holds fewer claimable ones than asked
# (retries waiting at the front, a patient's later Bundles behind its first) does the claim read every due
# delivery, as it always did (`window=None`). Both engines use a partial index only for a query that
# states the index's own predicate, so the head spells it out.
_HEAD = """SELECT w.seq FROM deliveries w {hint}
           WHERE w.status IN ('queued', 'delivering') AND {kind}
           ORDER BY w.seq LIMIT ?"""


@dataclass
class Dialect:
    name: str
    connect: Callable[[], Any]
    ddl: dict[str, str]
    unavailable: tuple[type[BaseException], ...]
    integrity: tuple[type[BaseException], ...]

    def sql(self, text: str) -> str:
        return text

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        raise NotImplementedError

    def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        registries: list[str] | None,
        limit: int,
        returning: str,
        kind: str,
        window: int | None,
    ) -> tuple[str, list[Any]]:
        """The claim statement and its parameters (their order differs between the two statements);
        `window`: look only at that many of the oldest pending deliveries (None: at every due one)."""
        raise NotImplementedError

    def queue_head(self, kind: str, window: int) -> tuple[str, list[Any]]:
        """The `window` oldest pending deliveries of a kind, of every registry (with a registry's term
        SQLite takes the per-patient index and sorts the whole queue): SQL and params."""
        predicate = IS_KIND[kind].format(table="w")
        return _HEAD.format(hint=self.head_index_hint(kind), kind=predicate), [window]

    def head_index_hint(self, kind: str) -> str:
        return ""

    def claim_source(self, kind: str, window: int | None) -> tuple[str, str, list[Any]]:
        """FROM clause, the join condition that starts the WHERE, and the FROM clause's parameters."""
        if window is None:
            return "deliveries d", "", []
        head, params = self.queue_head(kind, window)
        return f"({head}) AS head CROSS JOIN deliveries d", "d.seq = head.seq AND ", params

    def lock_migrations(self, conn: Any) -> None:
        """Serialise concurrent migrators (several worker processes starting at once)."""

    def lock_claims(self, conn: Any) -> None:
        """Serialise claims (SQLite: BEGIN IMMEDIATE already does)."""


@dataclass
class SqliteDialect(Dialect):
    busy_seconds: float = 5.0
    # One writer at a time within this process, queued on a Python lock: SQLite's own busy handler makes a
    # waiting connection *sleep* (1, 2, 5 ... 100 ms steps) instead of waking when the lock frees, which
    # under concurrent requests turned sub-millisecond commits into tens of milliseconds of idle latency.
    # Other processes on the same file still meet SQLite's lock and busy_timeout.
    writer: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        if not self.writer.acquire(timeout=self.busy_seconds):
            raise sqlite3.OperationalError("database is locked (in-process writer queue)")
        try:
            # BEGIN IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a read-then-write
            # transaction can never fail half-way with SQLITE_BUSY on lock upgrade.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self.writer.release()

    def head_index_hint(self, kind: str) -> str:
        # Without ANALYZE statistics SQLite prefers the status index and sorts every pending delivery. The
        # hint also makes a head query that no longer states the index's predicate fail instead of crawl.
        return f"INDEXED BY deliveries_pending_{kind}"

    def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        registries: list[str] | None,
        limit: int,
        returning: str,
        kind: str,
        window: int | None,
    ) -> tuple[str, list[Any]]:
        where, where_params = _claimable(now, registries, kind)
        source, join, source_params = self.claim_source(kind, window)
        # One UPDATE ... RETURNING inside BEGIN IMMEDIATE: the write lock makes the claim atomic across
        # processes sharing the file.
        sql = f"""UPDATE deliveries SET status = 'delivering', lease_owner = ?, lease_expires_at = ?,
                       attempts = attempts + 1, updated_at = ?
                   WHERE seq IN (SELECT d.seq FROM {source}
                                 WHERE {join}{where}
                                 ORDER BY d.seq LIMIT ?)
                   RETURNING {returning}"""
        return sql, [owner, lease_until, now, *source_params, *where_params, limit]


# Advisory locks belong to the database: keyed by the schema as well, gateways in other schemas of it (another
# hospital's, a test's) do not wait on each other's claims and migrations (a chaos probe read it so).
_THIS_SCHEMA = "hashtext(current_schema())"


class PostgresDialect(Dialect):
    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            yield conn

    def claim(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        registries: list[str] | None,
        limit: int,
        returning: str,
        kind: str,
        window: int | None,
    ) -> tuple[str, list[Any]]:
        where, where_params = _claimable(now, registries, kind)
        source, join, source_params = self.claim_source(kind, window)
        returning = ", ".join(f"deliveries.{c.strip()}" for c in returning.split(","))  # c.seq is ambiguous
        # SKIP LOCKED lets concurrent workers take disjoint batches without waiting on each other. Rows
        # another worker has just claimed are re-checked after the lock (READ COMMITTED re-evaluation), so
        # they drop out instead of being claimed twice.
        claim = f"""WITH c AS (SELECT d.seq FROM {source}
                               WHERE {join}{where}
                               ORDER BY d.seq LIMIT ? FOR UPDATE OF d SKIP LOCKED)
                    UPDATE deliveries SET status = 'delivering', lease_owner = ?, lease_expires_at = ?,
                        attempts = deliveries.attempts + 1, updated_at = ?
                    FROM c WHERE deliveries.seq = c.seq
                    RETURNING {returning}"""
        return self.sql(claim), [*source_params, *where_params, limit, owner, lease_until, now]

    def lock_migrations(self, conn: Any) -> None:
        conn.execute(f"SELECT pg_advisory_xact_lock(7310451, {_THIS_SCHEMA})")

    def lock_claims(self, conn: Any) -> None:
        # Claims are short; taking them one at a time (in their own statement, so the claim's READ COMMITTED
        # snapshot already sees the previous claim) makes the per-patient rule hold even when an operator
        # requeues an older delivery at the moment two workers claim. SKIP LOCKED still keeps a claim from
        # waiting on rows that mark_* calls are updating.
        conn.execute(f"SELECT pg_advisory_xact_lock(7310452, {_THIS_SCHEMA})")


def sqlite_path(url: str) -> str:
    """The file of a sqlite:/// URL (relative to the current folder unless it begins with a fourth /)."""
    if not url.startswith("sqlite:///"):
        raise ValueError("sqlite URL must look like sqlite:///relative.db or sqlite:////abs/path.db")
    path = url[len("sqlite:///") :].partition("?")[0]
    if not path:
        raise ValueError("sqlite URL needs a file path")
    return path


def sqlite_dialect(url: str, on_connect: Callable[[Any], None] | None) -> tuple[Dialect, int]:
    path = sqlite_path(url)
    qs = url.partition("?")[2]
    query = {k: v[-1] for k, v in parse_qs(qs).items()}
    busy_ms = int(query.get("busy_timeout", "5000"))
    # FULL: the gateway acknowledges a bundle to the EHR only after the commit, and the EHR may then discard
    # it. With WAL, NORMAL is safe against a crash of our process but can lose the last commits on power
    # loss or an OS crash; FULL fsyncs the WAL on every commit, which costs little at delivery rates.
    synchronous = query.get("synchronous", "full").upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError("sqlite synchronous must be full, normal or extra")
    pool_size = int(query.get("pool_size", "8"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    create_private(path)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if on_connect:
            on_connect(conn)
        return conn

    ddl = {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "ts": "REAL"}
    dialect = SqliteDialect(
        "sqlite",
        connect,
        ddl,
        unavailable=(sqlite3.OperationalError, sqlite3.InterfaceError, PoolTimeout),
        integrity=(sqlite3.IntegrityError,),
        busy_seconds=busy_ms / 1000,
    )
    return dialect, pool_size


def postgres_dialect(url: str, on_connect: Callable[[Any], None] | None) -> tuple[Dialect, int]:
    import psycopg  # imported here so a SQLite-only deployment never needs libpq

    parts = urlsplit(url.replace("postgresql+psycopg://", "postgresql://", 1))
    query = parse_qsl(parts.query)
    pool_size = int(dict(query).get("pool_size", "8"))
    # Everything but our own pool_size goes to libpq (options=-csearch_path=..., sslmode, connect_timeout...).
    rest = [(k, v) for k, v in query if k != "pool_size"]
    if not any(k == "connect_timeout" for k, _ in rest):
        rest.append(("connect_timeout", "5"))
    # %20, not "+", for a space: libpq does not read "+" as one ("-c a=1 -c b=2" in options)
    conninfo = parts._replace(query=urlencode(rest, quote_via=quote)).geturl()

    def connect() -> Any:
        conn = psycopg.connect(conninfo, autocommit=True)
        if on_connect:
            on_connect(conn)
        return conn

    ddl = {"pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA", "ts": "DOUBLE PRECISION"}
    dialect = PostgresDialect(
        "postgresql",
        connect,
        ddl,
        # OperationalError covers connection loss, disk full (class 53), lock/statement timeouts, and
        # serialization failures; InterfaceError a connection that is already closed.
        unavailable=(psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout),
        integrity=(psycopg.IntegrityError,),
    )
    return dialect, pool_size


def create_private(path: str | Path) -> None:
    """Create a database file readable by its owner only (SQLite gives its -wal and -shm files the same
    mode): it holds pseudonymised payloads, which are still personal data. An existing file is left as it
    is; in-memory and URI databases are not files."""
    name = str(path)
    if name.startswith((":", "file:")):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
