"""Start-up: configuration, profiles, keys and the TTP checked in order, each failing with one clear line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from gateway.config import GatewayConfig, ProviderConfig, Settings, TTPConfig, load_config, secret_from_env
from gateway.runtime import Runtime, build_runtime
from gateway.ttp.backend import TTPBackend

EMBEDDED_TTP = "embedded-reference-ttp"


def ttp_backend(ttp: TTPConfig, provider: ProviderConfig, embedded_key_dir: Path) -> tuple[TTPBackend, str]:
    """The configured TTP for one provider: the reference TTP over HTTP, an adapter, or the embedded one."""
    if ttp.kind != "nlps1":
        from gateway.ttp.factory import ttp_from_config

        return ttp_from_config(ttp.kind, ttp.options, provider=provider.id, secret=secret_from_env), ttp.kind
    if ttp.url == "embedded":
        from gateway.ttp.embedded import EmbeddedTTP
        from gateway.ttp.keystore import KeyStore, KeyStoreError

        try:
            keys = KeyStore.load(embedded_key_dir)
        except KeyStoreError:
            # not "run ttp keys init": a hospital must not make the TTP's keys; it names its TTP instead
            raise ValueError(
                f"ttp.url is 'embedded' (the default): the in-process reference TTP, for the demo and tests "
                f"only, has no keys in {embedded_key_dir}; a hospital's gateway sets ttp.url to its TTP"
            ) from None
        return EmbeddedTTP(keys, provider=provider.id), EMBEDDED_TTP
    from gateway.ttp.client import HttpTTPClient

    env = provider.ttp_api_key_env or ttp.api_key_env
    api_key = secret_from_env(env)
    if not api_key:  # said here, not later as "TTP not reachable"
        raise ValueError(f"the TTP API key environment variable {env} is not set (provider {provider.id})")
    client = HttpTTPClient(
        ttp.url,
        api_key,
        timeout=ttp.timeout_seconds,
        max_concurrency=ttp.max_concurrency,
        max_batch=ttp.max_batch,
        verify=ttp.ca_bundle or True,
    )
    # the name the Provenance gives the registry: the kind of TTP, not its address inside the hospital
    return client, ttp.kind


def startup_runtime(
    config_path: Path, fail: Callable[[str], NoReturn], settings: Settings | None = None
) -> tuple[Runtime, Settings]:
    settings = settings or Settings(config=config_path)
    try:
        config: GatewayConfig = load_config(config_path or settings.config)
    except ValueError as exc:
        fail(str(exc))
    try:
        ttps = config_ttps(config, settings)
    except Exception as exc:  # noqa: BLE001 - one line for the operator, never a traceback
        fail(f"TTP: {exc}")
    try:
        return runtime_from_config(config, settings, ttps), settings
    except Exception as exc:  # noqa: BLE001
        fail(f"start-up: {exc}")


def config_ttps(config: GatewayConfig, settings: Settings) -> dict[str, tuple[TTPBackend, str]]:
    return {p.id: ttp_backend(config.ttp, p, settings.key_dir.parent / "ttp-keys") for p in config.providers}


def runtime_from_config(
    config: GatewayConfig, settings: Settings, ttps: dict[str, tuple[TTPBackend, str]] | None = None
) -> Runtime:
    """The runtime the configuration describes, nothing handed in (`ttps` only as `config_ttps` built
    them): another process (a bulk worker) can build the same chain from `config` + `settings` alone."""
    ttps = ttps if ttps is not None else config_ttps(config, settings)
    runtime = build_runtime(config, settings, ttps=ttps)
    runtime.from_config_alone = True
    return runtime
