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
    results.append(_source_key(runtime))
    results += _mrn_systems(runtime)
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


def _source_key(runtime: Runtime) -> tuple[str, str | None]:
    """Start-up refuses a source key whose check value differs from the configured one; unverified, the key
    may be the random one `keys init` made, and every pseudonym would link to nothing at other providers."""
    keys = runtime.keys
    part = f"source key v{keys.source_version} (check value {keys.source_check_value})"
    if runtime.settings.source_key_check:
        return part, None
    return part, (
        "not verified: set FHIR_GATEWAY_SOURCE_KEY_CHECK to the check value the ecosystem publishes of K_src "
        "(the one `keys init` makes is random, and its pseudonyms link to no other provider's)"
    )


def _mrn_systems(runtime: Runtime) -> list[tuple[str, str | None]]:
    """A registry that asks MRN pseudonyms of a provider without a patient-number system gets none, for any
    patient, and no error says so at delivery (each is skipped as mrn-system-not-configured)."""
    results: list[tuple[str, str | None]] = []
    for registry, chain in runtime.registries.items():
        if "MRN" not in {t.upper() for t in chain.types}:
            continue
        for name, provider in runtime.providers.items():
            problem = None if provider.mrn_system else (
                "the profile asks MRN pseudonyms, but this provider has no mrn_system: no patient gets one"
            )
            results.append((f"MRN pseudonyms of {name} for {registry}", problem))
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
        if exc.status == 401:  # a probe's operator could not tell this from any other refusal
            return f"refused us: {exc}: is the TTP API key (ttp.api_key_env, or the provider's) the TTP's?"
        return f"refused us: {exc}"
    except TTPUnavailable as exc:
        return f"not reachable: {exc}"
    return f"no pseudonym: {error}" if error else None
