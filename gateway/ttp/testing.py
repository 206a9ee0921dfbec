"""Helpers for tests and benchmarks that need a real TTP: keys in a temporary directory, callers, counting.

Test keys only: the API keys below are public constants and must never be configured on a real TTP.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.ttp.auth import TTPAuth, hash_key
from gateway.ttp.keystore import KeyStore, init_keys

TEST_CALLERS: dict[str, dict[str, Any]] = {
    "provider-a": {"role": "provider", "provider": "ura:00000000"},
    "provider-b": {"role": "provider", "provider": "ura:11111111"},
    "registry-holder": {"role": "registry", "registries": ["registry-example"]},
    "admin": {"role": "admin"},
}


@dataclass
class TTPFixture:
    keystore: KeyStore
    auth: TTPAuth
    key_dir: Path
    api_keys: dict[str, str]  # caller name → API key

    def headers(self, caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_keys[caller]}"}


def make_test_ttp(key_dir: Path, registries: Iterable[str] = ("registry-example", "registry-other"), *,
                  master: bytes | None = None) -> TTPFixture:
    """Keys written to `key_dir` (mode 0600, as in production) and one caller per role."""
    keystore = init_keys(key_dir, list(registries), master=master)
    api_keys = {name: f"test-key-{name}" for name in TEST_CALLERS}
    entries = [{"name": n, **c, "key_sha256": hash_key(api_keys[n])} for n, c in TEST_CALLERS.items()]
    return TTPFixture(keystore, TTPAuth.from_entries(entries), key_dir, api_keys)


class RequestCounter:
    """ASGI middleware counting HTTP requests per (method, path): proves batching on the server side."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: Counter[tuple[str, str]] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.counts[(scope["method"], scope["path"])] += 1
        await self.app(scope, receive, send)
