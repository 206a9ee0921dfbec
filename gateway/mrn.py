"""Reversing the MRN pseudonym, for the delivering hospital only (domain spec §4.3).

A registry feeds results back under the MRN pseudonym; the hospital asks the TTP to remove the TTP layer
(which opens only for the provider bound into it: the TTP checks the caller), then removes its own layer
with its provider MRN key, which never left the hospital. Any failure is an error, never the input echoed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.pseudonym.nlps1 import PseudonymError, unb64u
from gateway.pseudonym.source import SourceStage
from gateway.ttp.backend import TTPUnavailable

CANONICAL_PREFIX = "NLPS1|MRN|"


@dataclass(frozen=True)
class Revealed:
    value: str  # the pseudonym as given
    mrn: str | None  # the hospital's patient number, or None
    error: str | None  # a fixed code when it could not be reversed


async def reveal_mrns(values: Sequence[str], *, registry: str, source: SourceStage, ttp) -> list[Revealed]:  # noqa: ANN001
    """`ttp` is the provider's TTP client (it has `depseudonymise`); one TTP request for all values."""
    results = await ttp.depseudonymise(registry, list(values))
    out: list[Revealed] = []
    for value, result in zip(values, results, strict=True):
        if result.identifier_value is None:
            out.append(Revealed(value, None, result.error_code or "ttp-refused"))
            continue
        out.append(_open_inner(value, unb64u(result.identifier_value), registry, source))
    return out


def _open_inner(value: str, pre: bytes, registry: str, source: SourceStage) -> Revealed:
    # the inner layer's key version is the source version it was made with: try the newest first
    for version in sorted(source.source_versions, reverse=True):
        try:
            canonical = source.mrn_key(registry, version).reveal(pre)
        except PseudonymError:
            continue
        if canonical.startswith(CANONICAL_PREFIX):
            return Revealed(value, canonical[len(CANONICAL_PREFIX) :], None)
    return Revealed(value, None, "provider-layer-does-not-open")


def reveal_command(values: list[str], registry: str, config_path, provider_id: str | None = None) -> int:  # noqa: ANN001
    """`fhir-gateway mrn reveal`: runs at the hospital, with the hospital's own keys and TTP credential.
    `provider_id`: whose numbers (default: the configuration's first provider)."""
    import asyncio

    from gateway.bootstrap import ttp_backend
    from gateway.config import Settings, load_config
    from gateway.keys import load_keys

    config = load_config(config_path)
    known = {p.id: p for p in config.providers}
    if provider_id is not None and provider_id not in known:
        raise ValueError(f"unknown provider {provider_id!r}: give one of {sorted(known)}")
    provider = known[provider_id] if provider_id else config.providers[0]
    settings = Settings(config=config_path)
    keys = load_keys(settings.key_dir, [provider.id])
    source = SourceStage(
        keys.source_keys, keys.source_version, keys.provider_mrn.get(provider.id), provider.id
    )
    ttp, _ = ttp_backend(config.ttp, provider, settings.key_dir.parent / "ttp-keys")

    async def run() -> list[Revealed]:
        try:
            return await reveal_mrns(values, registry=registry, source=source, ttp=ttp)
        finally:
            aclose = getattr(ttp, "aclose", None)
            if aclose is not None:
                await aclose()

    if registry not in config.registries:
        raise ValueError(f"unknown registry {registry!r}: give one of {sorted(config.registries)}")
    try:
        results = asyncio.run(run())
    except TTPUnavailable as exc:  # the TTP's own text names no value; the kind says enough
        _audit_reveal(settings, provider.id, registry, len(values), 0, "refused")
        raise ValueError(f"the TTP did not reverse the pseudonyms ({type(exc).__name__})") from None
    revealed = sum(r.mrn is not None for r in results)
    # re-identification is the one step back from pseudonyms: the privacy officer sees each one (counts)
    _audit_reveal(settings, provider.id, registry, len(values), revealed, "revealed")
    for r in results:  # tab-separated, for scripts (rich would expand the tabs)
        print(f"{r.value}\t{r.mrn if r.mrn is not None else 'NOT REVERSED: ' + (r.error or '')}")
    return 0 if revealed == len(results) else 1


def _audit_reveal(settings, provider: str, registry: str, asked: int, revealed: int, outcome: str) -> None:  # noqa: ANN001
    from gateway.store import AuditInput, open_store

    store = open_store(settings.store_url)
    try:
        store.record_audit(
            AuditInput(
                actor="cli:mrn-reveal",
                provider=provider,
                registry=registry,
                event="mrn-revealed",
                outcome=outcome,
                counts={"asked": asked, "revealed": revealed},
            )
        )
    finally:
        store.close()
