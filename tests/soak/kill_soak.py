"""Kill soak: 1,000 deliveries, 20 SIGKILLs of the gateway process at random (seeded) moments, restarts.

    .venv/bin/python -m tests.soak.kill_soak [--bundles 1000] [--kills 20] [--seed 1] [--pg URL]

Prints: bundles posted, accepted, delivered, re-sent, lost (must be 0), kills survived. Exit code 1 when a
bundle was lost, a resource was created twice or a patient's deliveries arrived out of order.
Loopback only; bounded by the counts and by the drain timeout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.soak.kill import run_kill_soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pg", help="PostgreSQL store URL instead of SQLite (use an empty schema)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-soak-") as tmp:
        report = run_kill_soak(Path(tmp), bundles=args.bundles, kills=args.kills, seed=args.seed,
                               threads=args.threads, store_url=args.pg, drain_timeout=300.0,
                               log=lambda line: print(line, flush=True))
    f = report.figures
    print(f"bundles posted:   {f.posted} ({f.post_requests} requests)")
    print(f"accepted (2xx):   {f.accepted}")
    print(f"delivered:        {f.delivered}")
    print(f"re-sent:          {f.resent}")
    print(f"lost:             {f.lost}")
    print(f"dup. resources:   {f.duplicate_resources}")
    print(f"out of order:     {f.out_of_order} {f.order_problems}")
    print(f"dead letters:     {f.dead}")
    print(f"kills survived:   {report.kills}")
    print(f"answers:          {dict(f.answers)}")
    print(f"outbox after:     {report.depth_after}   ({report.seconds:.0f} s)")
    bad = f.lost or f.duplicate_resources or f.out_of_order or f.accepted != f.posted or f.dead
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
