"""`fhir-gateway deidentify`: the whole chain on files, without a server (testers, integration engineers).

Without a configuration it uses the embedded reference TTP with fresh keys in a temporary folder, so the
pseudonyms it prints are valid only for that run; with `--config` it uses the configured keys and TTP.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from gateway.config import REPO_ROOT, ProviderConfig, TTPConfig, load_config
from gateway.deid.engine import compile_plan
from gateway.deid.profile import load_profiles
from gateway.deid.rules import load_rules
from gateway.keys import init_keys, load_keys
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import SchemaValidator
from gateway.process import ProviderChain, RegistryChain, process_bundle
from gateway.pseudonym.mapping import load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.runtime import SCHEMA_PATH

DEFAULT_PROVIDER = ProviderConfig(id="ura:00000000", name="offline", mrn_system=None)
MAX_FILE_BYTES = 512 * 1024 * 1024


def run_deidentify(
    files: list[Path], *, registry: str, out: Path | None, config: Path | None, console: Console
) -> int:
    table = _summary_table()
    with _chains(registry, config) as (registry_chain, provider_chain):
        rows = asyncio.run(_all(files, registry_chain, provider_chain, out))
    for path, (_, summary) in zip(files, rows, strict=True):
        table.add_row(path.name, *summary)
    (Console(stderr=True) if out is None else console).print(table)
    return max((code for code, _ in rows), default=0)


async def _all(
    files: list[Path], registry: RegistryChain, provider: ProviderChain, out: Path | None
) -> list[tuple[int, list[str]]]:
    validator = SchemaValidator.from_file(SCHEMA_PATH)
    mapping = load_input_mapping()
    try:
        return [await _one(path, registry, provider, validator, mapping, out) for path in files]
    finally:
        await close_backend(provider.ttp)


async def close_backend(backend: Any) -> None:
    aclose = getattr(backend, "aclose", None)
    if aclose is not None:
        await aclose()


async def _one(
    path: Path,
    registry: RegistryChain,
    provider: ProviderChain,
    validator: SchemaValidator,
    mapping: Any,
    out: Path | None,
) -> tuple[int, list[str]]:
    try:
        bundle = as_bundle(parse_json(path.read_bytes(), max_bytes=MAX_FILE_BYTES))
        processed = await process_bundle(
            bundle, registry=registry, provider=provider, validator=validator, mapping=mapping
        )
    except FhirError as err:
        sys.stdout.write(orjson.dumps(err.outcome(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 2, ["-", "-", "-", f"rejected ({err.status}: {err.issues[0].code})", "-", "-"]
    except OSError as exc:
        return 2, ["-", "-", "-", f"unreadable ({exc.strerror})", "-", "-"]
    report = processed.report
    if processed.bundle is not None:
        _write(path, processed.bundle, out)
    deid = report.get("deidentification") or {}
    kept = deid.get("resourcesKept", 0)
    dropped = ", ".join(f"{k}={v}" for k, v in _flat(deid.get("dropped")).items()) or "-"
    if report.get("resourcesDroppedNoPseudonym"):
        dropped += f" (no pseudonym: {report['resourcesDroppedNoPseudonym']})"
    types = ",".join(sorted(report.get("pseudonymTypes") or {})) or "-"
    return 0, [
        str(report.get("resourcesIn", 0)),
        str(kept),
        dropped,
        "delivered" if processed.bundle else "nothing to deliver",
        types,
        str(report.get("patientsDroppedOptOut", 0)),
    ]


def as_bundle(resource: dict[str, Any]) -> dict[str, Any]:
    """A single resource (e.g. a Patient file) is delivered as a one-entry collection Bundle."""
    if resource.get("resourceType") == "Bundle":
        return resource
    rid = resource.get("id") if isinstance(resource.get("id"), str) else "resource"
    full_url = f"urn:offline:{resource.get('resourceType')}/{rid}"
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": full_url, "resource": resource}],
    }


def _write(path: Path, bundle: dict[str, Any], out: Path | None) -> None:
    data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2)
    if out is None:
        sys.stdout.write(data.decode() + "\n")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{path.stem}.deid.json").write_bytes(data + b"\n")


def _values(counts: Any) -> Iterator[int]:
    if isinstance(counts, dict):
        for v in counts.values():
            yield from _values(v) if isinstance(v, dict) else [int(v)]


def _flat(counts: Any) -> dict[str, int]:
    if not isinstance(counts, dict):
        return {}
    return {k: (sum(_values(v)) if isinstance(v, dict) else int(v)) for k, v in counts.items()}


def _summary_table() -> Table:
    table = Table(title="De-identification summary")
    for col in (
        "file",
        "resources in",
        "kept",
        "dropped (by reason)",
        "result",
        "pseudonym types",
        "patients dropped (opt-out)",
    ):
        table.add_column(col)
    return table


@contextmanager
def _chains(registry: str, config_path: Path | None) -> Iterator[tuple[RegistryChain, ProviderChain]]:
    from gateway.bootstrap import ttp_backend

    with tempfile.TemporaryDirectory(prefix="fhir-gateway-offline-") as tmp:
        if config_path is None:
            provider, ttp_config, profiles_dir = DEFAULT_PROVIDER, TTPConfig(url="embedded"), None
            key_dir, ttp_key_dir = Path(tmp) / "keys", Path(tmp) / "ttp-keys"
            init_keys(key_dir, [provider.id])
            _init_embedded_ttp(ttp_key_dir, registry)
        else:
            config = load_config(config_path)
            provider, ttp_config, profiles_dir = config.providers[0], config.ttp, config.profiles_dir
            from gateway.config import Settings

            key_dir = Settings().key_dir
            ttp_key_dir = key_dir.parent / "ttp-keys"
        keys = load_keys(key_dir, [provider.id])
        profiles = load_profiles(Path(profiles_dir) if profiles_dir else REPO_ROOT / "profiles")
        if registry not in profiles:
            raise SystemExit(f"fhir-gateway: no delivery profile {registry!r}")
        profile = profiles[registry]
        ttp, name = ttp_backend(ttp_config, provider, ttp_key_dir)
        yield (
            RegistryChain(
                registry=registry,
                plan=compile_plan(profile, load_rules()),
                types=tuple(profile.pseudonym_types),
                optout=(),
                bundle_consent=True,
                id_key=keys.id_key(registry),
            ),
            ProviderChain(
                provider.id,
                SourceStage(
                    keys.source_keys, keys.source_version, keys.provider_mrn.get(provider.id), provider.id
                ),
                provider.mrn_system,
                ttp,
                name,
            ),
        )


def _init_embedded_ttp(key_dir: Path, registry: str) -> None:
    from gateway.ttp.keystore import init_keys as init_ttp_keys

    init_ttp_keys(key_dir, [registry])
