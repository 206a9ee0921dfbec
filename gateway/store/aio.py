"""Async face of the store: each call runs in a worker thread so the event loop never blocks on disk I/O."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway.store.model import AuditEvent, AuditInput, Delivery, DeliveryStatus

if TYPE_CHECKING:
    from gateway.store.sql import SqlStore


class AsyncStore:
    def __init__(self, store: SqlStore) -> None:
        self.sync = store

    async def enqueue(self, **kw: Any) -> tuple[str, bool]:
        return await asyncio.to_thread(lambda: self.sync.enqueue(**kw))

    async def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, registries: Iterable[str] | None = None
    ) -> list[Delivery]:
        return await asyncio.to_thread(self.sync.claim_batch, owner, limit, lease_seconds, registries)

    async def extend_lease(self, delivery_id: str, owner: str, lease_seconds: float) -> bool:
        return await asyncio.to_thread(self.sync.extend_lease, delivery_id, owner, lease_seconds)

    async def mark_delivered(self, delivery_id: str, owner: str, **kw: Any) -> bool:
        return await asyncio.to_thread(lambda: self.sync.mark_delivered(delivery_id, owner, **kw))

    async def mark_retry(self, delivery_id: str, owner: str, delay: float, **kw: Any) -> bool:
        return await asyncio.to_thread(lambda: self.sync.mark_retry(delivery_id, owner, delay, **kw))

    async def mark_dead(self, delivery_id: str, owner: str, outcome: str, **kw: Any) -> bool:
        return await asyncio.to_thread(lambda: self.sync.mark_dead(delivery_id, owner, outcome, **kw))

    async def requeue(self, delivery_id: str, **kw: Any) -> bool:
        return await asyncio.to_thread(lambda: self.sync.requeue(delivery_id, **kw))

    async def get(
        self, delivery_id: str, provider: str | None = None, *, with_payload: bool = False
    ) -> Delivery | None:
        return await asyncio.to_thread(
            lambda: self.sync.get(delivery_id, provider, with_payload=with_payload)
        )

    async def list_deliveries(
        self,
        provider: str | None = None,
        status: DeliveryStatus | None = None,
        registry: str | None = None,
        limit: int = 100,
        offset: int = 0,
        registries: Iterable[str] | None = None,
    ) -> list[Delivery]:
        return await asyncio.to_thread(
            self.sync.list_deliveries, provider, status, registry, limit, offset, registries
        )

    async def depth(self, registry: str | None = None) -> dict[str, int]:
        return await asyncio.to_thread(self.sync.depth, registry)

    async def record_audit(self, event: AuditInput) -> None:
        await asyncio.to_thread(self.sync.record_audit, event)

    async def list_audit(self, **kw: Any) -> list[AuditEvent]:
        return await asyncio.to_thread(lambda: self.sync.list_audit(**kw))

    async def processing_record(
        self,
        registry: str,
        since: float | None = None,
        until: float | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.processing_record, registry, since, until, provider)

    async def optout_add(self, provider: str, registry: str, patient_hash: bytes | str) -> bool:
        return await asyncio.to_thread(self.sync.optout_add, provider, registry, patient_hash)

    async def optout_withdraw(self, provider: str, registry: str, patient_hash: bytes | str) -> bool:
        return await asyncio.to_thread(self.sync.optout_withdraw, provider, registry, patient_hash)

    async def optout_lookup(
        self, provider: str, registry: str, patient_hashes: Iterable[bytes | str]
    ) -> set[str]:
        hashes = list(patient_hashes)
        return await asyncio.to_thread(self.sync.optout_lookup, provider, registry, hashes)
