"""Records the outbox and audit trail hand out, and the one error a caller has to handle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

DeliveryStatus = Literal["queued", "delivering", "delivered", "dead"]
STATUSES: tuple[DeliveryStatus, ...] = ("queued", "delivering", "delivered", "dead")


def iso_instant(epoch: float) -> str:
    """A stored time (epoch seconds) as an ISO 8601 instant in UTC with milliseconds, as FHIR writes them."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class Superseded(Exception):
    """A dead delivery was not requeued: a newer delivery carries one of its patients, and this older one
    would overwrite it at the registry (pass ``force`` to requeue it all the same)."""


class StoreUnavailable(Exception):
    """The store could not complete a read or write (disk full, locked beyond the busy timeout, server gone).

    The transaction was rolled back, so nothing is half-written; the service answers 503. The message is
    fixed text plus the driver's error class: never a payload or a bound parameter.
    """


@dataclass(frozen=True)
class Delivery:
    """One pseudonymised bundle on its way to one registry. `payload` is None in listings."""

    id: str
    provider: str
    registry: str
    sender: str
    idempotency_key: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float
    lease_owner: str | None
    lease_expires_at: float | None
    patient_order_key: str | None
    created_at: float
    updated_at: float
    registry_status: int | None
    last_error: str | None
    payload_sha256: str
    payload_size: int
    counts: dict[str, Any] = field(default_factory=dict)
    pseudonym_types: tuple[str, ...] = ()
    payload: bytes | None = field(default=None, repr=False)  # never in a log line via repr()

    def summary(self) -> dict[str, Any]:
        """A JSON-ready view without the payload (for the service's delivery listing)."""
        return {
            "id": self.id,
            "provider": self.provider,
            "registry": self.registry,
            "sender": self.sender,
            "idempotencyKey": self.idempotency_key,
            "status": self.status,
            "attempts": self.attempts,
            "nextAttemptAt": self.next_attempt_at,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "registryStatus": self.registry_status,
            "lastError": self.last_error,
            "payloadSha256": self.payload_sha256,
            "payloadSize": self.payload_size,
            "counts": self.counts,
            "pseudonymTypes": list(self.pseudonym_types),
        }


@dataclass(frozen=True)
class AuditEvent:
    """One audit line: who did what, when, for which registry, with counts only (never patient data)."""

    id: int
    at: float
    actor: str
    provider: str
    registry: str
    event: str  # accepted | delivered | retry | dead | requeued | rejected | ...
    outcome: str  # free short code chosen by the caller, e.g. "ok", "retryable", "registry-rejected"
    delivery_id: str | None = None
    registry_status: int | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    pseudonym_types: tuple[str, ...] = ()
    detail: str | None = None  # fixed text or the registry's OperationOutcome
    request_id: str | None = None  # the HTTP request it came from (X-Request-ID), if any


@dataclass(frozen=True)
class AuditInput:
    """What a caller passes to record an audit event; the store adds id and time."""

    actor: str
    provider: str
    registry: str
    event: str
    outcome: str
    delivery_id: str | None = None
    registry_status: int | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    pseudonym_types: tuple[str, ...] = ()
    detail: str | None = None
    once_key: str | None = None  # set: the event is recorded once per key (a redone step writes nothing)
    request_id: str | None = None  # the HTTP request it came from (X-Request-ID), if any
