"""The outbox worker's claim against the backlog it reads: a claim's cost at 200 to 20,000 queued deliveries.

    .venv/bin/python benchmarks/outbox_claim.py [--backlogs 200,2000,20000] [--postgres URL]

Each backlog is a fresh store (SQLite in a temporary folder; PostgreSQL in a schema of its own, dropped
afterwards) holding a yearly delivery's Bundles (bulk idempotency keys, one or two patients each) and a few
posted ones; then `claim_batch(limit=8)` as the worker runs it, each batch marked delivered after it (not
timed), median of 20. The floor is the first row: the same claim with a backlog of 200. Before schema v7 a
claim read and sorted every due delivery: 2.8 / 30.5 ms at 2,000 / 20,000 on SQLite, 107 ms at 20,000 on
PostgreSQL (measured on 2026-11-25 with the commit before, benchmarks/README.md).
"""

# ruff: noqa: E402 - imports follow the sys.path guard below (benchmarks/http.py shadows `http`)
from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/http.py would shadow the standard `http` package: keep this folder off sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator

from gateway.store import Store, open_store


def fill(store: Store, backlog: int) -> None:
    for i in range(backlog):
        key = f"post-{i}" if i % 50 == 0 else f"bulk|bench|{i}"
        patients = [f"p{i}", f"p{i + 1}"] if i % 3 == 0 else [f"p{i}"]
        store.enqueue(provider="ura:1", registry="r", sender="ehr", payload=b"{}", idempotency_key=key,
                      patient_keys=patients)


def claim_ms(store: Store, rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        batch = store.claim_batch("bench", limit=8, lease_seconds=60, registries=["r"])
        times.append(time.perf_counter() - start)
        assert len(batch) == 8
        for delivery in batch:
            store.mark_delivered(delivery.id, "bench", registry_status=200)
    return statistics.median(times) * 1000


@contextlib.contextmanager
def a_store(postgres: str | None) -> Iterator[Store]:
    if postgres is None:
        with tempfile.TemporaryDirectory() as folder:
            store = open_store(f"sqlite:///{folder}/outbox.db")
            try:
                yield store
            finally:
                store.close()
        return
    import psycopg

    schema = f"bench_claim_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            joiner = "&" if "?" in postgres else "?"
            store = open_store(f"{postgres}{joiner}options=-csearch_path%3D{schema}")
            try:
                yield store
            finally:
                store.close()
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlogs", default="200,2000,20000")
    parser.add_argument("--postgres", help="e.g. postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    engine = "PostgreSQL" if args.postgres else "SQLite (synchronous=full)"
    print(f"claim_batch(limit=8), median of 20 claims; {engine}")
    floor = None
    for backlog in [int(n) for n in args.backlogs.split(",")]:
        with a_store(args.postgres) as store:
            fill(store, backlog)
            if args.postgres:  # as autovacuum would have by then: a planner without statistics joins badly
                with store._conn() as conn:
                    conn.execute("ANALYZE")
            took = claim_ms(store)
        floor = floor or took
        print(f"{backlog:>8} queued  {took:7.2f} ms per claim  ({took / floor:.2f}x the first)", flush=True)


if __name__ == "__main__":
    main()
