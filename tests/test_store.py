"""The outbox store, run against both SQLite (tmp_path) and PostgreSQL (a fresh schema per test)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import AuditInput, Store, StoreUnavailable, Superseded, open_store
from gateway.store.schema import LATEST


class FakeClock:
    """The store takes its time from here, so lease expiry and retry delays need no sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/outbox.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    s = open_store(store_url, clock=clock)
    yield s
    s.close()


def put(
    store: Store,
    key: str,
    *,
    patient: str | None = None,
    registry: str = "dica",
    provider: str = "ura:1",
    payload: bytes = b'{"resourceType":"Bundle"}',
) -> str:
    delivery_id, _ = store.enqueue(
        provider=provider,
        registry=registry,
        sender="ehr-1",
        payload=payload,
        idempotency_key=key,
        patient_order_key=patient,
        counts={"resources": {"Patient": 1, "Observation": 2}, "patients": 1},
        pseudonym_types=["SNGGV", "MRN"],
        # written in the same transaction as the row (only when the row is new)
        audit=AuditInput(
            actor="ehr-1", provider=provider, registry=registry, event="accepted", outcome="queued"
        ),
    )
    return delivery_id


def test_schema_is_migrated_once_and_reopening_is_harmless(store_url: str, clock: FakeClock) -> None:
    first = open_store(store_url, clock=clock)
    put(first, "k1")
    first.close()
    again = open_store(store_url, clock=clock)
    assert again.schema_version() == LATEST
    assert again.depth()["queued"] == 1
    again.close()


def test_same_idempotency_key_twice_gives_one_row(store: Store) -> None:
    a, created_a = store.enqueue(
        provider="ura:1", registry="dica", sender="ehr", payload=b"x", idempotency_key="same"
    )
    b, created_b = store.enqueue(
        provider="ura:1", registry="dica", sender="ehr", payload=b"x", idempotency_key="same"
    )
    assert (a, created_a, created_b) == (b, True, False)
    assert store.depth() == {"queued": 1, "delivering": 0, "delivered": 0, "dead": 0}
    # The key is scoped per (provider, registry).
    c, created_c = store.enqueue(
        provider="ura:1", registry="nkr", sender="ehr", payload=b"x", idempotency_key="same"
    )
    d, created_d = store.enqueue(
        provider="ura:2", registry="dica", sender="ehr", payload=b"x", idempotency_key="same"
    )
    assert created_c and created_d and len({a, c, d}) == 3
    assert store.list_audit() == []  # no audit asked for


def test_claim_is_oldest_first_and_one_in_flight_per_patient(store: Store, clock: FakeClock) -> None:
    a1 = put(store, "a1", patient="pA")
    clock.now += 1
    b1 = put(store, "b1", patient="pB")
    clock.now += 1
    a2 = put(store, "a2", patient="pA")
    clock.now += 1
    n1 = put(store, "n1")  # no patient key: no ordering constraint

    batch = store.claim_batch("w1", limit=10, lease_seconds=30)
    assert [d.id for d in batch] == [a1, b1, n1]  # a2 waits for a1
    assert all(d.status == "delivering" and d.attempts == 1 and d.payload for d in batch)

    assert store.mark_delivered(b1, "w1") and store.mark_delivered(n1, "w1")
    # a1 waits for a retry: a2 still waits (in order per patient).
    assert store.mark_retry(a1, "w1", 60, registry_status=503, error="registry unavailable")
    assert store.claim_batch("w1", limit=10, lease_seconds=30) == []
    clock.now += 61
    again = store.claim_batch("w1", limit=10, lease_seconds=30)
    assert [d.id for d in again] == [a1] and again[0].attempts == 2
    assert store.mark_delivered(a1, "w1", registry_status=200)
    assert [d.id for d in store.claim_batch("w1", limit=10, lease_seconds=30)] == [a2]


def test_per_patient_order_is_per_registry(store: Store) -> None:
    x = put(store, "x", patient="pA", registry="dica")
    y = put(store, "y", patient="pA", registry="nkr")
    assert {d.id for d in store.claim_batch("w", limit=10, lease_seconds=30)} == {x, y}


def test_posted_bundles_are_claimed_before_a_bulk_jobs_but_a_patients_order_holds(store: Store) -> None:
    """A yearly delivery's thousands of Bundles in the outbox held every later post back until they had
    gone: the registry got an EHR's live posts only after the whole export. Posted ones go first now, except
    a patient's post while that patient's bulk Bundle waits (the registry must see them in order)."""
    bulk = [put(store, f"bulk|job1|{n}", patient=f"p{n}", registry="dica") for n in range(5)]
    posted = put(store, "k-post", patient="p9")
    after_own_bulk = put(store, "k-p1", patient="p1")
    claimed = store.claim_batch("w", limit=2, lease_seconds=30)
    assert [d.id for d in claimed] == [bulk[0], posted]  # the post first; the oldest bulk one fills in
    assert after_own_bulk not in [d.id for d in store.claim_batch("w", limit=10, lease_seconds=30)]


def test_a_delivery_waits_for_an_older_one_that_carries_any_of_its_patients(store: Store) -> None:
    """A probe: a Bundle of two patients was ordered by its first only; a later post of the second went first
    while the older Bundle waited for its retry, and the registry then kept the older version."""
    both, _ = store.enqueue(
        provider="ura:1", registry="dica", sender="ehr-1", payload=b"{}", idempotency_key="both",
        patient_keys=["Patient/a", "Patient/b"],
    )
    second = put(store, "later-b", patient="Patient/b")
    other = put(store, "later-c", patient="Patient/c")
    claimed = [d.id for d in store.claim_batch("w", limit=10, lease_seconds=30)]
    assert claimed == [both, other]  # b's later post waits for the Bundle that carries b too
    assert store.mark_retry(both, "w", 60, registry_status=503, error="registry unavailable")
    assert second not in [d.id for d in store.claim_batch("w", limit=10, lease_seconds=30)]
    assert store.get(both).status == "queued"


def test_claim_can_be_limited_to_registries(store: Store) -> None:
    put(store, "x", registry="dica")
    y = put(store, "y", registry="nkr")
    assert [d.id for d in store.claim_batch("w", 10, 30, registries=["nkr"])] == [y]


def test_expired_lease_is_reclaimed_and_the_old_owner_is_fenced_off(store: Store, clock: FakeClock) -> None:
    d = put(store, "k", patient="p")
    assert [x.id for x in store.claim_batch("w1", 10, lease_seconds=30)] == [d]
    assert store.claim_batch("w2", 10, lease_seconds=30) == []  # leased
    clock.now += 31  # w1 died
    reclaimed = store.claim_batch("w2", 10, lease_seconds=30)
    assert (
        [x.id for x in reclaimed] == [d] and reclaimed[0].attempts == 2 and reclaimed[0].lease_owner == "w2"
    )
    assert not store.mark_delivered(d, "w1", registry_status=200)  # too late: w2 owns it now
    assert store.mark_delivered(d, "w2", registry_status=200)
    got = store.get(d)
    assert (
        got is not None
        and got.status == "delivered"
        and got.registry_status == 200
        and got.lease_owner is None
    )


def test_lease_can_be_extended_only_by_its_owner(store: Store, clock: FakeClock) -> None:
    d = put(store, "k")
    store.claim_batch("w1", 1, lease_seconds=30)
    clock.now += 20
    assert store.extend_lease(d, "w1", 30)
    assert not store.extend_lease(d, "w2", 30)
    clock.now += 20  # past the first lease, within the renewed one
    assert store.claim_batch("w2", 1, 30) == []
    clock.now += 11
    assert [x.id for x in store.claim_batch("w2", 1, 30)] == [d]
    assert not store.extend_lease(d, "w1", 30)


def test_dead_requeue_get_list_and_provider_scoping(store: Store, clock: FakeClock) -> None:
    d = put(store, "k", provider="ura:1")
    other = put(store, "k", provider="ura:2")
    store.claim_batch("w", 1, 30)
    outcome = '{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid"}]}'
    assert store.mark_dead(d, "w", outcome, registry_status=400)
    dead = store.get(d, provider="ura:1")
    assert dead is not None and dead.status == "dead" and dead.last_error == outcome
    assert store.get(d, provider="ura:2") is None  # another provider's delivery does not exist for them
    assert [x.id for x in store.list_deliveries(status="dead")] == [d]
    assert [x.id for x in store.list_deliveries(provider="ura:2")] == [other]
    assert store.list_deliveries(registry="nope") == []
    assert all(x.payload is None for x in store.list_deliveries())
    assert not store.requeue(d, provider="ura:2")
    assert store.requeue(d, provider="ura:1", actor="admin")
    back = store.get(d)
    assert back is not None and back.status == "queued" and back.attempts == 0
    assert [e.event for e in store.list_audit(delivery_id=d)] == ["accepted", "requeued"]


def test_audit_trail_and_processing_record(store: Store, clock: FakeClock) -> None:
    d1 = put(store, "k1")
    d2 = put(store, "k2")
    for d in store.claim_batch("w", 10, 30):
        assert store.mark_delivered(
            d.id,
            "w",
            registry_status=200,
            audit=AuditInput(
                actor="w",
                provider=d.provider,
                registry=d.registry,
                event="delivered",
                outcome="ok",
                delivery_id=d.id,
                registry_status=200,
                counts=d.counts,
                pseudonym_types=d.pseudonym_types,
            ),
        )
    store.record_audit(
        AuditInput(
            actor="ehr-1",
            provider="ura:1",
            registry="dica",
            event="rejected",
            outcome="leak-scan",
            detail="fixed text",
        )
    )
    events = store.list_audit(registry="dica")
    assert [e.event for e in events] == ["accepted", "accepted", "delivered", "delivered", "rejected"]
    assert {e.delivery_id for e in events if e.event == "delivered"} == {d1, d2}
    record = store.processing_record("dica")
    assert record["bundlesDelivered"] == 2
    assert record["delivered"] == {"patients": 2, "resources": {"Patient": 2, "Observation": 4}}
    assert record["pseudonymTypes"] == ["MRN", "SNGGV"]
    assert record["providers"] == ["ura:1"] and record["recipients"] == ["dica"]
    assert record["outbox"]["delivered"] == 2 and record["period"]["first"].endswith("Z")
    assert record["outboxAt"].endswith("Z")  # the outbox is a snapshot, said to be one
    assert store.processing_record("other")["bundlesDelivered"] == 0
    # a provider that only registered an objection delivered nothing to this recipient (a review finding)
    store.record_audit(
        AuditInput(
            actor="ehr-b", provider="ura:2", registry="dica", event="objection-registered", outcome="new"
        )
    )
    again = store.processing_record("dica")
    assert again["providers"] == ["ura:1"] and "objection-registered" not in again["events"]
    assert [e.event for e in store.list_audit(registry="dica")][-1] == "objection-registered"  # still audited


def test_processing_record_of_a_period_counts_what_was_withheld(store: Store, clock: FakeClock) -> None:
    def event(kind: str, outcome: str, counts: dict) -> None:
        store.record_audit(
            AuditInput(
                actor="ehr-1", provider="ura:1", registry="dica", event=kind, outcome=outcome, counts=counts
            )
        )

    event("received", "nothing-to-deliver", {"patients": 1, "patientsDroppedOptOut": 1, "resourcesIn": 4})
    clock.now += 86400 * 400  # more than a year later
    year_two = clock.now
    event("received", "nothing-to-deliver", {"patients": 2, "patientsDroppedUnknownOptOut": 2})
    event("rejected", "leak-scan", {"patients": 9})  # not a withholding: never counted as one
    everything = store.processing_record("dica")
    assert everything["withheld"] == {
        "patients": 3,
        "patientsDroppedOptOut": 1,
        "patientsDroppedUnknownOptOut": 2,
        "resourcesIn": 4,
    }
    later = store.processing_record("dica", since=year_two - 1)
    assert later["withheld"] == {"patients": 2, "patientsDroppedUnknownOptOut": 2}
    # a Bundle that went, less what it dropped; and one provider's own record (each is a controller)
    store.record_audit(
        AuditInput(
            actor="ehr-2",
            provider="ura:2",
            registry="dica",
            event="delivered",
            outcome="ok",
            counts={"patients": 5, "patientsDroppedOptOut": 1, "patientsDroppedNoPseudonym": 1},
        )
    )
    everything = store.processing_record("dica")
    assert (everything["patientsDelivered"], everything["patientsWithheld"]) == (3, 5)
    first = store.processing_record("dica", provider="ura:1")
    assert first["providers"] == ["ura:1"]
    assert (first["patientsDelivered"], first["patientsWithheld"]) == (0, 3)
    assert later["events"] == {"received": 1, "rejected": 1}
    assert store.processing_record("dica", until=year_two - 1)["events"] == {"received": 1}


def test_the_audit_trail_pages_on_by_id(store: Store) -> None:
    for n in range(7):
        store.record_audit(
            AuditInput(actor=f"a{n}", provider="ura:1", registry="dica", event="x", outcome="y")
        )
    pages, after = [], None
    while page := store.list_audit(registry="dica", limit=3, after_id=after):
        pages.append([e.actor for e in page])
        after = page[-1].id
    assert pages == [["a0", "a1", "a2"], ["a3", "a4", "a5"], ["a6"]]


def test_optout_register(store: Store) -> None:
    h = bytes.fromhex("ab" * 32)
    assert store.optout_add("ura:1", "dica", h)
    assert not store.optout_add("ura:1", "dica", h.hex().upper())  # same hash, hex in any case
    assert store.optout_add("ura:1", "*", "cd" * 32)
    assert store.optout_lookup("ura:1", "dica", [h, "cd" * 32, "ef" * 32]) == {"ab" * 32, "cd" * 32}
    assert store.optout_lookup("ura:1", "nkr", [h, "cd" * 32]) == {"cd" * 32}  # '*' means every registry
    assert store.optout_lookup("ura:2", "dica", [h]) == set()
    assert store.optout_withdraw("ura:1", "dica", h)
    assert not store.optout_withdraw("ura:1", "dica", h)
    assert store.optout_lookup("ura:1", "dica", [h]) == set()
    with pytest.raises(ValueError):
        store.optout_add("ura:1", "dica", "123456782")  # a plain number is refused: hashes only


def test_concurrent_claimers_never_get_the_same_delivery(store_url: str) -> None:
    setup = open_store(store_url)
    ids = {put(setup, f"k{i}", patient=f"p{i % 7}") for i in range(120)}
    claimed: Counter[str] = Counter()
    in_flight: set[str] = set()  # patient keys currently held by some worker
    violations: list[str] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        s = open_store(store_url)  # its own pool, as a separate process would have
        try:
            idle = 0
            while idle < 20:
                batch = s.claim_batch(owner, limit=5, lease_seconds=60)
                if not batch:
                    idle += 1
                    continue
                idle = 0
                with lock:
                    claimed.update(d.id for d in batch)
                    for d in batch:
                        if d.patient_order_key in in_flight:
                            violations.append(d.id)
                        in_flight.add(d.patient_order_key)
                for d in batch:
                    with lock:  # released just before the commit, so a fast successor is no false alarm
                        in_flight.discard(d.patient_order_key)
                    assert s.mark_delivered(d.id, owner, registry_status=200)
        finally:
            s.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(claimed) == ids and max(claimed.values()) == 1
    assert violations == []  # never two deliveries of one patient in flight
    assert setup.depth()["delivered"] == 120
    setup.close()


def test_purge_payloads_of_old_deliveries(store: Store, clock: FakeClock) -> None:
    d = put(store, "k")
    store.claim_batch("w", 1, 30)
    store.mark_delivered(d, "w", registry_status=200)
    assert store.purge_payloads(older_than_seconds=3600) == 0
    clock.now += 7200
    assert store.purge_payloads(older_than_seconds=3600) == 1
    got = store.get(d, with_payload=True)
    assert got is not None and got.payload == b"" and got.payload_size > 0
    assert store.purge_payloads(older_than_seconds=3600) == 0


# -- failures leave nothing half-written --------------------------------------------------------------


def test_sqlite_locked_beyond_busy_timeout_raises_store_unavailable(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db?busy_timeout=100"
    store = open_store(url)
    blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailable) as err:
            put(store, "k")
        assert "payload" not in str(err.value).lower() and "Bundle" not in str(err.value)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.depth()["queued"] == 0 and store.list_audit() == []
    put(store, "k")  # and it recovers
    assert store.depth()["queued"] == 1
    store.close()


def test_sqlite_writers_of_one_process_queue_in_order_and_all_commit(tmp_path) -> None:
    """Writers in one process wait on the store's own queue, not in SQLite's sleeping busy handler: 16
    threads enqueueing at once all commit (none runs into the busy timeout), each exactly once."""
    store = open_store(f"sqlite:///{tmp_path}/outbox.db?busy_timeout=2000")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for k in range(10):
                put(store, f"w{n}-{k}")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.depth()["queued"] == 160
    store.close()


def test_sqlite_in_process_writer_queue_times_out_as_store_unavailable(tmp_path) -> None:
    """A writer stuck in a transaction holds the in-process queue: the next one gives up after busy_timeout
    with StoreUnavailable (as SQLite's own lock would), writes nothing, and the store recovers."""
    store = open_store(f"sqlite:///{tmp_path}/outbox.db?busy_timeout=100")
    release, entered = threading.Event(), threading.Event()

    def stuck() -> None:
        with store._tx():
            assert store.dialect.writer.locked()  # the in-process queue is held for the transaction
            entered.set()
            release.wait(5)

    holder = threading.Thread(target=stuck)
    holder.start()
    try:
        assert entered.wait(5)
        with pytest.raises(StoreUnavailable):
            put(store, "k")
    finally:
        release.set()
        holder.join()
    assert store.depth()["queued"] == 0
    put(store, "k")
    assert store.depth()["queued"] == 1
    store.close()


def test_sqlite_disk_full_raises_store_unavailable_and_rolls_back(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    open_store(url).close()

    def cap_size(conn: sqlite3.Connection) -> None:  # the file may not grow: SQLITE_FULL on the next page
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    store = open_store(url, on_connect=cap_size)
    with pytest.raises(StoreUnavailable):
        put(store, "big", payload=b"x" * 200_000)
    store.close()
    after = open_store(url)
    assert after.depth()["queued"] == 0 and after.list_audit() == []
    after.close()


def test_sqlite_url_options_and_pragmas(tmp_path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/o.db?synchronous=normal&busy_timeout=250")
    with store._conn() as conn:  # white-box: the pragmas really are set on pooled connections
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 250
    store.close()
    with open_store(f"sqlite:///{tmp_path}/f.db")._conn() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default
    with pytest.raises(ValueError):
        open_store("mysql://x")


@pytest.mark.postgres
def test_postgres_lock_timeout_raises_store_unavailable(pg_url: str) -> None:
    import psycopg

    store = open_store(pg_url, on_connect=lambda c: c.execute("SET lock_timeout = '200ms'"))
    with psycopg.connect(pg_url, autocommit=False) as blocker:
        blocker.execute("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable):
            put(store, "k")
        blocker.rollback()
    assert store.depth()["queued"] == 0
    put(store, "k")
    assert store.depth()["queued"] == 1
    store.close()


@pytest.mark.postgres
def test_postgres_unreachable_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")


def test_service_facing_aliases(store: Store) -> None:
    """The names and shapes the service uses: client=, summary=, dict audit events, objection_*."""
    report = {"patients": 2, "pseudonymTypes": {"SNGGV": 2, "MRN": 2}}
    d, created = store.enqueue(
        provider="ura:1",
        client="ehr-1",
        registry="dica",
        idempotency_key="k",
        payload=b"{}",
        patient_order_key=None,
        summary=report,
    )
    assert created
    found = store.find_by_idempotency("ura:1", "dica", "k")
    assert found is not None and found.id == d and found.sender == "ehr-1"
    assert found.counts == report and found.pseudonym_types == ("MRN", "SNGGV")
    assert store.find_by_idempotency("ura:1", "dica", "other") is None
    store.record_audit(
        {
            "delivery_id": d,
            "client": "ehr-1",
            "provider": "ura:1",
            "registry": "dica",
            "outcome": "accepted",
            "counts": {"patients": 2},
            "pseudonym_types": ["MRN"],
        }
    )
    (event,) = store.list_audit()
    assert (event.actor, event.event, event.outcome, event.delivery_id) == (
        "ehr-1",
        "accepted",
        "accepted",
        d,
    )
    assert store.add_objection("ura:1", "*", b"\x01" * 32)
    assert asyncio.run(store.objection_lookup("ura:1", "dica", "01" * 32)) is True
    assert asyncio.run(store.objection_lookup("ura:1", "dica", "02" * 32)) is False
    assert store.withdraw_objection("ura:1", "*", b"\x01" * 32)


def test_an_older_schema_is_migrated_in_place(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.store.sql as sql
    from gateway.store.schema import MIGRATIONS

    monkeypatch.setattr(sql, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(sql, "LATEST", 1)
    old = open_store(store_url)
    assert old.schema_version() == 1
    d = "0" * 32
    with old._tx() as conn:  # a row as the version-1 code wrote it (today's code writes newer columns)
        old._q(
            conn,
            """INSERT INTO deliveries (id, provider, registry, sender, idempotency_key, status, attempts,
                   next_attempt_at, patient_order_key, created_at, updated_at, counts_json, pseudonym_types,
                   payload_sha256, payload_size, payload)
               VALUES (?, 'ura:1', 'dica', 'ehr', 'k', 'queued', 0, 0, 'p', 0, 0, '{}', '', ?, 2, ?)""",
            (d, hashlib.sha256(b"{}").hexdigest(), b"{}"),
        )
    old.close()
    monkeypatch.undo()
    new = open_store(store_url)
    assert new.schema_version() == LATEST > 1
    assert new.get(d) is not None and [x.id for x in new.claim_batch("w", 5, 30)] == [d]
    new.close()


@pytest.mark.postgres
def test_postgres_dropped_connections_are_replaced(pg_url: str) -> None:
    import psycopg

    store = open_store(pg_url + "&application_name=outbox-drop-test")
    put(store, "k1")
    # The server restarts or a proxy cuts the connections.
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'outbox-drop-test'"
        )
    with contextlib.suppress(StoreUnavailable):
        store.depth()  # the pooled connection is dead: this call may fail ...
    assert store.depth()["queued"] == 1  # ... and the next one works on a fresh connection
    put(store, "k2")
    assert store.depth()["queued"] == 2
    store.close()


def test_a_requeued_older_delivery_waits_for_a_newer_one_in_flight(store: Store, clock: FakeClock) -> None:
    p1 = put(store, "k1", patient="p")
    p2 = put(store, "k2", patient="p")
    assert [d.id for d in store.claim_batch("w", 5, 30)] == [p1]
    assert store.mark_dead(p1, "w", "rejected")
    assert [d.id for d in store.claim_batch("w", 5, 30)] == [p2]  # dead does not block
    with pytest.raises(Superseded):  # p2 is newer: p1 would overwrite it at the registry
        store.requeue(p1)
    assert store.requeue(p1, force=True)  # the operator insists while p2 is on the wire
    assert store.claim_batch("w", 5, 30) == []  # never two of one patient in flight
    clock.now += 31  # p2's worker died: p1 (older) goes first, then p2
    assert [d.id for d in store.claim_batch("w2", 5, 30)] == [p1]
    assert store.mark_delivered(p1, "w2")
    assert [d.id for d in store.claim_batch("w2", 5, 30)] == [p2]


def test_a_new_sqlite_store_and_receiver_database_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """They hold pseudonymised payloads, still personal data (a fresh-eyes probe found them at 0644)."""
    from gateway.receiver.db import ReceiverDB

    store = open_store(f"sqlite:///{tmp_path / 'var' / 'gateway.db'}")
    store.close()
    ReceiverDB(tmp_path / "registry")
    for db in (tmp_path / "var" / "gateway.db", tmp_path / "registry" / "receiver.sqlite"):
        assert db.stat().st_mode & 0o777 == 0o600, db
    for wal in (tmp_path / "var").glob("gateway.db-*"):
        assert wal.stat().st_mode & 0o077 == 0, wal


def test_ids_by_key_prefix_finds_one_bulk_jobs_deliveries(store: Store) -> None:
    """`bulk --wait` run again follows what an earlier run of the same job left; LIKE's own characters in
    a key are matched as themselves."""
    made = {}
    for key in ("bulk|job_1|0-a", "bulk|job_1|1-b", "bulk|jobX1|0-a", "bulk|job_10|0-a", "other"):
        made[key], _ = store.enqueue(
            provider="ura:1", registry="dica", sender="ehr", payload=key.encode(), idempotency_key=key
        )
    store.enqueue(
        provider="ura:2", registry="dica", sender="ehr", payload=b"x", idempotency_key="bulk|job_1|2"
    )
    found = store.ids_by_key_prefix("ura:1", "dica", "bulk|job_1|")
    assert sorted(found) == sorted([made["bulk|job_1|0-a"], made["bulk|job_1|1-b"]])


@pytest.mark.postgres
def test_after_the_servers_connections_are_dropped_one_request_fails_not_one_per_pooled_connection(
    pg_url: str,
) -> None:
    """A probe terminated the gateway's PostgreSQL sessions (as a restart or failover does): each pooled
    connection then failed one request of its own, and 503s and 500s went on for minutes."""
    import psycopg

    store = open_store(pg_url)
    try:
        with contextlib.ExitStack() as stack:  # three connections in the pool, as after a busy moment
            conns = [stack.enter_context(store._pool.connection()) for _ in range(3)]
            pids = [conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in conns]
        with psycopg.connect(pg_url.partition("?")[0], autocommit=True) as admin:
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreUnavailable):
            store.depth()  # the first dead connection
        assert store.depth()["queued"] == 0  # a fresh one: the other dead ones went with the first
    finally:
        store.close()


def test_a_dead_letter_is_not_requeued_over_a_newer_delivered_bundle_that_has_its_patient_second(
    store: Store,
) -> None:
    """A re-probe: a delivered Bundle's patients other than its first were not kept, so a dead letter of
    such a patient was requeued over it, and the older version would have overwritten the newer."""
    old = put(store, "old", patient="Patient/p")
    assert store.claim_batch("w", 10, 30)[0].id == old and store.mark_dead(old, "w", "rejected")
    newer, _ = store.enqueue(
        provider="ura:1", registry="dica", sender="ehr-1", payload=b"{}", idempotency_key="newer",
        patient_keys=["Patient/q", "Patient/p"],
    )
    assert [d.id for d in store.claim_batch("w", 10, 30)] == [newer]
    assert store.mark_delivered(newer, "w", registry_status=200)
    with pytest.raises(Superseded):
        store.requeue(old)
    assert store.get(old).status == "dead"


def test_a_delivery_behind_a_failed_older_one_of_its_patient_is_known_to_wait(store: Store) -> None:
    first = put(store, "first", patient="Patient/p")
    later = put(store, "later", patient="Patient/p")
    other = put(store, "other", patient="Patient/q")
    assert not store.behind_a_retry(later)  # the older one is queued, but has not failed
    assert [d.id for d in store.claim_batch("w", 10, 30)] == [first, other]
    assert store.mark_retry(first, "w", 60, registry_status=503, error="registry unavailable")
    assert store.behind_a_retry(later) and not store.behind_a_retry(other)


def _replay_queue_life(store: Store, clock: FakeClock, seed: int) -> list[list[str]]:
    """A random life of an outbox (posts and bulk Bundles of a few patients for two registries; claims,
    deliveries, retries, dead letters, requeues, expired leases), the same for the same seed. Returns the
    idempotency keys of each claim, in claim order."""
    rng = random.Random(seed)
    claims: list[list[str]] = []
    ids: list[str] = []
    for step in range(120):
        roll = rng.random()
        if roll < 0.45:
            key = f"{'bulk|job|' if rng.random() < 0.5 else 'post-'}{step}"
            patients = rng.sample(["p1", "p2", "p3", "p4", "p5"], rng.randint(0, 2))
            delivery_id, _ = store.enqueue(
                provider="ura:1",
                registry=rng.choice(["dica", "nkr"]),
                sender="ehr-1",
                payload=b"{}",
                idempotency_key=key,
                patient_keys=patients,
            )
            ids.append(delivery_id)
        elif roll < 0.8:
            registries = rng.choice([None, ["dica"], ["dica", "nkr"]])
            batch = store.claim_batch("w", limit=rng.randint(1, 4), lease_seconds=30, registries=registries)
            claims.append([d.idempotency_key for d in batch])
            for d in batch:
                outcome = rng.random()
                if outcome < 0.5:
                    store.mark_delivered(d.id, "w", registry_status=200)
                elif outcome < 0.75:
                    store.mark_retry(d.id, "w", rng.choice([1, 20]), registry_status=503, error="down")
                elif outcome < 0.85:
                    store.mark_dead(d.id, "w", "refused", registry_status=422)
                # else: left in flight until its lease expires
        elif roll < 0.9 and ids:
            with contextlib.suppress(Superseded):
                store.requeue(rng.choice(ids))
        else:
            clock.now += rng.choice([1, 5, 31])
    return claims


@pytest.mark.parametrize("seed", range(12))
def test_a_claim_that_reads_the_head_of_the_queue_first_claims_what_reading_every_due_delivery_would(
    tmp_path: Path, seed: int
) -> None:
    # A head of one (or of the batch size) makes almost every claim fall back to every due delivery; a
    # head longer than any queue here never does. Both must claim the same Bundles in the same order.
    claimed = []
    for window in (1, 10**6):
        clock = FakeClock()
        store = open_store(f"sqlite:///{tmp_path}/outbox-{window}.db", clock=clock)
        store.claim_window = window
        claimed.append(_replay_queue_life(store, clock, seed))
        store.close()
    assert claimed[0] == claimed[1]
    assert sum(map(len, claimed[0])) > 10  # the life claimed something


@pytest.mark.postgres
def test_the_head_first_claim_agrees_with_reading_every_due_delivery_on_postgres(pg_url: str) -> None:
    claimed = []
    for window in (1, 10**6):
        clock = FakeClock()
        store = open_store(pg_url, clock=clock)
        store.claim_window = window
        claimed.append(_replay_queue_life(store, clock, seed=7))
        with store._tx() as conn:  # the next life starts on an empty schema
            store._q(conn, "DELETE FROM delivery_patients")
            store._q(conn, "DELETE FROM audit_events")
            store._q(conn, "DELETE FROM deliveries")
        store.close()
    assert claimed[0] == claimed[1] and sum(map(len, claimed[0])) > 10


def test_a_claim_costs_the_same_whatever_the_backlog(tmp_path: Path) -> None:
    # SQLite's virtual-machine steps, counted by its progress handler: a claim read and sorted every due
    # delivery (1.5 µs each; 30 ms per claim at 20,000 queued). Now it reads the head of the queue.
    steps = [0]

    def count(conn: sqlite3.Connection) -> None:
        conn.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 100)

    cost = {}
    for backlog in (200, 2000):
        store = open_store(f"sqlite:///{tmp_path}/outbox-{backlog}.db", on_connect=count)
        for i in range(backlog):  # a yearly delivery waiting in the outbox, plus a few live posts
            key = f"bulk|job|{i}" if i % 50 else f"post-{i}"
            store.enqueue(
                provider="ura:1", registry="dica", sender="ehr", payload=b"{}", idempotency_key=key,
                patient_keys=[f"p{i}"],
            )
        steps[0] = 0
        for _ in range(5):
            assert len(store.claim_batch("w", limit=8, lease_seconds=30)) == 8
        cost[backlog] = steps[0]
        store.close()
    assert cost[2000] < 1.5 * cost[200], cost


def test_the_newest_delivery_of_a_deliverys_patients(store: Store) -> None:
    """What a Bundle known by its content, posted again, is compared with (`Runtime._latest_version`)."""
    a = put(store, "a", patient="p1")
    b, _ = store.enqueue(provider="ura:1", registry="dica", sender="ehr", payload=b"{}", idempotency_key="b",
                         patient_keys=["p2", "p1"])
    c = put(store, "c", patient="p1")
    elsewhere = put(store, "d", patient="p1", registry="nkr")  # another registry's is not newer here
    lone = put(store, "e")
    assert store.newest_of_patients(a).id == c
    while batch := store.claim_batch("w", limit=10, lease_seconds=30):  # in patient order: a, b, then c
        for d in batch:
            if d.id == c:
                assert store.mark_dead(c, "w", "refused", registry_status=422)
            else:
                assert store.mark_delivered(d.id, "w", registry_status=200)
    assert store.newest_of_patients(a).id == b  # a dead one never reached the registry; b carries p1 second
    assert store.newest_of_patients(elsewhere).id == elsewhere
    assert store.newest_of_patients(lone) is None


@pytest.mark.postgres
def test_postgres_options_may_set_several_parameters(pg_url: str) -> None:
    """`options=-csearch_path=x -cstatement_timeout=...`: the URL was passed on with the space as "+", which
    libpq does not read as a space: the schema became "x+-cstatement_timeout=...", and nothing was found."""
    store = open_store(pg_url + "%20-cstatement_timeout%3D4321")
    with store._conn() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "4321ms"
    assert store.schema_version() == LATEST  # migrated into the schema of search_path
    store.close()


@pytest.mark.postgres
def test_postgres_gateways_in_other_schemas_do_not_wait_on_each_others_claims(pg_url: str) -> None:
    import psycopg

    schema = pg_url.rsplit("%3D", 1)[1]
    other_url = pg_url.replace(schema, schema + "_b")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}_b"')
    mine, other = open_store(pg_url), open_store(other_url)
    try:
        put(other, "k")
        with mine._tx() as claiming:  # a claim of this schema's gateway, not yet committed
            mine.dialect.lock_claims(claiming)
            done = threading.Event()
            worker = threading.Thread(target=lambda: other.claim_batch("w", 5, 30) and done.set())
            worker.start()
            worker.join(timeout=10)
            assert done.is_set()  # the other schema's claim did not wait for this one
    finally:
        mine.close()
        other.close()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}_b" CASCADE')
