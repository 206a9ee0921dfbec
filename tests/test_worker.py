"""The outbox worker end to end: store → worker → RegistryClient → the real receiver under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.forward import RegistryClient
from gateway.metrics import GatewayMetrics
from gateway.receiver import create_receiver_app
from gateway.store import Store, open_store
from gateway.worker import Backoff, OutboxWorker
from tests.servers import serve
from tests.test_receiver import make_bundle

FAST = Backoff(base=0.05, factor=2.0, cap=0.2, max_attempts=5)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    with serve(create_receiver_app(tmp_path / "recv", test_faults=True)) as base:
        yield base


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/outbox.db")
    yield s
    s.close()


def enqueue(store: Store, n: int, patient: str = "p1", registry: str = "dica") -> str:
    delivery_id, _ = store.enqueue(
        provider="ura:1",
        registry=registry,
        sender="ehr",
        idempotency_key=f"k{n}",
        payload=orjson.dumps(make_bundle(n, patient)),
        patient_order_key=patient,
        counts={"resources": 3},
        pseudonym_types=["SNGGV"],
    )
    return delivery_id


def accepted(base: str) -> dict[str, int]:
    return httpx.get(f"{base}/_accepted").json()


async def drain(worker: OutboxWorker, store: Store, timeout: float = 20.0) -> None:
    """Run the worker until nothing is queued or in flight."""
    deadline = time.monotonic() + timeout
    while True:
        await worker.run_once()
        depth = store.depth()
        if depth["queued"] == 0 and depth["delivering"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox not drained: {depth}")
        await asyncio.sleep(0.02)


def run(coro_fn) -> None:
    asyncio.run(coro_fn())


def test_503_then_200_is_delivered_exactly_once(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 503})
    d = enqueue(store, 1)
    metrics = GatewayMetrics.create(CollectorRegistry())

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(
                store, {"dica": client}, owner="w1", backoff=FAST, metrics=metrics, rng=random.Random(1)
            )
            assert await worker.run_once() == 1
            waiting = store.get(d)
            assert waiting.status == "queued" and waiting.registry_status == 503 and waiting.attempts == 1
            assert "test fault injection" in waiting.last_error
            await drain(worker, store)

    run(go)
    done = store.get(d)
    assert done.status == "delivered" and done.attempts == 2 and done.last_error is None
    assert accepted(receiver) == {"urn:test:delivery|d-1": 1}
    assert [(e.event, e.registry_status) for e in store.list_audit(delivery_id=d)] == [
        ("retry", 503),
        ("delivered", 200),
    ]
    reg = metrics.registry
    assert (
        reg.get_sample_value(
            "gateway_outbox_delivery_attempts_total", {"registry": "dica", "outcome": "delivered"}
        )
        == 1
    )
    assert (
        reg.get_sample_value(
            "gateway_outbox_delivery_attempts_total", {"registry": "dica", "outcome": "retry"}
        )
        == 1
    )


def test_429_retry_after_is_honoured(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 429, "retry_after": "1"})
    d = enqueue(store, 1)

    async def go() -> float:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST, poll_interval=0.05)
            started = time.monotonic()
            task = asyncio.create_task(worker.run())
            while store.get(d).status != "delivered":
                assert time.monotonic() - started < 15
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
            await worker.stop()
            await task
            return elapsed

    elapsed = asyncio.run(go())
    # The backoff alone would retry after ≤0.05 s; the registry asked for 1 s and got it (roughly).
    assert elapsed >= 0.9
    assert store.get(d).attempts == 2 and accepted(receiver) == {"urn:test:delivery|d-1": 1}


def test_400_is_dead_with_the_registry_outcome(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 400, "diagnostics": "Bundle.entry[1]: unknown code"})
    d = enqueue(store, 1)

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            await OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST).run_once()

    run(go)
    dead = store.get(d)
    assert dead.status == "dead" and dead.registry_status == 400 and dead.attempts == 1
    outcome = orjson.loads(dead.last_error)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == "Bundle.entry[1]: unknown code"
    (event,) = [e for e in store.list_audit(delivery_id=d) if e.event == "dead"]
    assert (
        event.outcome == "rejected"
        and event.counts == {"resources": 3}
        and event.pseudonym_types == ("SNGGV",)
    )
    assert accepted(receiver) == {}
    # An operator fixes the cause and requeues it: delivered.
    assert store.requeue(d)

    async def again() -> None:
        async with RegistryClient(receiver) as client:
            await drain(OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST), store)

    run(again)
    assert store.get(d).status == "delivered"


def test_gives_up_after_max_attempts(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 502, "count": 10})
    d = enqueue(store, 1)

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(
                store, {"dica": client}, owner="w1", backoff=Backoff(base=0.01, cap=0.02, max_attempts=3)
            )
            await drain(worker, store)

    run(go)
    dead = store.get(d)
    assert (
        dead.status == "dead"
        and dead.attempts == 3
        and dead.last_error.startswith("gave up after 3 attempts")
    )


def test_registry_outage_then_recovery_loses_nothing_and_keeps_patient_order(
    receiver: str, store: Store
) -> None:
    ids = [enqueue(store, n, patient=f"p{n % 3}") for n in range(12)]
    httpx.post(f"{receiver}/_faults", json={"status": 503, "count": 8})

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            await drain(OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST, concurrency=4), store)

    run(go)
    assert all(store.get(i).status == "delivered" for i in ids)
    assert accepted(receiver) == {f"urn:test:delivery|d-{n}": 1 for n in range(12)}
    order = [r["identifier"] for r in httpx.get(f"{receiver}/deliveries").json()]
    for p in range(3):  # each patient's bundles arrived in the order they were accepted
        mine = [o for o in order if int(o.rsplit("-", 1)[1]) % 3 == p]
        assert mine == sorted(mine, key=lambda o: int(o.rsplit("-", 1)[1]))


def test_stop_finishes_in_flight_deliveries(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": None, "delay": 0.6})  # a slow registry, then a 200
    d = enqueue(store, 1)

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST, poll_interval=0.05)
            task = asyncio.create_task(worker.run())
            while store.get(d).status != "delivering":
                await asyncio.sleep(0.01)
            await worker.stop()  # while the registry is still answering
            assert task.done() or await asyncio.wait_for(task, 1) is None

    run(go)
    assert store.get(d).status == "delivered"


def test_killed_workers_lease_expires_and_another_worker_delivers(receiver: str, store: Store) -> None:
    d = enqueue(store, 1)
    (claimed,) = store.claim_batch("killed-worker", limit=1, lease_seconds=0.3)  # then the process dies

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="w2", backoff=FAST, lease_seconds=30)
            assert await worker.run_once() == 0  # still leased
            await asyncio.sleep(0.4)
            assert await worker.run_once() == 1

    run(go)
    done = store.get(d)
    assert claimed.id == d and done.status == "delivered" and done.attempts == 2
    assert not store.mark_delivered(d, "killed-worker")  # a late result of the dead worker is ignored
    assert accepted(receiver) == {"urn:test:delivery|d-1": 1}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    return request.getfixturevalue("pg_url")


def test_two_workers_on_one_store_never_deliver_twice(receiver: str, shared_url: str) -> None:
    setup = open_store(shared_url)
    total = 60
    for n in range(total):
        enqueue(setup, n, patient=f"p{n % 11}")

    def worker_process(owner: str) -> None:
        """One worker 'process': its own store connection pool, event loop and HTTP client."""

        async def go() -> None:
            store = open_store(shared_url)
            async with RegistryClient(receiver) as client:
                worker = OutboxWorker(
                    store, {"dica": client}, owner=owner, backoff=FAST, concurrency=3, poll_interval=0.02
                )
                task = asyncio.create_task(worker.run())
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    depth = store.depth()
                    if depth["delivered"] == total:
                        break
                    await asyncio.sleep(0.05)
                await worker.stop()
                await task
            store.close()

        asyncio.run(go())

    threads = [threading.Thread(target=worker_process, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    counts = accepted(receiver)
    assert counts == {f"urn:test:delivery|d-{n}": 1 for n in range(total)}  # every bundle exactly once
    assert len(httpx.get(f"{receiver}/deliveries").json()) == total
    owners = {e.actor for e in setup.list_audit(limit=1000) if e.event == "delivered"}
    assert owners == {"w0", "w1"}  # both really took part
    setup.close()


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(base=1.0, factor=2.0, cap=30.0, jitter=0.5)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(1, 9)]
    for n, d in enumerate(delays, start=1):
        full = min(30.0, 2.0 ** (n - 1))
        assert full * 0.5 <= d <= full
    assert max(delays) <= 30.0


def test_lease_is_renewed_while_a_slow_registry_answers(receiver: str, store: Store) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": None, "delay": 1.0})
    d = enqueue(store, 1)

    async def go() -> list:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="slow", backoff=FAST, lease_seconds=0.3)
            sending = asyncio.create_task(worker.run_once())
            stolen = []
            for _ in range(8):  # another worker keeps trying while the first is still sending
                await asyncio.sleep(0.1)
                stolen += await asyncio.to_thread(store.claim_batch, "thief", 1, 30)
            await sending
            return stolen

    assert asyncio.run(go()) == []
    done = store.get(d)
    assert done.status == "delivered" and done.attempts == 1
    assert accepted(receiver) == {"urn:test:delivery|d-1": 1}


def test_logs_and_errors_carry_no_payload(
    receiver: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    httpx.post(f"{receiver}/_faults", json=[{"status": 503}, {"status": 400}])
    d1, d2 = enqueue(store, 1, patient="secretpatient"), enqueue(store, 2, patient="otherpatient")

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            await drain(OutboxWorker(store, {"dica": client}, owner="w1", backoff=FAST), store)

    run(go)
    text = caplog.text + " ".join(str(store.get(i).last_error) for i in (d1, d2))
    text += " ".join(str(e.detail) for e in store.list_audit())
    for marker in ("secretpatient", "otherpatient", "80.1", "weight", "v1.AAAA"):
        assert marker not in text


def test_a_slow_registry_does_not_hold_up_another(tmp_path: Path, store: Store) -> None:
    slow_app = create_receiver_app(tmp_path / "slow", test_faults=True)
    with serve(slow_app) as slow, serve(create_receiver_app(tmp_path / "fast")) as fast:
        httpx.post(f"{slow}/_faults", json={"status": None, "delay": 2.0})
        s = enqueue(store, 0, patient="a", registry="slow")
        quick = [enqueue(store, n, patient=f"b{n}", registry="fast") for n in range(1, 7)]

        async def go() -> float:
            async with RegistryClient(slow) as c_slow, RegistryClient(fast) as c_fast:
                worker = OutboxWorker(
                    store,
                    {"slow": c_slow, "fast": c_fast},
                    owner="w",
                    backoff=FAST,
                    concurrency=2,
                    poll_interval=0.05,
                )
                started = time.monotonic()
                task = asyncio.create_task(worker.run())
                while any(store.get(q).status != "delivered" for q in quick):
                    await asyncio.sleep(0.02)
                fast_done = time.monotonic() - started
                assert store.get(s).status == "delivering"  # still waiting for the slow registry
                await worker.stop()
                await task
                return fast_done

        assert asyncio.run(go()) < 2.0
        assert store.get(s).status == "delivered"  # stop() waited for it


def test_the_loop_survives_a_store_outage(tmp_path: Path, receiver: str) -> None:
    import sqlite3

    store = open_store(f"sqlite:///{tmp_path}/o.db?busy_timeout=50")
    d = enqueue(store, 1)
    blocker = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: claims fail for a while

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="w", backoff=FAST, poll_interval=0.05)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.4)
            assert store.get(d).status == "queued" and not task.done()
            blocker.execute("ROLLBACK")
            while store.get(d).status != "delivered":
                await asyncio.sleep(0.02)
            await worker.stop()
            await task

    try:
        asyncio.run(asyncio.wait_for(go(), 20))
    finally:
        blocker.close()
        store.close()
    assert accepted(receiver) == {"urn:test:delivery|d-1": 1}


def test_gateway_restart_during_a_registry_outage_loses_nothing(tmp_path: Path, receiver: str) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    first = open_store(url)
    ids = [enqueue(first, n, patient=f"p{n}") for n in range(5)]
    httpx.post(f"{receiver}/_faults", json={"status": 503, "count": 1000})

    async def outage() -> None:
        async with RegistryClient(receiver) as client:
            patient = Backoff(base=0.05, cap=0.2, max_attempts=1000)  # an outage must not make them dead
            worker = OutboxWorker(
                first,
                {"dica": client},
                owner="before",
                backoff=patient,
                poll_interval=0.02,
                lease_seconds=0.5,
            )
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.5)
            task.cancel()  # the process is killed, not stopped
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(outage())
    first.close()
    assert accepted(receiver) == {}
    httpx.delete(f"{receiver}/_faults")  # the registry is back

    second = open_store(url)  # the gateway starts again

    async def after() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(second, {"dica": client}, owner="after", backoff=FAST)
            await asyncio.sleep(0.6)  # leases of deliveries that were in flight at the kill run out
            await drain(worker, second)

    asyncio.run(after())
    assert all(second.get(i).status == "delivered" for i in ids)
    assert accepted(receiver) == {f"urn:test:delivery|d-{n}": 1 for n in range(5)}
    second.close()


def test_killed_mid_delivery_the_registry_ends_up_with_one_copy(tmp_path: Path, receiver: str) -> None:
    store = open_store(f"sqlite:///{tmp_path}/outbox.db")
    d = enqueue(store, 1)
    httpx.post(f"{receiver}/_faults", json={"status": None, "delay": 0.5})

    async def crash() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="victim", backoff=FAST, lease_seconds=0.6)
            task = asyncio.create_task(worker.run())
            while store.get(d).status != "delivering":
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            task.cancel()  # killed while the request is on the wire
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(crash())
    assert store.get(d).status == "delivering"  # nobody recorded an outcome

    async def recover() -> None:
        async with RegistryClient(receiver) as client:
            await asyncio.sleep(0.7)
            await drain(OutboxWorker(store, {"dica": client}, owner="survivor", backoff=FAST), store)

    asyncio.run(recover())
    assert store.get(d).status == "delivered"
    # The registry may have seen the bundle twice (sent, then the answer was lost), but PUT upserts keep one
    # copy of every resource; the receipt counter shows how often it arrived.
    assert accepted(receiver)["urn:test:delivery|d-1"] in (1, 2)
    patient = httpx.get(f"{receiver}/Patient/p1").json()
    assert patient["id"] == "p1" and len(httpx.get(f"{receiver}/deliveries").json()) in (1, 2)
    store.close()


def test_payloads_past_retention_are_emptied_while_idle(receiver: str, store: Store) -> None:
    d = enqueue(store, 1)

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(
                store, {"dica": client}, owner="w", backoff=FAST, poll_interval=0.05, payload_retention=0.2
            )
            task = asyncio.create_task(worker.run())
            deadline = time.monotonic() + 15
            while store.get(d, with_payload=True).payload != b"":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await worker.stop()
            await task

    asyncio.run(go())
    done = store.get(d, with_payload=True)
    assert done.status == "delivered" and done.payload == b"" and done.counts == {"resources": 3}


def test_a_store_the_worker_cannot_reach_is_counted_and_said_once_not_every_poll(
    tmp_path: Path, receiver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe: with the store down, the worker's metrics kept the last outbox depth with nothing to say it
    was stale, and its log had a warning every 0.2 s."""
    import sqlite3

    store = open_store(f"sqlite:///{tmp_path}/locked.db?busy_timeout=20")
    metrics = GatewayMetrics.create(CollectorRegistry())
    blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: every claim fails

    async def go() -> None:
        async with RegistryClient(receiver) as client:
            worker = OutboxWorker(store, {"dica": client}, owner="w", poll_interval=0.02, metrics=metrics)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.6)
            await worker.stop()
            await task

    try:
        with caplog.at_level("WARNING", logger="gateway.worker"):
            run(go)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()
    assert metrics.registry.get_sample_value("gateway_outbox_store_errors_total") >= 5
    said = [r for r in caplog.records if "outbox store unavailable" in r.getMessage()]
    assert len(said) == 1
