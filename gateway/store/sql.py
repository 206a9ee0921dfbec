"""The outbox, audit trail and opt-out register over SQLite or PostgreSQL (one implementation, two dialects).

All methods are synchronous and thread-safe (each call borrows a pooled connection); async code calls them
through `gateway.store.aio.AsyncStore`, which runs them in a worker thread. Every write is one transaction:
on any driver failure it is rolled back and `StoreUnavailable` is raised, so nothing is half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from gateway.store.dialects import Dialect
from gateway.store.model import (
    STATUSES,
    AuditEvent,
    AuditInput,
    Delivery,
    DeliveryStatus,
    StoreUnavailable,
    Superseded,
)
from gateway.store.pool import Pool
from gateway.store.schema import LATEST, MIGRATIONS

_META = (
    "id, provider, registry, sender, idempotency_key, status, attempts, next_attempt_at, lease_owner, "
    "lease_expires_at, patient_order_key, created_at, updated_at, registry_status, last_error, "
    "payload_sha256, payload_size, counts_json, pseudonym_types"
)
_WITH_PAYLOAD = _META + ", payload"
_AUDIT = (
    "id, at, actor, provider, registry, event, outcome, delivery_id, registry_status, counts_json, "
    "pseudonym_types, detail, request_id"
)
MAX_ERROR_TEXT = 8000  # a registry's OperationOutcome is kept for the operator, bounded
# The deliveries `o` (delivery `x` among them) to the same registry that carry one of `x`'s patients
_SHARING_A_PATIENT = """deliveries x
    JOIN delivery_patients mine ON mine.seq = x.seq
    JOIN delivery_patients other ON other.registry = mine.registry AND other.patient_key = mine.patient_key
    JOIN deliveries o ON o.seq = other.seq"""
CLAIM_WINDOW = 128  # pending deliveries at the head of a queue a claim reads first (`dialects._HEAD`)


class SqlStore:
    def __init__(
        self,
        dialect: Dialect,
        *,
        pool_size: int = 8,
        pool_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        claim_window: int = CLAIM_WINDOW,
    ) -> None:
        self.dialect = dialect
        self.claim_window = claim_window
        self._pool: Pool[Any] = Pool(dialect.connect, size=pool_size, timeout=pool_timeout)
        self._clock = clock
        self.migrate()

    # -- plumbing (RETURNING results are always read with fetchall: SQLite finishes the statement only then)

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        try:
            with self._pool.connection(discard_on=self.dialect.unavailable) as conn:
                yield conn
        except self.dialect.unavailable as exc:
            raise StoreUnavailable(f"store unavailable ({type(exc).__name__})") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._conn() as conn, self.dialect.transaction(conn):
            yield conn

    def _q(self, conn: Any, sql: str, params: Iterable[Any] = ()) -> Any:
        return conn.execute(self.dialect.sql(sql), tuple(params))

    def close(self) -> None:
        self._pool.close()

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Safe when several processes start at once."""
        with self._tx() as conn:
            self.dialect.lock_migrations(conn)
            self._q(
                conn,
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at "
                + self.dialect.ddl["ts"]
                + " NOT NULL)",
            )
            current = self._q(conn, "SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            if current > LATEST:
                raise RuntimeError(f"store schema v{current} is newer than this gateway (v{LATEST})")
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    self._q(conn, statement.format(**self.dialect.ddl))
                self._q(
                    conn,
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, self._clock()),
                )
            return max(current, LATEST)

    def schema_version(self) -> int:
        with self._conn() as conn:
            return self._q(conn, "SELECT MAX(version) FROM schema_version").fetchone()[0] or 0

    # -- outbox ---------------------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        provider: str,
        registry: str,
        payload: bytes,
        sender: str | None = None,
        client: str | None = None,
        idempotency_key: str | None = None,
        request_digest: str | None = None,
        patient_order_key: str | None = None,
        patient_keys: Sequence[str] | None = None,
        counts: dict[str, Any] | None = None,
        pseudonym_types: Iterable[str] | None = None,
        summary: dict[str, Any] | None = None,
        audit: AuditInput | Mapping[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Queue a pseudonymised bundle; the same (provider, registry, idempotency_key) gives the same id.

        `sender` (alias `client`) is the authenticated EHR client. `counts` (or a processing report given
        as `summary`) must hold counts only; pseudonym types default to the keys of summary["pseudonymTypes"].
        `audit`, if given, is written in the same transaction when the row is new.
        `patient_keys`: every patient the Bundle carries (default: `patient_order_key`, itself the first of
        them by default); a later delivery of any of them waits for this one (`dialects.CLAIMABLE`).
        Returns (delivery_id, created). When it returns, the row is committed (and fsynced on SQLite).
        """
        who = sender or client
        if not who:
            raise ValueError("enqueue needs the sender (client id)")
        if counts is None:
            counts = summary or {}
        if pseudonym_types is None:
            pseudonym_types = (summary or {}).get("pseudonymTypes") or ()
        now = self._clock()
        delivery_id = uuid.uuid4().hex
        key = idempotency_key or delivery_id
        types = tuple(sorted(set(pseudonym_types)))
        counts_json = orjson.dumps(counts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
        keys = list(dict.fromkeys(patient_keys or ([patient_order_key] if patient_order_key else [])))
        patient_order_key = patient_order_key or (keys[0] if keys else None)
        with self._tx() as conn:
            row = self._q(
                conn,
                """INSERT INTO deliveries (id, provider, registry, sender, idempotency_key, request_digest,
                       status, attempts, next_attempt_at, patient_order_key, created_at, updated_at,
                       counts_json, pseudonym_types, payload_sha256, payload_size, payload)
                   VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (provider, registry, idempotency_key) DO NOTHING RETURNING id, seq""",
                (
                    delivery_id,
                    provider,
                    registry,
                    who,
                    key,
                    request_digest,
                    now,
                    patient_order_key,
                    now,
                    now,
                    counts_json,
                    ",".join(types),
                    hashlib.sha256(payload).hexdigest(),
                    len(payload),
                    payload,
                ),
            ).fetchall()
            if not row:
                existing = self._q(
                    conn,
                    "SELECT id FROM deliveries WHERE provider = ? AND registry = ? AND idempotency_key = ?",
                    (provider, registry, key),
                ).fetchone()
                return existing[0], False
            for key in keys:
                self._q(
                    conn,
                    "INSERT INTO delivery_patients (seq, registry, patient_key) VALUES (?, ?, ?)",
                    (row[0][1], registry, key),
                )
            if audit is not None:
                event = _audit_input(audit)
                if event.delivery_id is None:
                    event = replace(event, delivery_id=delivery_id)
                self._audit(conn, event, now)
            return delivery_id, True

    def request_digest(self, provider: str, registry: str, idempotency_key: str) -> str | None:
        """The keyed hash of the body first posted under an EHR's own Idempotency-Key (None without one)."""
        with self._conn() as conn:
            row = self._q(
                conn,
                "SELECT request_digest FROM deliveries "
                "WHERE provider = ? AND registry = ? AND idempotency_key = ?",
                (provider, registry, idempotency_key),
            ).fetchone()
        return None if row is None else row[0]

    def find_by_idempotency(self, provider: str, registry: str, idempotency_key: str) -> Delivery | None:
        with self._conn() as conn:
            row = self._q(
                conn,
                f"SELECT {_META} FROM deliveries WHERE provider = ? AND registry = ? AND idempotency_key = ?",
                (provider, registry, idempotency_key),
            ).fetchone()
        return None if row is None else _delivery(row)

    def depth_by_key_prefix(self, provider: str, registry: str, prefix: str) -> dict[str, int]:
        """`depth` of the deliveries whose idempotency key starts with `prefix` (a bulk job's): how many of
        its Bundles the registry has, and how many are still on their way."""
        with self._conn() as conn:
            rows = self._q(
                conn,
                "SELECT status, COUNT(*) FROM deliveries WHERE provider = ? AND registry = ? "
                "AND idempotency_key LIKE ? ESCAPE '\\' GROUP BY status",
                (provider, registry, _like_prefix(prefix)),
            ).fetchall()
        return _by_status(rows)

    def ids_by_key_prefix(self, provider: str, registry: str, prefix: str) -> list[str]:
        """The deliveries whose idempotency key starts with `prefix` (a bulk job's: `bulk|<job>|`), oldest
        first: what a bulk job run again after an interruption still has in the outbox."""
        with self._conn() as conn:
            rows = self._q(
                conn,
                "SELECT id FROM deliveries WHERE provider = ? AND registry = ? AND idempotency_key LIKE ? "
                "ESCAPE '\\' ORDER BY created_at, id",
                (provider, registry, _like_prefix(prefix)),
            ).fetchall()
        return [row[0] for row in rows]

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, registries: Iterable[str] | None = None
    ) -> list[Delivery]:
        """Lease up to `limit` due deliveries to `owner`, oldest first, at most one in flight per patient key;
        posted Bundles before a bulk job's (`dialects.KINDS`).

        A delivery whose lease expired (its worker died) is claimable again. `attempts` counts claims.
        """
        now = self._clock()
        only = None if registries is None else sorted(set(registries))
        window = max(self.claim_window, limit)
        rows: list[Any] = []
        with self._tx() as conn:
            self.dialect.lock_claims(conn)
            for kind in ("posted", "bulk"):  # a bulk job's Bundles fill the slots posted Bundles leave
                for look_at in (window, None):  # the head of the queue first; every due one if it is full
                    if len(rows) == limit:
                        break
                    if look_at is None and not self._head_full(conn, kind, window):
                        break
                    sql, params = self.dialect.claim(
                        owner=owner,
                        now=now,
                        lease_until=now + lease_seconds,
                        registries=only,
                        limit=limit - len(rows),
                        returning=_WITH_PAYLOAD + ", seq",
                        kind=kind,
                        window=look_at,
                    )
                    rows += conn.execute(sql, tuple(params)).fetchall()
        rows.sort(key=lambda r: r[-1])
        return [_delivery(r[:-1]) for r in rows]

    def _head_full(self, conn: Any, kind: str, window: int) -> bool:
        head, params = self.dialect.queue_head(kind, window)
        return self._q(conn, f"SELECT count(*) FROM ({head}) AS head", params).fetchone()[0] >= window

    def extend_lease(self, delivery_id: str, owner: str, lease_seconds: float) -> bool:
        """Keep a long delivery leased (heartbeat); False if the lease already went to another worker."""
        now = self._clock()
        with self._tx() as conn:
            cur = self._q(
                conn,
                "UPDATE deliveries SET lease_expires_at = ?, updated_at = ? "
                "WHERE id = ? AND status = 'delivering' AND lease_owner = ?",
                (now + lease_seconds, now, delivery_id, owner),
            )
            return cur.rowcount == 1

    def _finish(
        self,
        delivery_id: str,
        owner: str,
        assignments: str,
        params: tuple[Any, ...],
        audit: AuditInput | None,
    ) -> bool:
        now = self._clock()
        with self._tx() as conn:
            # Fenced by the lease owner: a worker whose lease expired (and was reclaimed) cannot overwrite
            # the new owner's outcome.
            cur = self._q(
                conn,
                f"UPDATE deliveries SET {assignments}, lease_owner = NULL, lease_expires_at = NULL, "
                "updated_at = ? "
                "WHERE id = ? AND status = 'delivering' AND lease_owner = ?",
                (*params, now, delivery_id, owner),
            )
            if cur.rowcount != 1:
                return False
            if audit is not None:
                self._audit(conn, audit, now)
            return True

    def mark_delivered(
        self,
        delivery_id: str,
        owner: str,
        *,
        registry_status: int | None = None,
        audit: AuditInput | None = None,
    ) -> bool:
        return self._finish(
            delivery_id,
            owner,
            "status = 'delivered', registry_status = ?, last_error = NULL",
            (registry_status,),
            audit,
        )

    def mark_retry(
        self,
        delivery_id: str,
        owner: str,
        delay: float,
        *,
        registry_status: int | None = None,
        error: str | None = None,
        audit: AuditInput | None = None,
    ) -> bool:
        return self._finish(
            delivery_id,
            owner,
            "status = 'queued', next_attempt_at = ?, registry_status = ?, last_error = ?",
            (self._clock() + max(0.0, delay), registry_status, _bounded(error)),
            audit,
        )

    def mark_dead(
        self,
        delivery_id: str,
        owner: str,
        outcome: str,
        *,
        registry_status: int | None = None,
        audit: AuditInput | None = None,
    ) -> bool:
        return self._finish(
            delivery_id,
            owner,
            "status = 'dead', registry_status = ?, last_error = ?",
            (registry_status, _bounded(outcome)),
            audit,
        )

    def requeue(
        self, delivery_id: str, *, provider: str | None = None, actor: str = "operator", force: bool = False
    ) -> bool:
        """Put a dead (or waiting) delivery back at the front of its turn: attempts reset, due now. Raises
        ``Superseded`` for a dead one when a newer delivery carries one of its patients (unless ``force``):
        sent now, the older version would overwrite the newer at the registry (a probe's did)."""
        now = self._clock()
        with self._tx() as conn:
            if not force and self._superseded(conn, delivery_id):
                raise Superseded(delivery_id)
            where, params = "id = ? AND status IN ('dead', 'queued')", [delivery_id]
            if provider is not None:
                where += " AND provider = ?"
                params.append(provider)
            row = self._q(
                conn,
                f"UPDATE deliveries SET status = 'queued', attempts = 0, next_attempt_at = ?, "
                f"updated_at = ? WHERE {where} RETURNING provider, registry",
                (now, now, *params),
            ).fetchall()
            if not row:
                return False
            self._audit(
                conn,
                AuditInput(
                    actor=actor,
                    provider=row[0][0],
                    registry=row[0][1],
                    event="requeued",
                    outcome="queued",
                    delivery_id=delivery_id,
                ),
                now,
            )
            return True

    def behind_a_retry(self, delivery_id: str) -> bool:
        """Is this queued delivery waiting for an older one of its patients whose attempt failed (queued
        again for its retry)? Then it goes only after that one: its own answer is known, "queued"."""
        with self._conn() as conn:
            row = self._q(
                conn,
                f"""SELECT 1 FROM {_SHARING_A_PATIENT}
                   WHERE x.id = ? AND o.seq < x.seq AND x.status = 'queued' AND o.status = 'queued'
                     AND o.attempts > 0
                   LIMIT 1""",
                (delivery_id,),
            ).fetchone()
        return row is not None

    def newest_of_patients(self, delivery_id: str) -> Delivery | None:
        """The newest delivery to the same registry, not dead, that carries one of this one's patients (this
        one itself when none is newer); None when it carries no patient."""
        with self._conn() as conn:
            row = self._q(
                conn,
                f"""SELECT {_META} FROM deliveries WHERE seq = (
                       SELECT MAX(o.seq) FROM {_SHARING_A_PATIENT} WHERE x.id = ? AND o.status <> 'dead')""",
                (delivery_id,),
            ).fetchone()
        return None if row is None else _delivery(row)

    def _superseded(self, conn: Any, delivery_id: str) -> bool:
        """A newer delivery to the same registry, whatever its status, carries one of this dead one's
        patients (any of them: a re-probe's newer Bundle had the patient second)."""
        row = self._q(
            conn,
            f"SELECT 1 FROM {_SHARING_A_PATIENT} "
            "WHERE x.id = ? AND x.status = 'dead' AND o.seq > x.seq LIMIT 1",
            (delivery_id,),
        ).fetchone()
        return row is not None

    def get(
        self, delivery_id: str, provider: str | None = None, *, with_payload: bool = False
    ) -> Delivery | None:
        """One delivery; with `provider` given, another provider's delivery is not found (no leak)."""
        where, params = "id = ?", [delivery_id]
        if provider is not None:
            where += " AND provider = ?"
            params.append(provider)
        with self._conn() as conn:
            row = self._q(
                conn,
                f"SELECT {_WITH_PAYLOAD if with_payload else _META} FROM deliveries WHERE {where}",
                params,
            ).fetchone()
        return None if row is None else _delivery(row)

    def list_deliveries(
        self,
        provider: str | None = None,
        status: DeliveryStatus | None = None,
        registry: str | None = None,
        limit: int = 100,
        offset: int = 0,
        registries: Iterable[str] | None = None,
    ) -> list[Delivery]:
        """Newest first, without payloads; `registries`: only those (a client's own)."""
        where, params = _filters(provider=provider, status=status, registry=registry)
        if registries is not None:
            allowed = sorted(set(registries))
            if not allowed:
                return []
            marks = ", ".join("?" * len(allowed))
            where = (f"{where} AND " if where else "WHERE ") + f"registry IN ({marks})"
            params += allowed
        with self._conn() as conn:
            rows = self._q(
                conn,
                f"SELECT {_META} FROM deliveries {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [_delivery(r) for r in rows]

    def depth(self, registry: str | None = None) -> dict[str, int]:
        where, params = _filters(registry=registry)
        with self._conn() as conn:
            rows = self._q(
                conn, f"SELECT status, COUNT(*) FROM deliveries {where} GROUP BY status", params
            ).fetchall()
        return _by_status(rows)

    def purge_payloads(self, older_than_seconds: float) -> int:
        """Data minimisation: empty the payload of deliveries delivered longer ago than the retention."""
        cutoff = self._clock() - older_than_seconds
        with self._tx() as conn:
            cur = self._q(
                conn,
                "UPDATE deliveries SET payload = ? WHERE status = 'delivered' AND updated_at < ? "
                "AND length(payload) > 0",
                (b"", cutoff),
            )
            return int(cur.rowcount)

    # -- audit ----------------------------------------------------------------------------------------

    def _audit(self, conn: Any, event: AuditInput, now: float) -> None:
        self._q(
            conn,
            """INSERT INTO audit_events (at, actor, provider, registry, event, outcome, delivery_id,
                       registry_status, counts_json, pseudonym_types, detail, once_key, request_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (once_key) DO NOTHING""",
            (
                now,
                event.actor,
                event.provider,
                event.registry,
                event.event,
                event.outcome,
                event.delivery_id,
                event.registry_status,
                orjson.dumps(event.counts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode(),
                ",".join(sorted(set(event.pseudonym_types))),
                _bounded(event.detail),
                event.once_key,
                event.request_id,
            ),
        )

    def record_audit(self, event: AuditInput | Mapping[str, Any]) -> None:
        """Record one event. A plain mapping is accepted too (keys as in AuditInput; `client` for `actor`,
        and `event` defaults to `outcome`)."""
        with self._tx() as conn:
            self._audit(conn, _audit_input(event), self._clock())

    def list_audit(
        self,
        registry: str | None = None,
        provider: str | None = None,
        delivery_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        after_id: int | None = None,
    ) -> list[AuditEvent]:
        """Oldest first; `after_id` pages on (the id of the last event of the previous page)."""
        where, params = _filters(
            registry=registry, provider=provider, delivery_id=delivery_id, since=since, until=until,
            after=after_id,
        )  # fmt: skip
        with self._conn() as conn:
            rows = self._q(
                conn, f"SELECT {_AUDIT} FROM audit_events {where} ORDER BY id LIMIT ?", (*params, limit)
            ).fetchall()
        return [_audit_event(r) for r in rows]

    def processing_record(
        self,
        registry: str,
        since: float | None = None,
        until: float | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """AVG art. 30 summary for one recipient: who delivered what kind of data, when, how much.

        Built from the audit trail (counts and pseudonym types only) and the outbox depth.
        """
        where, params = _filters(registry=registry, provider=provider, since=since, until=until)
        # the register of objections is the hospital's own processing, not data delivered to this recipient
        where = (f"{where} AND " if where else "WHERE ") + "event NOT LIKE ?"
        params = [*params, "objection-%"]
        totals: dict[str, Any] = {}
        withheld: dict[str, Any] = {}
        people: dict[str, Any] = {"delivered": 0, "withheld": 0}
        types: set[str] = set()
        with self._conn() as conn:
            # Aggregates in SQL; only the small counts JSON of delivered events is summed here, row by row.
            first, last = self._q(
                conn, f"SELECT MIN(at), MAX(at) FROM audit_events {where}", params
            ).fetchone()
            outcomes = dict(
                self._q(
                    conn, f"SELECT event, COUNT(*) FROM audit_events {where} GROUP BY event", params
                ).fetchall()
            )
            providers = [
                r[0]
                for r in self._q(
                    conn, f"SELECT DISTINCT provider FROM audit_events {where}", params
                ).fetchall()
            ]
            for (joined,) in self._q(
                conn, f"SELECT DISTINCT pseudonym_types FROM audit_events {where}", params
            ).fetchall():
                types.update(_types(joined))
            cur = self._q(
                conn,
                f"SELECT event, counts_json FROM audit_events {where}"
                " AND (event = 'delivered' OR outcome = 'nothing-to-deliver' OR event = 'withheld')",
                params,
            )
            while rows := cur.fetchmany(1000):
                for event, counts_json in rows:
                    counts = orjson.loads(counts_json)
                    _add_counts(totals if event == "delivered" else withheld, counts)
                    _add_counts(people, _patients_split(event, counts))
        return {
            "registry": registry,
            "recipients": [registry],
            "purpose": "delivery to a quality registry (Wkkgz/Wkz)",
            "categoriesOfData": "pseudonymised health data (FHIR); no direct identifiers",
            "providers": sorted(providers),
            "period": {"first": _iso(first), "last": _iso(last)},
            "events": {k: int(v) for k, v in outcomes.items()},
            "bundlesDelivered": int(outcomes.get("delivered", 0)),
            # patients per delivery (one in two Bundles counts twice), posted and bulk alike
            "patientsDelivered": people["delivered"],
            "patientsWithheld": people["withheld"],
            "delivered": totals,
            # bundles of which nothing was delivered (every patient objected, status unknown, no pseudonym),
            # and what bulk patient groups kept back
            "withheld": withheld,
            "pseudonymTypes": sorted(types),
            # the outbox as it is now, whatever the period: what is still on its way to this recipient
            "outbox": self.depth(registry),
            "outboxAt": _iso(self._clock()),
        }

    # -- opt-out register -----------------------------------------------------------------------------

    def optout_add(self, provider: str, registry: str, patient_hash: bytes | str) -> bool:
        """Register an objection (registry '*' = every registry); True if it was new."""
        with self._tx() as conn:
            row = self._q(
                conn,
                "INSERT INTO optout_register (provider, registry, patient_hash, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING provider",
                (provider, registry, _hex(patient_hash), self._clock()),
            ).fetchall()
            return bool(row)

    def optout_withdraw(self, provider: str, registry: str, patient_hash: bytes | str) -> bool:
        with self._tx() as conn:
            cur = self._q(
                conn,
                "DELETE FROM optout_register WHERE provider = ? AND registry = ? AND patient_hash = ?",
                (provider, registry, _hex(patient_hash)),
            )
            return cur.rowcount > 0

    def optout_lookup(self, provider: str, registry: str, patient_hashes: Iterable[bytes | str]) -> set[str]:
        """The given hashes (as lower-case hex) with an objection for this registry or for all ('*')."""
        wanted = sorted({_hex(h) for h in patient_hashes})
        found: set[str] = set()
        with self._conn() as conn:
            for start in range(0, len(wanted), 500):  # bounded IN lists
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                rows = self._q(
                    conn,
                    f"SELECT patient_hash FROM optout_register WHERE provider = ? AND "
                    f"registry IN (?, '*') AND patient_hash IN ({marks})",
                    (provider, registry, *chunk),
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    # Names used by the service and the opt-out sources.
    add_objection = optout_add
    withdraw_objection = optout_withdraw

    async def objection_lookup(self, provider: str, registry: str, digest_hex: str) -> bool | None:
        """`gateway.optout.register.ObjectionLookup`: True/False, or None when the store cannot answer
        (the opt-out source then fails closed). Asked twice before that: the pool replaces a connection it
        found dropped (a database restart, a proxy's idle timeout), and one such connection failed a whole
        bulk job (a chaos probe); a store that is down fails both."""
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(2), retry=retry_if_exception_type(StoreUnavailable), reraise=True
            ):
                with attempt:
                    found = await asyncio.to_thread(self.optout_lookup, provider, registry, [digest_hex])
        except StoreUnavailable:
            return None
        return bool(found)

    def optout_count(self, provider: str | None = None) -> int:
        where, params = _filters(provider=provider)
        with self._conn() as conn:
            return int(self._q(conn, f"SELECT COUNT(*) FROM optout_register {where}", params).fetchone()[0])


def _audit_input(event: AuditInput | Mapping[str, Any]) -> AuditInput:
    if isinstance(event, AuditInput):
        return event
    outcome = str(event.get("outcome") or "")
    return AuditInput(
        actor=str(event.get("actor") or event.get("client") or ""),
        provider=str(event.get("provider") or ""),
        registry=str(event.get("registry") or ""),
        event=str(event.get("event") or outcome),
        outcome=outcome,
        delivery_id=event.get("delivery_id"),
        registry_status=event.get("registry_status"),
        counts=dict(event.get("counts") or {}),
        pseudonym_types=tuple(event.get("pseudonym_types") or ()),
        detail=event.get("detail"),
    )


# Filters that are not `column = ?`: a period of the audit trail (`until` exclusive) and paging by id
_BOUNDS = {"since": "at >= ?", "until": "at < ?", "after": "id > ?"}


def _filters(**values: Any) -> tuple[str, list[Any]]:
    """A WHERE clause of the given values (None: no filter), `column = ?` unless a bound of `_BOUNDS`."""
    given = {name: value for name, value in values.items() if value is not None}
    clauses = [_BOUNDS.get(name, f"{name} = ?") for name in given]
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", list(given.values())


def _by_status(rows: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """(status, count) rows as a count for every status, 0 for those without a row."""
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _bounded(text: str | None) -> str | None:
    return None if text is None else text[:MAX_ERROR_TEXT]


def _hex(value: bytes | str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    text = value.strip().lower()
    bytes.fromhex(text)  # reject anything that is not hex: a plain patient number must never land here
    return text


def _types(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _delivery(row: tuple[Any, ...]) -> Delivery:
    payload = bytes(row[19]) if len(row) > 19 and row[19] is not None else None
    return Delivery(
        id=row[0],
        provider=row[1],
        registry=row[2],
        sender=row[3],
        idempotency_key=row[4],
        status=row[5],
        attempts=int(row[6]),
        next_attempt_at=float(row[7]),
        lease_owner=row[8],
        lease_expires_at=None if row[9] is None else float(row[9]),
        patient_order_key=row[10],
        created_at=float(row[11]),
        updated_at=float(row[12]),
        registry_status=row[13],
        last_error=row[14],
        payload_sha256=row[15],
        payload_size=int(row[16]),
        counts=orjson.loads(row[17]),
        pseudonym_types=_types(row[18]),
        payload=payload,
    )


def _audit_event(row: tuple[Any, ...]) -> AuditEvent:
    return AuditEvent(
        id=int(row[0]),
        at=float(row[1]),
        actor=row[2],
        provider=row[3],
        registry=row[4],
        event=row[5],
        outcome=row[6],
        delivery_id=row[7],
        registry_status=row[8],
        counts=orjson.loads(row[9]),
        pseudonym_types=_types(row[10]),
        detail=row[11],
        request_id=row[12],
    )


_DROPPED_PATIENTS = ("patientsDroppedOptOut", "patientsDroppedUnknownOptOut", "patientsDroppedNoPseudonym")


def _patients_split(event: str, counts: dict[str, Any]) -> dict[str, int]:
    """A delivered Bundle's patients less those it dropped, and those withheld: a Bundle of which nothing
    went withheld them all (its `patients`), a bulk group its `patients` (the withheld ones only)."""
    def number(key: str) -> int:
        value = counts.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    dropped = sum(number(k) for k in _DROPPED_PATIENTS)
    if event == "delivered":
        return {"delivered": number("patients") - dropped, "withheld": dropped}
    return {"delivered": 0, "withheld": number("patients")}


def _add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
