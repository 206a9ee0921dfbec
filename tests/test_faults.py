"""Faults are survived without loss (issue 6, item 2), against real servers on 127.0.0.1.

Every fault is real or injected at a real server, and named where it is injected:
- TTP down: the TTP's uvicorn server is stopped (and later started again on the same port).
- TTP slow: FAULT INJECTION, `SlowTTP` wraps the real TTP ASGI app and holds each request before it runs.
- registry down: FAULT INJECTION at the real receiver (`POST /_faults`), and the receiver server stopped.
- store locked: a second SQLite connection holds the write lock (as another process would).
- disk full: FAULT INJECTION through `open_store(on_connect=...)`: the file may not grow (max_page_count).
- store failing for reads too: FAULT INJECTION through the same hook: every statement is interrupted.
- SIGKILL / SIGTERM: the gateway as a real OS process (tests/processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import ClientConfig, GatewayConfig, ProviderConfig, RegistryConfig, Settings, TTPConfig
from gateway.deid.leakscan import scan
from gateway.keys import init_keys
from gateway.receiver.app import create_receiver_app
from gateway.runtime import Runtime, build_runtime
from gateway.service.app import create_app
from gateway.service.auth import hash_api_key
from gateway.serving import free_port, serve_in_thread
from gateway.store import Store, open_store
from gateway.ttp.app import create_app as create_ttp_app
from gateway.ttp.auth import TTPAuth, hash_key
from gateway.ttp.client import HttpTTPClient
from gateway.ttp.keystore import init_keys as init_ttp_keys
from tests.processes import PROVIDER, process_chain
from tests.soak.common import (
    REGISTRY,
    account,
    delivery_id_of,
    opened_store,
    post_until_accepted,
    receiver_accepted,
    variant,
    wait_drained,
)
from tests.soak.kill import run_kill_soak

MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"
TTP_TIMEOUT = 0.5  # the gateway's TTP client timeout in this module: small, so the slow-TTP test is quick
TTP_RETRIES = 3  # HttpTTPClient's default
TTP_CONCURRENCY = 4


# -- fault injection at real servers ----------------------------------------------------------------------


class SlowTTP:
    """FAULT INJECTION: wraps the real TTP ASGI app; while `delay` > 0 each POST is held that long before the
    TTP sees it. Counts POSTs in flight (from arrival until answered or the caller hung up), so the test can
    see how many the gateway keeps open at once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def reset_counts(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        counted = [True]

        def done() -> None:
            with self._lock:
                if counted[0]:
                    counted[0] = False
                    self.in_flight -= 1

        async def answering(message: dict) -> None:
            # out of flight before the answer's last byte leaves: the caller may send its next request on
            # it before this task runs again, and that one was counted on top (a flaky 5 of 4)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done()
            await send(message)

        try:
            await self._held(scope, receive, answering)
        finally:
            done()

    async def _held(self, scope: dict, receive: Any, send: Any) -> None:
        buffered = []
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if self.delay > 0:
            hangup = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({hangup}, timeout=self.delay)
            if done:
                return  # the gateway gave up on this request (timeout): nothing to answer
            hangup.cancel()

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


class Restartable:
    """A real uvicorn server that can be stopped and started again on the same port (same keys, same data)."""

    def __init__(self, make_app: Any) -> None:
        self.make_app = make_app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cm: Any = None

    def start(self) -> None:
        self._cm = serve_in_thread(self.make_app(), port=self.port)
        self._cm.__enter__()

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None


class DiskFull:
    """FAULT INJECTION via `open_store(on_connect=...)`: while `full`, no store connection may grow the file
    (PRAGMA max_page_count = current size), which SQLite reports as SQLITE_FULL, as on a full disk. The
    file's free pages are taken first (a filler table, emptied again afterwards): a write that fits in pages
    freed earlier would otherwise succeed, and whether it did hung on the size of earlier payloads."""

    def __init__(self) -> None:
        self.conns: list[sqlite3.Connection] = []
        self.full = False
        self._normal: int | None = None

    def __call__(self, conn: sqlite3.Connection) -> None:
        if self._normal is None:
            self._normal = conn.execute("PRAGMA max_page_count").fetchone()[0]
        self.conns.append(conn)
        if self.full:
            self._cap(conn)

    def set(self, full: bool) -> None:
        self.full = full
        live = [c for c in self.conns if _open(c)]
        if live:
            _fill_free_pages(live[0], full)
        for conn in self.conns:
            with contextlib.suppress(sqlite3.ProgrammingError):  # a connection the pool has closed
                if full:
                    self._cap(conn)
                else:
                    conn.execute(f"PRAGMA max_page_count = {self._normal}")

    @staticmethod
    def _cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    def interrupt(self, on: bool) -> None:
        """FAULT INJECTION: every statement on the gateway's store connections is interrupted (SQLite raises
        OperationalError, as for an I/O error): reads fail too, not only writes."""
        for conn in self.conns:
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.set_progress_handler((lambda: 1) if on else None, 1)


def _open(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:  # closed by the pool
        return False
    return True


def _fill_free_pages(store_conn: sqlite3.Connection, full: bool) -> None:
    """Take every free page of the store's file into a filler table (`full`), or give them back."""
    path = store_conn.execute("PRAGMA database_list").fetchone()[2]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS fault_disk_filler (b BLOB)")
        if not full:
            conn.execute("DELETE FROM fault_disk_filler")
            return
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        while (free := conn.execute("PRAGMA freelist_count").fetchone()[0]) > 0:
            conn.execute("INSERT INTO fault_disk_filler VALUES (zeroblob(?))", (max(free // 2, 1) * size,))


# -- the chain in this process: real TTP, receiver and gateway under uvicorn -----------------------------


@dataclass
class FaultChain:
    url: str
    ttp: Restartable
    slow: SlowTTP
    receiver: Restartable
    runtime: Runtime
    store: Store
    db_path: Path
    disk: DiskFull
    ehr_key: str
    work_dir: Path

    def post(self, body: bytes, *, headers: dict[str, str] | None = None,
             timeout: float = 60) -> httpx.Response:
        h = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {self.ehr_key}",
             **(headers or {})}
        url = f"{self.url}/registries/{REGISTRY}/Bundle"
        return httpx.post(url, content=body, headers=h, timeout=timeout)

    def footprint(self) -> tuple[int, int]:
        """(deliveries, audit lines) as committed in the file, read through a connection of our own."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return (conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0],
                    conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])

    def on_disk(self) -> dict[str, int]:
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return dict(conn.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall())


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultChain]:
    work = tmp_path_factory.mktemp("faults")
    ttp_secret, ehr_secret = os.urandom(24).hex(), os.urandom(24).hex()
    ttp_keys = init_ttp_keys(work / "ttp-keys", [REGISTRY])
    ttp_auth = TTPAuth.from_entries([{"name": "gateway", "role": "provider", "provider": PROVIDER,
                                      "key_sha256": hash_key(ttp_secret)}])
    init_keys(work / "keys", [PROVIDER])
    slow_holder: dict[str, SlowTTP] = {}

    def make_ttp() -> SlowTTP:  # a restarted TTP keeps the same keys and the same fault switch
        slow = slow_holder.setdefault("slow", SlowTTP(None))
        slow.app = create_ttp_app(ttp_keys, ttp_auth)
        return slow

    ttp = Restartable(make_ttp)
    receiver = Restartable(lambda: create_receiver_app(work / "receiver", scan=scan, test_faults=True))
    ttp.start()
    receiver.start()
    db_path = work / "gateway.db"
    disk = DiskFull()
    # busy_timeout 300 ms: "locked beyond busy_timeout" is reached quickly
    store = open_store(f"sqlite:///{db_path}?busy_timeout=300", on_connect=disk)
    config = GatewayConfig(
        providers=[ProviderConfig(id=PROVIDER, name="Test hospital", mrn_system=MRN_SYSTEM)],
        clients=[ClientConfig(id="ehr", provider=PROVIDER, api_key_sha256=hash_api_key(ehr_secret),
                              registries=[REGISTRY])],
        registries={REGISTRY: RegistryConfig(profile=REGISTRY, endpoint=receiver.url, timeout_seconds=5)},
        ttp=TTPConfig(url=ttp.url, timeout_seconds=TTP_TIMEOUT, max_concurrency=TTP_CONCURRENCY),
    )
    settings = Settings(store_url=f"sqlite:///{db_path}", key_dir=work / "keys", worker_poll_seconds=0.05,
                        worker_lease_seconds=10)
    ttp_client = HttpTTPClient(ttp.url, ttp_secret, timeout=TTP_TIMEOUT, max_concurrency=TTP_CONCURRENCY,
                               retries=TTP_RETRIES)
    runtime = build_runtime(config, settings, ttps={PROVIDER: (ttp_client, ttp.url)}, store=store)
    try:
        with serve_in_thread(create_app(runtime)) as url:
            yield FaultChain(url, ttp, slow_holder["slow"], receiver, runtime, store, db_path, disk,
                             ehr_secret,
                             work)
    finally:
        receiver.stop()
        ttp.stop()


def _outcome(response: httpx.Response) -> dict:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body


def _fresh(n: int, group: int | None = None, run: str = "f") -> bytes:
    return variant(n, n if group is None else group, run=run)


def _delivered(chain: FaultChain, response: httpx.Response, timeout: float = 30.0) -> Any:
    delivery_id = delivery_id_of(response)
    assert delivery_id, response.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = chain.store.get(delivery_id)
        if d is not None and d.status in ("delivered", "dead"):
            return d
        time.sleep(0.05)
    raise AssertionError(f"delivery {delivery_id} not finished in {timeout} s")


# -- TTP --------------------------------------------------------------------------------------------------


def test_ttp_down_is_503_with_retry_after_nothing_stored_and_recovers(chain: FaultChain) -> None:
    first = chain.post(_fresh(1, run="ttpdown"))
    assert first.status_code == 200, first.text  # the chain works before the fault
    before = chain.footprint()
    chain.ttp.stop()  # the TTP server is really gone: connection refused on its port
    try:
        started = time.monotonic()
        down = chain.post(_fresh(2, run="ttpdown"))
        took = time.monotonic() - started
        assert down.status_code == 503, down.text
        assert int(down.headers["Retry-After"]) > 0
        assert _outcome(down)["issue"][0]["code"] == "transient"
        assert took < 30, "connection refused must fail fast, not hang"
        assert chain.footprint() == before, "nothing stored: no delivery row, no audit line"
        # the gateway keeps serving: liveness, metadata and status queries answer; readiness names the TTP
        assert httpx.get(f"{chain.url}/healthz").status_code == 200
        assert httpx.get(f"{chain.url}/metadata").status_code == 200
        status = httpx.get(chain.url + first.headers["Content-Location"],
                           headers={"Authorization": f"Bearer {chain.ehr_key}"})
        assert status.status_code == 200 and status.json()["status"] == "delivered"
        ready = httpx.get(f"{chain.url}/readyz", timeout=30)
        assert ready.status_code == 503 and f"ttp:{PROVIDER}" in ready.json()["problems"]
    finally:
        chain.ttp.start()
    again = chain.post(_fresh(2, run="ttpdown"))  # the EHR re-posts the same bundle after Retry-After
    assert again.status_code == 200, again.text
    assert _delivered(chain, again).status == "delivered"
    assert chain.footprint()[0] == before[0] + 1
    assert httpx.get(f"{chain.url}/readyz", timeout=30).status_code == 200


def test_slow_ttp_is_bounded_by_timeout_and_concurrency_without_pile_up(chain: FaultChain) -> None:
    # slower than usual but within the client timeout: everything is accepted, at most TTP_CONCURRENCY
    # requests are ever open at the TTP although 12 EHR requests come at once
    chain.slow.delay = TTP_TIMEOUT * 0.4
    chain.slow.reset_counts()
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda n: chain.post(_fresh(n, run="slowok"),
                                                         headers={"Prefer": "respond-async"}), range(12)))
        assert [a.status_code for a in answers] == [202] * 12
        assert chain.slow.max_in_flight <= TTP_CONCURRENCY
        wait_drained(chain.store, 30)  # their "delivered" audit lines must not count as the fault's footprint

        # slower than the timeout: each EHR request ends in 503 + Retry-After (never a 500, never a hang),
        # within the retry budget; requests in flight at the TTP stay bounded
        chain.slow.delay = TTP_TIMEOUT * 5
        chain.slow.reset_counts()
        before = chain.footprint()
        budget = (TTP_RETRIES + 1) * TTP_TIMEOUT + 0.2 * (2**TTP_RETRIES)  # timeouts + the backoff cap
        concurrent = TTP_CONCURRENCY  # as many EHR requests as the TTP client has slots

        def timed(n: int) -> tuple[int, float, str]:
            started = time.monotonic()
            r = chain.post(_fresh(n, run="slowbad"), timeout=120)
            return r.status_code, time.monotonic() - started, r.headers.get("Retry-After", "")

        with ThreadPoolExecutor(concurrent) as pool:
            results = list(pool.map(timed, range(concurrent)))
        assert all(status == 503 and retry for status, _, retry in results), results
        assert max(t for _, t, _ in results) < budget + 3.0, (results, budget)
        assert chain.slow.max_in_flight <= TTP_CONCURRENCY
        assert chain.footprint() == before
    finally:
        chain.slow.delay = 0.0
    assert chain.post(_fresh(99, run="slowbad")).status_code == 200  # and it recovers at once


def test_slow_ttp_many_ehr_requests_do_not_queue_past_the_retry_budget(chain: FaultChain) -> None:
    """More EHR requests than TTP client slots while the TTP is too slow: each request must still answer
    within the retry budget (a request must not wait behind others for a slot without bound)."""
    chain.slow.delay = TTP_TIMEOUT * 5
    budget = (TTP_RETRIES + 1) * TTP_TIMEOUT + 0.2 * (2**TTP_RETRIES)
    n = TTP_CONCURRENCY * 3

    def timed(i: int) -> tuple[int, float]:
        started = time.monotonic()
        r = chain.post(_fresh(i, run="pileup"), timeout=120)
        return r.status_code, time.monotonic() - started

    try:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(timed, range(n)))
    finally:
        chain.slow.delay = 0.0
    assert all(status == 503 for status, _ in results), results
    slowest = max(t for _, t in results)
    assert slowest < budget + 3.0, f"slowest {slowest:.1f} s, retry budget {budget:.1f} s: requests queue"


# -- registry down for a long time --------------------------------------------------------------------------


def test_registry_down_for_long_outbox_grows_on_disk_then_drains_in_patient_order(chain: FaultChain) -> None:
    n, groups = 24, 4
    # FAULT INJECTION at the real receiver: it answers 503 (Retry-After: 1) to every bundle for 20 s,
    # longer than max_attempts (15) times the Retry-After: a long outage, compressed
    wait_drained(chain.store, 30)
    delivered_before = chain.on_disk().get("delivered", 0)
    httpx.post(f"{chain.receiver.url}/_faults", json={"status": 503, "count": 100_000, "retry_after": "1"})
    try:
        answers = []
        for i in range(n):  # sequential: creation order is posting order, per patient group
            r = chain.post(_fresh(i, group=i % groups, run="regdown"), headers={"Prefer": "respond-async"})
            assert r.status_code == 202, r.text
            answers.append(r)
        on_disk = chain.on_disk()  # committed in the file, read through a connection of our own
        assert on_disk.get("queued", 0) + on_disk.get("delivering", 0) == n, on_disk
        time.sleep(18)
        during = chain.on_disk()
        assert during.get("delivered", 0) == delivered_before, "nothing gets through the outage"
        assert during.get("queued", 0) + during.get("delivering", 0) == n, during
    finally:
        httpx.delete(f"{chain.receiver.url}/_faults")
    depth = wait_drained(chain.store, 60)
    assert depth["queued"] == depth["delivering"] == 0, depth
    results = [post_result(a, f"regdown-{i}") for i, a in enumerate(answers)]
    figures = account_subset(chain, results)
    assert figures.lost == 0 and figures.dead == 0, figures.line()
    assert figures.out_of_order == 0, figures.order_problems


def test_registry_server_stopped_then_started_loses_nothing(chain: FaultChain) -> None:
    wait_drained(chain.store, 30)
    delivered_before = chain.on_disk().get("delivered", 0)
    chain.receiver.stop()  # connection refused: the registry's server is really down
    try:
        answers = [chain.post(_fresh(i, group=i % 2, run="regstop"), headers={"Prefer": "respond-async"})
                   for i in range(6)]
        assert [a.status_code for a in answers] == [202] * 6
        time.sleep(3)
        assert chain.on_disk().get("delivered", 0) == delivered_before
    finally:
        chain.receiver.start()
    depth = wait_drained(chain.store, 60)
    assert depth["queued"] == depth["delivering"] == 0, depth
    figures = account_subset(chain, [post_result(a, f"regstop-{i}") for i, a in enumerate(answers)])
    assert figures.lost == 0 and figures.dead == 0 and figures.out_of_order == 0, figures.line()


def test_worker_short_retry_after_does_not_use_up_its_patience(tmp_path: Path) -> None:
    """The outbox worker alone against the real receiver: a registry answering 503 + Retry-After: 0 eight
    times uses up max_attempts (3) in well under a second; the delivery must still wait out the backoff's
    own schedule (its patience) and be delivered, not dead."""
    from gateway.forward import RegistryClient
    from gateway.worker import Backoff, OutboxWorker

    backoff = Backoff(base=1.0, factor=2.0, cap=2.0, max_attempts=3)  # patience (1 + 2) * 0.5 = 1.5 s
    store = open_store(f"sqlite:///{tmp_path / 'outbox.db'}")
    delivery_id, _ = store.enqueue(provider=PROVIDER, registry=REGISTRY, sender="ehr",
                                   payload=_fresh(1, run="w"))
    with serve_in_thread(create_receiver_app(tmp_path / "recv", test_faults=True)) as receiver_url:
        # FAULT INJECTION at the real receiver
        httpx.post(f"{receiver_url}/_faults", json={"status": 503, "count": 8, "retry_after": "0"})

        async def go() -> None:
            async with RegistryClient(receiver_url) as client:
                worker = OutboxWorker(store, {REGISTRY: client}, backoff=backoff, poll_interval=0.02)
                deadline = time.monotonic() + 20
                while (store.get(delivery_id).status not in ("delivered", "dead")
                       and time.monotonic() < deadline):
                    await worker.run_once()
                    await asyncio.sleep(0.02)

        asyncio.run(go())
        final = store.get(delivery_id)
        assert final.status == "delivered", (final.status, final.attempts, final.last_error)
        assert final.attempts == 9
        assert sum(receiver_accepted(receiver_url).values()) == 1
    store.close()


def post_result(response: httpx.Response, key: str) -> Any:
    from tests.soak.common import PostResult

    return PostResult(key, response.status_code, delivery_id_of(response), 1, [response.status_code])


def account_subset(chain: FaultChain, results: list[Any]) -> Any:
    return account(results, chain.store, chain.receiver.url, chain.work_dir / "receiver")


# -- the store --------------------------------------------------------------------------------------------


def test_sqlite_locked_beyond_busy_timeout_is_503_nothing_half_written_and_recovers(
        chain: FaultChain) -> None:
    wait_drained(chain.store, 30)
    before = chain.footprint()
    blocker = sqlite3.connect(chain.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (longer than busy_timeout)
    try:
        locked = chain.post(_fresh(1, run="locked"))
        assert locked.status_code == 503, locked.text
        assert int(locked.headers["Retry-After"]) > 0
        assert _outcome(locked)["issue"][0]["code"] == "transient"
        # every route says so, not only the Bundle's: an objection answered 500 "nothing was stored" (a probe)
        auth = {"Authorization": f"Bearer {chain.ehr_key}"}
        objection = httpx.post(f"{chain.url}/objections", json={"patientNumber": "999911120"}, headers=auth)
        assert objection.status_code == 503 and int(objection.headers["Retry-After"]) > 0, objection.text
        assert _outcome(objection)["issue"][0]["code"] == "transient"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert chain.footprint() == before, "no row and no audit line"
    again = chain.post(_fresh(1, run="locked"))
    assert again.status_code == 200, again.text
    assert chain.footprint()[0] == before[0] + 1


def test_disk_full_is_503_nothing_half_written_and_recovers(chain: FaultChain) -> None:
    wait_drained(chain.store, 30)
    before = chain.footprint()
    chain.disk.set(True)
    try:
        full = chain.post(_fresh(1, run="full"))
        assert full.status_code == 503, full.text
        assert int(full.headers["Retry-After"]) > 0
        _outcome(full)
        assert httpx.get(f"{chain.url}/healthz").status_code == 200
    finally:
        chain.disk.set(False)
    assert chain.footprint() == before, "no row and no audit line"
    again = chain.post(_fresh(1, run="full"))
    assert again.status_code == 200, again.text
    assert _delivered(chain, again).status == "delivered"


def test_store_failing_during_the_sync_wait_after_the_commit_is_not_a_500(chain: FaultChain) -> None:
    """The bundle is committed; then, while the request waits for the delivery (no Prefer: respond-async),
    the store stops answering. The EHR must not get a 500 saying "nothing was stored": it was stored, and
    the right answer is 202 with the status URL (the delivery goes ahead once the store is back)."""
    wait_drained(chain.store, 30)
    before = chain.footprint()
    # FAULT INJECTION at the real receiver: the next bundle is answered after 2 s, so the wait is long
    httpx.post(f"{chain.receiver.url}/_faults", json={"delay": 2, "count": 1})
    answer: list[httpx.Response] = []
    poster = threading.Thread(target=lambda: answer.append(chain.post(_fresh(1, run="syncwait"))))
    poster.start()
    deadline = time.monotonic() + 20
    while chain.on_disk().get("delivering", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chain.on_disk().get("delivering", 0) == 1, "committed and in flight before the store fails"
    chain.disk.interrupt(True)
    try:
        poster.join(timeout=60)
    finally:
        chain.disk.interrupt(False)
    assert answer, "the EHR request hung"
    assert chain.footprint()[0] == before[0] + 1, "the bundle was committed"
    assert answer[0].status_code == 202, (answer[0].status_code, answer[0].text)
    assert answer[0].headers.get("Content-Location")
    assert wait_drained(chain.store, 30)["delivering"] == 0  # and it is delivered once the store is back


# -- the gateway as a real process -----------------------------------------------------------------------


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    """N bundles from 8 EHR threads, R kill -9 of the gateway at seeded random moments, restarts. Every
    bundle the EHR got a 2xx for reaches the registry; re-sends are counted apart and must not create a
    resource twice (see tests/soak/common.py for what exactly-once means here)."""
    report = run_kill_soak(tmp_path, bundles=100, kills=3, seed=20261124, drain_timeout=60)
    f = report.figures
    print(report.line())
    assert report.kills == 3 and report.restarts == 3
    assert f.posted == f.accepted == 100, f.line()
    assert f.lost == 0, (f.line(), f.lost_keys)
    assert f.delivered == 100
    assert f.duplicate_resources == 0 and f.dead == 0 and f.out_of_order == 0, f.line()
    assert report.depth_after["queued"] == report.depth_after["delivering"] == 0


@pytest.mark.postgres
def test_two_gateway_processes_on_one_postgres_store(tmp_path: Path, pg_url: str) -> None:
    n = 60
    with process_chain(tmp_path, store_url=pg_url) as pc:
        gateways = [pc.start_gateway(), pc.start_gateway()]
        # FAULT INJECTION at the real receiver: every delivery is answered after 0.3 s, so no single worker
        # can drain the outbox before the other one polls (a fast receiver let one worker take them all)
        httpx.post(f"{pc.receiver_url}/_faults", json={"delay": 0.3, "count": n}).raise_for_status()
        local = threading.local()

        def post(i: int) -> Any:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=60)
            gw = gateways[i % 2]  # alternate: both gateways accept and both workers deliver
            return post_until_accepted(local.client, f"{gw.url}/registries/{REGISTRY}/Bundle", pc.ehr_api_key,
                                       f"pg-{i}", variant(i, i % 6, run="pg"), deadline_s=60,
                                       prefer_async=i % 3 != 0)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, range(n)))
        with opened_store(pg_url) as store:
            depth = wait_drained(store, 60)
            figures = account(results, store, pc.receiver_url, tmp_path / "receiver")
            owners = {e.actor for e in store.list_audit(limit=100_000) if e.event == "delivered"}
        assert depth["queued"] == depth["delivering"] == 0, depth
        assert figures.accepted == n and figures.lost == 0, figures.line()
        # no kill, no timeout: every delivery is sent exactly once on the wire as well
        assert sorted(receiver_accepted(pc.receiver_url).values()) == [1] * n
        assert figures.resent == 0 and figures.duplicate_resources == 0 and figures.out_of_order == 0
        assert len(owners) == 2, "both gateways' workers delivered"


def test_sigterm_finishes_in_flight_deliveries(tmp_path: Path) -> None:
    with process_chain(tmp_path) as pc:
        gw = pc.start_gateway()
        # FAULT INJECTION at the real receiver: the next 3 bundles are answered (200) after 3 s
        httpx.post(f"{pc.receiver_url}/_faults", json={"delay": 3, "count": 3})
        answers = [httpx.post(f"{gw.url}/registries/{REGISTRY}/Bundle", content=variant(i, i, run="term"),
                              headers={"Content-Type": "application/fhir+json", "Prefer": "respond-async",
                                       "Authorization": f"Bearer {pc.ehr_api_key}"}, timeout=30)
                   for i in range(3)]
        assert [a.status_code for a in answers] == [202] * 3
        ids = [delivery_id_of(a) for a in answers]
        with opened_store(f"sqlite:///{tmp_path / 'gateway.db'}") as store:
            deadline = time.monotonic() + 10
            while store.depth()["delivering"] < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert store.depth()["delivering"] == 3, "the deliveries must be in flight when SIGTERM comes"
            gw.kill(signal.SIGTERM)
            assert gw.proc.returncode in (0, -signal.SIGTERM)
            finished = [store.get(i) for i in ids]
        assert [d.status for d in finished] == ["delivered"] * 3
        assert [d.attempts for d in finished] == [1] * 3  # finished by the stopping gateway, not re-sent
        assert sorted(receiver_accepted(pc.receiver_url).values()) == [1, 1, 1]
        stopped = [orjson.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
        assert any(line["msg"].startswith("gateway stopped") for line in stopped)


def test_gateway_restarted_during_a_ttp_outage_still_drains_its_outbox(tmp_path: Path) -> None:
    import yaml

    with process_chain(tmp_path) as pc:
        short_lease = {"FHIR_GATEWAY_WORKER_LEASE_SECONDS": "2"}  # the kill may strand one in flight
        gw = pc.start_gateway(extra_env=short_lease)
        # FAULT INJECTION at the real receiver: hold the deliveries in the outbox for now
        httpx.post(f"{pc.receiver_url}/_faults", json={"status": 503, "count": 1000, "retry_after": "1"})
        for i in range(3):
            r = httpx.post(f"{gw.url}/registries/{REGISTRY}/Bundle", content=variant(i, i, run="ttpstart"),
                           headers={"Content-Type": "application/fhir+json", "Prefer": "respond-async",
                                    "Authorization": f"Bearer {pc.ehr_api_key}"}, timeout=30)
            assert r.status_code == 202
        gw.kill(signal.SIGKILL)
        config = yaml.safe_load(pc.config_path.read_text())
        config["ttp"]["url"] = f"http://127.0.0.1:{free_port()}"  # the TTP is down: nothing listens there
        pc.config_path.write_text(yaml.safe_dump(config))
        httpx.delete(f"{pc.receiver_url}/_faults")  # the registry is back
        gw = pc.start_gateway(extra_env=short_lease)
        assert httpx.get(f"{gw.url}/readyz", timeout=30).status_code == 503
        post = httpx.post(f"{gw.url}/registries/{REGISTRY}/Bundle", content=variant(9, 9, run="ttpstart"),
                          headers={"Content-Type": "application/fhir+json",
                                   "Authorization": f"Bearer {pc.ehr_api_key}"}, timeout=60)
        assert post.status_code == 503 and "Retry-After" in post.headers
        with opened_store(f"sqlite:///{tmp_path / 'gateway.db'}") as store:
            depth = wait_drained(store, 30)
        assert depth["delivered"] == 3 and depth["queued"] == depth["delivering"] == 0


def test_overload_is_answered_429_at_once_instead_of_queueing(chain: FaultChain) -> None:
    """Back-pressure: with max_inflight_bundles posts in progress (synchronous posts waiting for a slow
    registry), the next post is answered 429 + Retry-After straight away (an OperationOutcome, nothing
    stored); once they finish, the EHR's retry is accepted."""
    settings = chain.runtime.settings
    # FAULT INJECTION at the real receiver: the next 2 deliveries are answered after 3 s
    httpx.post(f"{chain.receiver.url}/_faults", json={"delay": 3, "count": 2}).raise_for_status()
    settings.max_inflight_bundles = 2
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(chain.post, _fresh(n, run="busy")) for n in (1, 2)]  # sync: they wait
            deadline = time.monotonic() + 10
            while chain.store.depth()["delivering"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert chain.store.depth()["delivering"] == 2, "both are stored and held at the registry"
            before = chain.footprint()
            refused = chain.post(_fresh(3, run="busy"))
            assert refused.status_code == 429, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert _outcome(refused)["issue"][0]["code"] == "throttled"
            assert chain.footprint() == before, "a refused post stores nothing"
            assert all(f.result().status_code in (200, 202) for f in held)
        again = chain.post(_fresh(3, run="busy"))  # the EHR posts again after Retry-After
        assert again.status_code == 200, again.text
    finally:
        settings.max_inflight_bundles = 64
    wait_drained(chain.store, 30)


def test_the_order_check_counts_posts_that_followed_each_other_not_ones_that_overlapped() -> None:
    """Two overlapping posts for one patient have no order of their own (on PostgreSQL the later sequence
    number can commit, and be delivered, first: CI saw it); one sent after the other was accepted has."""
    from types import SimpleNamespace

    from tests.soak.common import order_problems

    rows = [SimpleNamespace(id=d, patient_order_key="p1") for d in ("a", "b")]  # creation order: a, b
    identifier_of = {"a": "A", "b": "B"}
    swapped = [{"identifier": "B"}, {"identifier": "A"}]  # b arrived first
    assert order_problems(rows, identifier_of, swapped) == ["p1: delivery #0 arrived after #1"]
    one_after_the_other = {"A": (0.0, 1.0), "B": (2.0, 3.0)}
    assert order_problems(rows, identifier_of, swapped, one_after_the_other) == [
        "p1: delivery #0 arrived after #1"
    ]
    overlapping = {"A": (0.0, 3.0), "B": (1.0, 2.0)}
    assert order_problems(rows, identifier_of, swapped, overlapping) == []
    assert order_problems(rows, identifier_of, list(reversed(swapped)), one_after_the_other) == []
