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
from typing import Any, NoReturn

import orjson
from rich.console import Console
from rich.table import Table

from gateway.bulk.chains import UnknownRegistry, from_runtime, offline_chains, strict_chains
from gateway.bulk.group import Chains
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import SchemaValidator
from gateway.process import ProviderChain, RegistryChain, dropped_by_reason, process_bundle
from gateway.ttp.backend import TTPRejected, TTPUnavailable

MAX_FILE_BYTES = 512 * 1024 * 1024


def run_deidentify(
    files: list[Path],
    *,
    registry: str,
    out: Path | None,
    config: Path | None,
    console: Console,
    strict: bool = False,
    profiles_dir: Path | None = None,
) -> int:
    table = _summary_table()
    if profiles_dir is not None and config is not None:
        console.print("[red]--profiles-dir is for a run without --config (which names its own)[/red]")
        return 2
    try:
        with _chains(registry, config, profiles_dir) as chains:
            if strict:  # on top of what the configuration says: testing an interface before go-live
                chains = strict_chains(chains)
            rows = asyncio.run(_all(files, chains, out))
    except UnknownRegistry as err:
        console.print(f"[red]{err}[/red]")
        return 2
    for path, (_, summary) in zip(files, rows, strict=True):
        table.add_row(path.name, *summary)
    if config is None:
        # a served gateway also asks the registry's opt-out sources (the objection register needs each
        # patient's number in the provider's mrn_system): what is delivered here may not be delivered there
        table.caption = (
            "opt-out: only Consents in the files were read (no objection register, no EHR search); "
            "give --config for the hospital's sources and keys"
        )
    (Console(stderr=True) if out is None else console).print(table)
    return max((code for code, _ in rows), default=0)


async def _all(files: list[Path], chains: Chains, out: Path | None) -> list[tuple[int, list[str]]]:
    try:
        return [
            await _one(path, chains.registry, chains.provider, chains.validator, chains.mapping, out)
            for path in files
        ]
    finally:
        await close_backend(chains.provider.ttp)


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
        return 2, ["-", "-", "-", f"rejected ({err.status}: {err.issues[0].code})", "-", "-", "-"]
    except OSError as exc:
        return 2, ["-", "-", "-", f"unreadable ({exc.strerror})", "-", "-", "-"]
    except TTPRejected as exc:  # a configuration problem (key, domain): our own text, one line, no traceback
        return 3, ["-", "-", "-", f"TTP refused ({exc.status}: {exc.diagnostics})", "-", "-", "-"]
    except TTPUnavailable:
        return 3, ["-", "-", "-", "TTP not reachable", "-", "-", "-"]
    report = processed.report
    written = _write(processed.bundle, out) if processed.bundle is not None else "-"
    deid = report.get("deidentification") or {}
    kept = deid.get("resourcesKept", 0)
    dropped = ", ".join(f"{k}={v}" for k, v in _flat(dropped_by_reason(report)).items()) or "-"
    types = ",".join(sorted(report.get("pseudonymTypes") or {})) or "-"
    return 0, [
        str(report.get("resourcesIn", 0)),
        str(kept),
        dropped,
        "delivered" if processed.bundle else "nothing to deliver",
        types,
        str(report.get("patientsDroppedOptOut", 0)),
        written,
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


def _write(bundle: dict[str, Any], out: Path | None) -> str:
    """The de-identified Bundle to stdout, or to `<out>/<its opaque id>.deid.json`: never named after the
    input file, whose name is the hospital's choice (Synthea and EHR exports name files after the patient)."""
    data = orjson.dumps(bundle, option=orjson.OPT_INDENT_2)
    if out is None:
        sys.stdout.write(data.decode() + "\n")
        return "stdout"
    out.mkdir(parents=True, exist_ok=True)
    name = f"{bundle['id']}.deid.json"
    (out / name).write_bytes(data + b"\n")
    return name


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
        "output",
    ):
        table.add_column(col)
    return table


@contextmanager
def _chains(registry: str, config_path: Path | None, profiles_dir: Path | None = None) -> Iterator[Chains]:
    """Without a configuration: throw-away keys and the embedded TTP, and the profiles of `profiles_dir`
    (default: the shipped ones; a registry trying its own profile). With one: the configured runtime
    (keys, TTP, every opt-out source of that registry), as the service would run it."""
    if config_path is None:
        with tempfile.TemporaryDirectory(prefix="fhir-gateway-offline-") as tmp:
            yield offline_chains(registry, Path(tmp), profiles_dir=profiles_dir)
        return
    from gateway.bootstrap import startup_runtime

    def fail(message: str) -> NoReturn:
        raise SystemExit(f"fhir-gateway: {message}")

    runtime, _ = startup_runtime(config_path, fail)
    yield from_runtime(runtime, registry, runtime.config.providers[0].id)
