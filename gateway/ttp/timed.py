"""A TTP backend decorator that times every batch call into a Prometheus histogram (no labels: no data)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Histogram

from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend, TTPResult


class TimedTTP:
    def __init__(self, backend: TTPBackend, histogram: Histogram) -> None:
        self.backend, self._histogram = backend, histogram

    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        started = time.perf_counter()
        try:
            return await self.backend.pseudonymise(registry, items)
        finally:
            self._histogram.observe(time.perf_counter() - started)

    async def probe(self) -> None:
        await self.backend.probe()

    async def aclose(self) -> None:
        aclose: Any = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()
