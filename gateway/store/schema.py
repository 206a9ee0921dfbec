"""One schema for SQLite and PostgreSQL, applied by numbered migrations recorded in `schema_version`.

DDL is written once with three placeholders the dialect fills in: {pk} (an auto-increment primary key),
{blob} (BLOB / bytea) and {ts} (epoch seconds as a double: one comparable type on both engines, and the
store's clock can be injected in tests). Migrations only ever get appended; never edit a released one.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE deliveries (
                seq {pk},
                id TEXT NOT NULL UNIQUE,
                provider TEXT NOT NULL,
                registry TEXT NOT NULL,
                sender TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('queued', 'delivering', 'delivered', 'dead')),
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at {ts} NOT NULL,
                lease_owner TEXT,
                lease_expires_at {ts},
                patient_order_key TEXT,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                registry_status INTEGER,
                last_error TEXT,
                counts_json TEXT NOT NULL DEFAULT '{{}}',
                pseudonym_types TEXT NOT NULL DEFAULT '',
                payload_sha256 TEXT NOT NULL,
                payload_size INTEGER NOT NULL,
                payload {blob} NOT NULL,
                UNIQUE (provider, registry, idempotency_key)
            )""",
            "CREATE INDEX deliveries_claim ON deliveries (status, next_attempt_at)",
            "CREATE INDEX deliveries_patient ON deliveries (registry, patient_order_key, seq)",
            "CREATE INDEX deliveries_lease ON deliveries (status, lease_expires_at)",
            """CREATE TABLE audit_events (
                id {pk},
                at {ts} NOT NULL,
                actor TEXT NOT NULL,
                provider TEXT NOT NULL,
                registry TEXT NOT NULL,
                event TEXT NOT NULL,
                outcome TEXT NOT NULL,
                delivery_id TEXT,
                registry_status INTEGER,
                counts_json TEXT NOT NULL DEFAULT '{{}}',
                pseudonym_types TEXT NOT NULL DEFAULT '',
                detail TEXT
            )""",
            "CREATE INDEX audit_registry_at ON audit_events (registry, at)",
            "CREATE INDEX audit_delivery ON audit_events (delivery_id)",
            # The caller computes the keyed hash of the patient number; only that (hex) is stored here.
            """CREATE TABLE optout_register (
                provider TEXT NOT NULL,
                registry TEXT NOT NULL,
                patient_hash TEXT NOT NULL,
                created_at {ts} NOT NULL,
                PRIMARY KEY (provider, registry, patient_hash)
            )""",
        ),
    ),
    (
        2,
        (
            # The per-patient order check only looks at pending deliveries; a partial index keeps it fast
            # however many delivered bundles a patient has.
            "DROP INDEX deliveries_patient",
            "CREATE INDEX deliveries_pending_patient ON deliveries (registry, patient_order_key, seq) "
            "WHERE status IN ('queued', 'delivering')",
        ),
    ),
    (
        3,
        (
            # A keyed hash of the posted body when the EHR named its own Idempotency-Key: the same key with
            # another body is refused instead of answered with the earlier delivery.
            "ALTER TABLE deliveries ADD COLUMN request_digest TEXT",
        ),
    ),
    (
        4,
        (
            # An event that must be written once however often its step is redone (a bulk group resumed
            # after an interruption records what it withheld again): its key makes the second insert a no-op.
            "ALTER TABLE audit_events ADD COLUMN once_key TEXT",
            "CREATE UNIQUE INDEX audit_once ON audit_events (once_key)",
        ),
    ),
    (
        5,
        (
            # The id of the HTTP request an event came from (its X-Request-ID, on every log line of it): a
            # refused post in the audit trail can be matched to the EHR's request and the gateway's logs.
            "ALTER TABLE audit_events ADD COLUMN request_id TEXT",
        ),
    ),
    (
        6,
        (
            # Every patient a delivery carries (kept once delivered: a dead letter requeued must not overtake
            # a newer delivery of any of them, `SqlStore.requeue`): a Bundle of several patients (a
            # bulk Bundle, a family) was ordered by its first patient only, and a later post of its second
            # patient overtook it at the registry, which then kept the older version (a probe).
            """CREATE TABLE delivery_patients (
                seq INTEGER NOT NULL,
                registry TEXT NOT NULL,
                patient_key TEXT NOT NULL,
                PRIMARY KEY (seq, patient_key)
            )""",
            "CREATE INDEX delivery_patients_key ON delivery_patients (registry, patient_key, seq)",
            "INSERT INTO delivery_patients (seq, registry, patient_key) "
            "SELECT seq, registry, patient_order_key FROM deliveries WHERE patient_order_key IS NOT NULL",
        ),
    ),
    (
        7,
        (
            # The head of each kind's queue in claim order (`dialects._HEAD`): a claim read and sorted every
            # due delivery, 1.5 µs each, holding the write lock (30 ms per claim at 20,000 queued), so a
            # registry back after a day away was drained in quadratic time while posts waited on the lock.
            # The predicates are `dialects.IS_KIND`'s, word for word.
            "CREATE INDEX deliveries_pending_bulk ON deliveries (seq) "
            "WHERE status IN ('queued', 'delivering') AND substr(idempotency_key, 1, 5) = 'bulk|'",
            "CREATE INDEX deliveries_pending_posted ON deliveries (seq) "
            "WHERE status IN ('queued', 'delivering') AND NOT (substr(idempotency_key, 1, 5) = 'bulk|')",
        ),
    ),
)

LATEST = MIGRATIONS[-1][0]
