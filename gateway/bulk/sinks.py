"""Where a bulk job's transaction Bundles go: the durable outbox (normal) or files in a folder (offline).

Both are idempotent per key (`bulk|<job>|<group>[-<chunk>]`): putting the same key twice stores it once, so a
resumed run never delivers a Bundle twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from gateway.store import AuditInput, Store


class Sink(Protocol):
    def put(
        self,
        key: str,
        payload: bytes,
        *,
        order_key: str | None,
        counts: dict[str, Any],
        pseudonym_types: Sequence[str] = (),
        patient_keys: Sequence[str] = (),
    ) -> bool:
        """Store one Bundle; False when this key was stored before (nothing new)."""
        ...

    def withheld(self, key: str, counts: dict[str, Any]) -> None:
        """Record what a patient group withheld (opt-out, no pseudonym, dropped per reason): counts only,
        once per key however often the group is redone."""
        ...


class StoreSink:
    """The outbox: the worker forwards each row to the registry, retries, and audits."""

    def __init__(self, store: Store, *, provider: str, registry: str, sender: str) -> None:
        self.store, self.provider, self.registry, self.sender = store, provider, registry, sender
        self.delivery_ids: list[str] = []  # in the order stored: what `bulk --wait` waits for

    def put(
        self,
        key: str,
        payload: bytes,
        *,
        order_key: str | None,
        counts: dict[str, Any],
        pseudonym_types: Sequence[str] = (),
        patient_keys: Sequence[str] = (),
    ) -> bool:
        delivery_id, created = self.store.enqueue(
            provider=self.provider,
            registry=self.registry,
            payload=payload,
            sender=self.sender,
            idempotency_key=key,
            patient_order_key=order_key,
            patient_keys=patient_keys,
            counts=counts,
            pseudonym_types=pseudonym_types,
            # the same audit line a posted Bundle gets, written with the row (only when it is new)
            audit=AuditInput(
                actor=self.sender,
                provider=self.provider,
                registry=self.registry,
                event="accepted",
                outcome="bulk",
                counts=counts,
                pseudonym_types=tuple(pseudonym_types),
            ),
        )
        self.delivery_ids.append(delivery_id)
        return created

    def withheld(self, key: str, counts: dict[str, Any]) -> None:
        # the processing record's `withheld` for the yearly delivery, as posted Bundles' nothing-to-deliver
        event = AuditInput(self.sender, self.provider, self.registry, "withheld", "bulk", counts=counts,
                           once_key=f"withheld|{self.provider}|{self.registry}|{key}")
        self.store.record_audit(event)


class DirSink:
    """`--to-dir`: one `<key>.json` per Bundle, written atomically (temp file + rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(
        self,
        key: str,
        payload: bytes,
        *,
        order_key: str | None,
        counts: dict[str, Any],
        pseudonym_types: Sequence[str] = (),
        patient_keys: Sequence[str] = (),
    ) -> bool:
        name = key.replace("|", "_") + ".json"
        target = self.folder / name
        if target.exists():
            return False
        temp = self.folder / f".{name}.tmp"
        temp.write_bytes(payload)
        os.replace(temp, target)
        return True

    def withheld(self, key: str, counts: dict[str, Any]) -> None:
        pass  # offline: the summary says it
