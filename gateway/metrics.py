"""Prometheus metrics of the gateway. Created on a CollectorRegistry you pass in (or a fresh one): importing
this module registers nothing, so tests and several apps in one process never collide. Labels are registry
names, outcomes and statuses only: never anything about a patient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    bundles: Counter  # labels: outcome (accepted | duplicate | nothing-to-deliver | ...), for the intake
    attempts: Counter  # labels: registry, outcome (delivered | retry | dead)
    attempt_seconds: Histogram  # labels: registry
    claimed: Counter  # labels: registry
    fenced: Counter  # labels: registry; results dropped because the lease had passed to another worker
    depth: Gauge  # labels: status
    resources: Counter  # labels: resource type, action (delivered | dropped:<reason>)
    ttp_seconds: Histogram  # one TTP batch call, whatever its size
    bulk_jobs: Gauge  # labels: registry, state (queued | indexing | delivering | completed | failed)
    store_errors: Counter  # the worker's store reads and writes that failed (the outbox depth is then stale)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, namespace: str = "gateway") -> GatewayMetrics:
        return create_metrics(registry or CollectorRegistry(), namespace)

    def refresh_outbox(self, depth: Mapping[str, int]) -> None:
        """Set the depth gauge from `store.depth()`."""
        for status, n in depth.items():
            self.depth.labels(status).set(n)

    def refresh_bulk(self, jobs: Mapping[tuple[str, str], int]) -> None:
        """Set the bulk job gauge from `BulkJobs.counts()` (states without jobs read 0)."""
        self.bulk_jobs.clear()
        for (registry, state), n in jobs.items():
            self.bulk_jobs.labels(registry, state).set(n)


# The worker needs only the outbox part; one type keeps wiring simple.
OutboxMetrics = GatewayMetrics


def create_metrics(registry: CollectorRegistry, namespace: str = "gateway") -> GatewayMetrics:
    def counter(name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, namespace=namespace, registry=registry)

    return GatewayMetrics(
        registry=registry,
        bundles=counter("bundles", "Bundles posted by EHRs, by intake outcome", ["outcome"]),
        attempts=counter("outbox_delivery_attempts", "Delivery attempts by outcome", ["registry", "outcome"]),
        attempt_seconds=Histogram(
            "outbox_delivery_seconds",
            "Time of one delivery attempt",
            ["registry"],
            namespace=namespace,
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        ),
        claimed=counter("outbox_claimed", "Deliveries claimed by a worker", ["registry"]),
        fenced=counter(
            "outbox_lease_lost", "Attempt results dropped because the lease had expired", ["registry"]
        ),
        depth=Gauge(
            "outbox_depth",
            "Deliveries in the outbox by status",
            ["status"],
            namespace=namespace,
            registry=registry,
        ),
        resources=counter(
            "resources", "Resources of accepted bundles by type and action", ["type", "action"]
        ),
        bulk_jobs=Gauge(
            "bulk_jobs",
            "Bulk jobs ($import) this process knows, by registry and state",
            ["registry", "state"],
            namespace=namespace,
            registry=registry,
        ),
        store_errors=Counter(
            "outbox_store_errors",
            "Outbox store reads and writes of the worker that failed (the depth gauge is then stale)",
            namespace=namespace,
            registry=registry,
        ),
        ttp_seconds=Histogram(
            "ttp_call_seconds",
            "Time of one TTP batch call",
            namespace=namespace,
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        ),
    )


create_outbox_metrics = create_metrics
