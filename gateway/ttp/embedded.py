"""EmbeddedTTP: the NLPS1 TTP logic in-process (offline CLI path, benchmarks); the same code as the HTTP app.

Only for set-ups where the gateway may hold the TTP master key — i.e. the TTP itself, tests and demos. A
hospital's gateway must use ``HttpTTPClient``: holding the master key there defeats the two-stage design.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.pseudonym.types import PrePseudonym
from gateway.ttp import service
from gateway.ttp.backend import TTPRejected, TTPResult
from gateway.ttp.keystore import KeyStore, KeyStoreError


class EmbeddedTTP:
    def __init__(self, keystore: KeyStore, provider: str | None = None) -> None:
        self._keys = keystore
        self._provider = provider  # the delivering provider the MRN layer is bound to

    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        originals = [service.pre_string(i.type, i.key_version, i.value) for i in items]
        try:
            results = service.pseudonymise(self._keys, registry, self._provider, originals)
        except KeyStoreError:
            raise TTPRejected(404, "unknown target domain") from None
        pairs = enumerate(zip(items, results, strict=True))
        return [TTPResult(n, item.type, value, code) for n, (item, (value, code)) in pairs]

    async def probe(self) -> None:
        return None
