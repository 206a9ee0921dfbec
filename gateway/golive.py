"""The go-live check behind `fhir-gateway check`: every outside party the gateway needs, asked once.

Each part answers None (fine) or a short fixed text; no patient data is involved and none is sent. The
reference TTP (NLPS1, stateless) is asked for one pseudonym of 32 random bytes per registry, with the
gateway's own credentials: that checks the API key, the sealing and that the TTP holds a key for the
registry's domain. Stateful TTPs (gPAS, TRES) would store such a value, so they are only probed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from gateway.bootstrap import EMBEDDED_TTP
from gateway.runtime import Runtime
from gateway.ttp.backend import TTPRejected, TTPUnavailable, round_trip

_EMBEDDED = (
    "the embedded reference TTP (ttp.url: embedded, the default) is for the demo and tests only: set ttp.url "
    "to the TTP's address"
)


async def check_runtime(runtime: Runtime) -> list[tuple[str, str | None]]:
    """(part, problem or None) for the store, each provider's TTP and each registry's endpoint."""
    results: list[tuple[str, str | None]] = [("configuration, profiles, keys", None)]
    results.append(("store", await _store(runtime)))
    try:
        results += await _ttps(runtime)
        for registry, client in runtime.forwarders.items():
            results.append((f"registry {registry} ({client.base_url})", await client.probe()))
    finally:
        await runtime.close_clients()
    return results


async def _ttps(runtime: Runtime) -> list[tuple[str, str | None]]:
    results: list[tuple[str, str | None]] = []
    for name, provider in runtime.providers.items():
        if provider.ttp_name == EMBEDDED_TTP:
            # it works, and that is the danger: the hospital would hold the keys that make the pseudonyms
            results.append((f"TTP for {name}", _EMBEDDED))
            continue
        problem = await _ttp_problem(provider.ttp.probe())
        results.append((f"TTP for {name}", problem))
        if not runtime.ttp_is_stateless or problem is not None:
            continue
        for registry in runtime.registries:
            asked = round_trip(provider.ttp, registry, provider.source.source_version)
            results.append((f"TTP for {name}: a pseudonym in domain {registry}", await _ttp_problem(asked)))
    return results


async def _store(runtime: Runtime) -> str | None:
    try:
        await asyncio.to_thread(runtime.store.depth)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        return f"not usable ({type(exc).__name__})"
    return None


async def _ttp_problem(call: Awaitable[str | None]) -> str | None:
    """A TTP call's problem as one line: refused, unreachable, or the error code of an answer."""
    try:
        error = await call
    except TTPRejected as exc:
        return f"refused us: {exc}"
    except TTPUnavailable as exc:
        return f"not reachable: {exc}"
    return f"no pseudonym: {error}" if error else None
