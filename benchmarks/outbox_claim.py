"""The outbox worker's claim against the backlog it reads: a claim's cost at 200 to 20,000 queued deliveries.

    .venv/bin/python benchmarks/outbox_claim.py [--backlogs 200,2000,20000] [--postgres URL]

Each backlog is a fresh store (SQLite in a temporary folder; PostgreSQL in a schema of its own, dropped
afterwards) holding a yearly delivery's Bundles (bulk idempotency keys, one or two patients each) and a few
posted ones; then `claim_batch(limit=8)` + `mark_delivered` as the worker runs them, median of 20. The floor
printed beside it is the same claim with a backlog of 200. `--full-scan` also runs the claim with its head
longer than the queue (`SqlStore.claim_window`), so that it reads every pending delivery, as every claim did
before schema v7, for the comparison in the same run.
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
        for delivery in batch:
            store.mark_delivered(delivery.id, "bench", registry_status=200)
        times.append(time.perf_counter() - start)
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
    parser.add_argument("--full-scan", action="store_true", help="also a claim reading every pending row")
    args = parser.parse_args()
    engine = "PostgreSQL" if args.postgres else "SQLite (synchronous=full)"
    print(f"claim_batch(limit=8) + 8 x mark_delivered, median of 20 claims; {engine}")
    print(f"{'backlog':>8}  {'head first':>12}  {'every pending':>14}")
    for backlog in [int(n) for n in args.backlogs.split(",")]:
        figures = []
        for window in (None, backlog * 2) if args.full_scan else (None,):
            with a_store(args.postgres) as store:
                if window is not None:
                    store.claim_window = window  # the head covers the whole queue
                fill(store, backlog)
                figures.append(f"{claim_ms(store):9.2f} ms")
        row = f"{backlog:>8}  {figures[0]:>12}"
        print(row + (f"  {figures[1]:>14}" if len(figures) > 1 else ""), flush=True)


if __name__ == "__main__":
    main()
