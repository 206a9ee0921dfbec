"""SIGKILL the gateway process at random moments while an EHR posts bundles; restart it; count the outcome.

Used by tests/test_faults.py (small counts) and tests/soak/kill_soak.py (1,000 deliveries, 20 kills).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.processes import process_chain
from tests.soak.common import (
    REGISTRY,
    Figures,
    PostResult,
    account,
    opened_store,
    post_until_accepted,
    variant,
    wait_drained,
)


@dataclass
class KillReport:
    figures: Figures
    kills: int
    restarts: int
    depth_after: dict[str, int]
    seconds: float

    def line(self) -> str:
        return (f"kills survived {self.kills} (restarts {self.restarts}); {self.figures.line()}; "
                f"outbox after drain {self.depth_after}; {self.seconds:.1f} s")


def run_kill_soak(work_dir: Path, *, bundles: int, kills: int, seed: int, threads: int = 8, groups: int = 10,
                  store_url: str | None = None, lease_seconds: float = 3.0,
                  gap: tuple[float, float] = (0.0, 0.3),
                  drain_timeout: float = 120.0, log: Callable[[str], None] = lambda _: None) -> KillReport:
    """Post `bundles` distinct bundles from `threads` EHR threads; meanwhile kill -9 the gateway `kills` times
    (seeded RNG picks the moments: a progress threshold plus a delay drawn from `gap`) and restart it on the
    same port; then let the outbox drain and account.

    The lease is short (`lease_seconds`) so deliveries a killed gateway held are re-sent within seconds
    rather than the production default of two minutes."""
    rng = random.Random(seed)
    started = time.monotonic()
    store_url = store_url or f"sqlite:///{work_dir / 'gateway.db'}"
    extra_env = {"FHIR_GATEWAY_WORKER_LEASE_SECONDS": str(lease_seconds)}
    with process_chain(work_dir, store_url=store_url) as chain:
        gw = chain.start_gateway(extra_env=extra_env)
        port = int(gw.url.rsplit(":", 1)[1])
        url = f"{gw.url}/registries/{REGISTRY}/Bundle"
        local = threading.local()

        def post(i: int) -> PostResult:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0))
            body = variant(i, i % groups, run=f"s{seed}")
            return post_until_accepted(local.client, url, chain.ehr_api_key, f"s{seed}-delivery-{i}", body,
                                       deadline_s=drain_timeout, prefer_async=i % 2 == 0)

        restarts = 0
        # Each kill comes when a seeded random share of the bundles has been answered (plus a random delay),
        # so every kill lands while the EHR is still posting and the worker delivering, however fast or slow
        # this machine is.
        thresholds = sorted(rng.randrange(1, bundles) for _ in range(kills))
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(post, i) for i in range(bundles)]
            for k, threshold in enumerate(thresholds):
                deadline = time.monotonic() + drain_timeout
                while sum(1 for f in futures if f.done()) < threshold and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(*gap))
                pending = sum(1 for f in futures if not f.done())
                gw.kill(signal.SIGKILL)
                log(f"kill {k + 1}/{kills}: SIGKILL with {pending} posts still pending")
                time.sleep(rng.uniform(0.0, 0.3))
                gw = chain.start_gateway(port=port, extra_env=extra_env)
                restarts += 1
            results = [f.result() for f in futures]
        with opened_store(store_url) as store:
            depth = wait_drained(store, drain_timeout)
            # the registry side settles too: a delivery is marked delivered only after the receiver answered
            figures = account(results, store, chain.receiver_url, work_dir / "receiver")
    return KillReport(figures, kills, restarts, depth, time.monotonic() - started)
