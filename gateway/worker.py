"""The outbox worker: claim due deliveries, send them, record the outcome. Run one or many (processes or
hosts) against one store: leases keep them apart, and a killed worker's leases expire so another picks up
its deliveries.

Delivery is at-least-once on the wire (a lost answer or an expired lease means sending again) and
exactly-once in effect because the gateway sends PUT entries with stable ids and a stable Bundle.identifier,
which the registry upserts. While a delivery is on the wire its lease is renewed every third of
`lease_seconds`, so a slow registry does not make a second worker send it too; `lease_seconds` is how long
the deliveries of a killed worker wait before another worker takes them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.forward import Attempt, RegistryClient
from gateway.metrics import GatewayMetrics
from gateway.store import AsyncStore, AuditInput, Delivery, Store, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter from the attempts count; a Retry-After from the registry wins."""

    base: float = 2.0
    factor: float = 2.0
    cap: float = 900.0
    max_attempts: int = 15  # with the defaults about 2.5 hours of trying before a delivery is dead
    jitter: float = 0.5  # this share of each delay is random, so retries of many deliveries spread out

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        full = min(self.cap, self.base * self.factor ** max(0, attempts - 1))
        r = (rng or random).random()
        return full * (1.0 - self.jitter) + full * self.jitter * r

    def patience(self) -> float:
        """The shortest time this schedule takes to use up `max_attempts`. A delivery is given up only after
        trying at least this long: a registry that answers 503 with a short Retry-After uses up attempts in
        seconds, and an outage of a minute must not turn its deliveries into dead letters."""
        delays = (
            min(self.cap, self.base * self.factor ** max(0, a - 1)) for a in range(1, self.max_attempts)
        )
        return sum(delays) * (1.0 - self.jitter)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{id(object()):x}"


class OutboxWorker:
    def __init__(
        self,
        store: Store | AsyncStore,
        clients: Mapping[str, RegistryClient],
        *,
        owner: str | None = None,
        poll_interval: float = 1.0,
        lease_seconds: float = 120.0,
        concurrency: int = 4,
        backoff: Backoff | None = None,
        metrics: GatewayMetrics | None = None,
        rng: random.Random | None = None,
        payload_retention: float | None = None,
        on_recorded: Callable[[str], None] | None = None,
    ) -> None:
        """`payload_retention` (seconds): when set, the payloads of deliveries delivered longer ago are
        emptied while idle (data minimisation; the row, its counts and the audit trail stay).
        `on_recorded(delivery_id)` is called once an attempt's outcome is committed (sync answers wait
        for it instead of polling the store)."""
        self.store = store if isinstance(store, AsyncStore) else AsyncStore(store)
        self.clients = dict(clients)
        self.owner = owner or default_owner()
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.concurrency = max(1, concurrency)
        self.backoff = backoff or Backoff()
        self.metrics = metrics
        self._rng = rng
        self.payload_retention = payload_retention
        self._next_purge = 0.0
        self._quiet_until = 0.0  # the store-unavailable warning is logged at most every 30 s
        self.on_recorded = on_recorded
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._woken = asyncio.Event()
        self._running = False

    def wake(self) -> None:
        """A delivery was just committed by this process (call on the worker's loop): claim it now rather
        than at the next poll, so a synchronous post is not answered a poll interval late. Deliveries
        committed elsewhere (another gateway process, a bulk job) are found by the poll."""
        self._woken.set()

    async def run_once(self) -> int:
        """Claim one batch (at most `concurrency`), deliver it concurrently, record outcomes; returns the
        number of deliveries handled. Only claims what it can send right away, so leases do not run out
        while deliveries wait for a slot."""
        if not self.clients:
            return 0
        batch = await self._claim(self.concurrency)
        await asyncio.gather(*(self._handle(d) for d in batch))
        return len(batch)

    async def _claim(self, limit: int) -> list[Delivery]:
        batch = await self.store.claim_batch(
            self.owner, limit, self.lease_seconds, registries=sorted(self.clients)
        )
        if self.metrics:
            for d in batch:
                self.metrics.claimed.labels(d.registry).inc()
        return batch

    async def run(self) -> None:
        """Loop until `stop()`. Each free slot is refilled as soon as a delivery finishes, so one slow
        registry does not hold up the others; with nothing due it polls every `poll_interval`."""
        self._stopped.clear()  # a stop() that came before run() is kept: the loop then ends at once
        self._running = True
        in_flight: set[asyncio.Task[None]] = set()
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        wake_waiter = asyncio.ensure_future(self._woken.wait())
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(in_flight)
                claimed: list[Delivery] = []
                if free > 0 and self.clients:
                    try:
                        claimed = await self._claim(free)
                    except StoreUnavailable as exc:
                        self._store_failed()
                        if time.monotonic() >= self._quiet_until:  # not every poll while it is down
                            self._quiet_until = time.monotonic() + 30
                            log.warning("outbox store unavailable (%s); retrying every poll interval", exc)
                for d in claimed:
                    in_flight.add(asyncio.create_task(self._handle(d)))
                idle = len(claimed) < free  # nothing more is due right now
                if idle and not in_flight:
                    await self._refresh_depth()
                    await self._purge_if_due()
                # a wake-up matters only while slots are free: busy, the next finished delivery claims
                waiters = {stop_waiter, wake_waiter} if idle else {stop_waiter}
                done, _ = await asyncio.wait(
                    {*in_flight, *waiters},
                    timeout=self.poll_interval if idle else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if wake_waiter in done:
                    self._woken.clear()
                    wake_waiter = asyncio.ensure_future(self._woken.wait())
                finished = done & in_flight
                in_flight -= finished
                for task in finished:
                    if not task.cancelled() and task.exception() is not None:
                        log.error("delivery task failed: %s", type(task.exception()).__name__)
        except asyncio.CancelledError:
            # A hard stop: abandon what is in flight; the leases run out and another worker (or this one
            # after a restart) sends those deliveries again. stop() is the graceful way.
            for task in in_flight:
                task.cancel()
            raise
        finally:
            stop_waiter.cancel()
            wake_waiter.cancel()
            if in_flight:  # after stop(): what was sent gets its outcome recorded
                await asyncio.gather(*in_flight, return_exceptions=True)
            self._running = False
            self._stopped.set()

    async def stop(self) -> None:
        """Ask the loop to stop and wait until in-flight deliveries are finished and recorded."""
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    async def _purge_if_due(self) -> None:
        if self.payload_retention is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + min(3600.0, max(1.0, self.payload_retention / 10))
        with contextlib.suppress(StoreUnavailable):
            purged = await asyncio.to_thread(self.store.sync.purge_payloads, self.payload_retention)
            if purged:
                log.info("emptied the payloads of %d delivered deliveries past retention", purged)

    async def _refresh_depth(self) -> None:
        if not self.metrics:
            return
        try:
            self.metrics.refresh_outbox(await self.store.depth())
        except StoreUnavailable:
            self._store_failed()

    def _store_failed(self) -> None:
        if self.metrics:
            self.metrics.store_errors.inc()

    async def _handle(self, d: Delivery) -> None:
        client = self.clients[d.registry]
        started = time.monotonic()
        try:
            attempt = await self._deliver_leased(client, d)
        except Exception as exc:  # a bug in a client or auth plug-in must not kill the loop
            log.exception("delivery %s: unexpected %s", d.id, type(exc).__name__)
            attempt = Attempt(False, None, True, None, f"internal error: {type(exc).__name__}")
        if self.metrics:
            self.metrics.attempt_seconds.labels(d.registry).observe(time.monotonic() - started)
        try:
            outcome, recorded = await self._record(d, attempt)
        except StoreUnavailable as exc:
            # The lease will expire and the delivery be sent again; the registry's upsert absorbs it.
            self._store_failed()
            log.error("delivery %s: outcome not recorded (%s)", d.id, exc)
            return
        if self.on_recorded is not None:
            self.on_recorded(d.id)
        if self.metrics:
            self.metrics.attempts.labels(d.registry, outcome).inc()
            if not recorded:
                self.metrics.fenced.labels(d.registry).inc()
        log.info(
            "delivery %s to %s: %s (HTTP %s, attempt %d)%s",
            d.id,
            d.registry,
            outcome,
            attempt.status,
            d.attempts,
            "" if recorded else " - lease had expired, result dropped",
        )

    async def _deliver_leased(self, client: RegistryClient, d: Delivery) -> Attempt:
        """Send, renewing the lease every third of its length while the registry is still answering, so a
        slow registry does not make another worker send the same bundle again."""
        task = asyncio.ensure_future(client.deliver(d.payload or b"", request_id=d.id))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.lease_seconds / 3)
                if done:
                    return task.result()
                try:
                    if not await self.store.extend_lease(d.id, self.owner, self.lease_seconds):
                        log.warning("delivery %s: lease lost while sending", d.id)
                except StoreUnavailable:
                    pass  # the result is fenced by the lease owner when it is recorded
        finally:
            if not task.done():
                task.cancel()

    async def _record(self, d: Delivery, attempt: Attempt) -> tuple[str, bool]:
        def audit(event: str, outcome: str, detail: str | None) -> AuditInput:
            return AuditInput(
                actor=self.owner,
                provider=d.provider,
                registry=d.registry,
                event=event,
                outcome=outcome,
                delivery_id=d.id,
                registry_status=attempt.status,
                counts=d.counts,
                pseudonym_types=d.pseudonym_types,
                detail=detail,
            )

        if attempt.ok:
            ok = await self.store.mark_delivered(
                d.id, self.owner, registry_status=attempt.status, audit=audit("delivered", "ok", None)
            )
            return "delivered", ok
        out_of_patience = (
            d.attempts >= self.backoff.max_attempts and time.time() - d.created_at >= self.backoff.patience()
        )
        if attempt.retryable and not out_of_patience:
            delay = (
                attempt.retry_after
                if attempt.retry_after is not None
                else self.backoff.delay(d.attempts, self._rng)
            )
            ok = await self.store.mark_retry(
                d.id,
                self.owner,
                delay,
                registry_status=attempt.status,
                error=attempt.outcome_text,
                audit=audit("retry", "retryable", attempt.outcome_text),
            )
            return "retry", ok
        text = attempt.outcome_text or "registry rejected the delivery"
        if attempt.retryable:
            text = f"gave up after {d.attempts} attempts; last: {text}"
        ok = await self.store.mark_dead(
            d.id,
            self.owner,
            text,
            registry_status=attempt.status,
            audit=audit("dead", "gave-up" if attempt.retryable else "rejected", text),
        )
        return "dead", ok
