"""The chain a bulk job runs: from a running gateway (`from_runtime`) or built offline (`offline_chains`).

Offline (`--to-dir`, benchmarks): the embedded reference TTP with keys created once under `<work_dir>/keys`
and kept there, so that a resumed run produces the same pseudonyms and ids as the interrupted one. Those keys
are test keys: the pseudonyms are valid only for Bundles made with this work dir.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gateway.bulk.group import Chains
from gateway.config import REPO_ROOT
from gateway.deid.engine import compile_plan
from gateway.deid.profile import load_profiles
from gateway.deid.rules import load_rules
from gateway.keys import init_keys, load_keys
from gateway.pipeline.validate import SchemaValidator
from gateway.process import ProviderChain, RegistryChain
from gateway.pseudonym.mapping import load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.runtime import SCHEMA_PATH, Runtime
from gateway.ttp.client import CachingTTP
from gateway.ttp.embedded import EmbeddedTTP
from gateway.ttp.keystore import KeyStore
from gateway.ttp.keystore import init_keys as init_ttp_keys

OFFLINE_PROVIDER = "ura:00000000"


def strict_chains(chains: Chains) -> Chains:
    """The same chain in strict mode (the R4B models on every posted and delivered resource), whatever the
    configuration says: for testing an interface or an export before go-live."""
    return replace(chains, registry=replace(chains.registry, strict=True))


class UnknownRegistry(ValueError):
    """A command named a registry the configuration (or, offline, the profiles folder) does not have."""


def from_runtime(runtime: Runtime, registry: str, provider: str) -> Chains:
    if registry not in runtime.registries:
        raise UnknownRegistry(f"unknown registry {registry!r}: give one of {sorted(runtime.registries)}")
    if provider not in runtime.providers:
        raise ValueError(f"unknown provider {provider!r}")
    return Chains(
        runtime.registries[registry], runtime.providers[provider], runtime.validator, runtime.mapping
    )


def offline_chains(
    registry: str, key_root: Path, *, profiles_dir: Path | None = None, mrn_system: str | None = None
) -> Chains:
    profiles = load_profiles(profiles_dir or REPO_ROOT / "profiles")
    if registry not in profiles:
        raise UnknownRegistry(f"no delivery profile {registry!r}: give one of {sorted(profiles)}")
    profile = profiles[registry]
    key_dir, ttp_dir = key_root / "keys", key_root / "ttp-keys"
    init_keys(key_dir, [OFFLINE_PROVIDER])  # keeps existing keys: a resumed run pseudonymises alike
    if not (ttp_dir / "master.key").exists():
        init_ttp_keys(ttp_dir, [registry])
    keys = load_keys(key_dir, [OFFLINE_PROVIDER])
    ttp = CachingTTP(EmbeddedTTP(KeyStore.load(ttp_dir), provider=OFFLINE_PROVIDER))
    return Chains(
        RegistryChain(
            registry=registry,
            plan=compile_plan(profile, load_rules()),
            types=tuple(profile.pseudonym_types),
            optout=(),
            bundle_consent=True,
            id_key=keys.id_key(registry),
        ),
        ProviderChain(
            OFFLINE_PROVIDER,
            SourceStage(
                keys.source_keys,
                keys.source_version,
                keys.provider_mrn.get(OFFLINE_PROVIDER),
                OFFLINE_PROVIDER,
            ),
            mrn_system,
            ttp,
            "embedded-reference-ttp",
        ),
        SchemaValidator.from_file(SCHEMA_PATH),
        load_input_mapping(),
    )
