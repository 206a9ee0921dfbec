"""CLI commands of the de-identification package (wired by the lead as ``fhir-gateway scan`` and
``fhir-gateway profiles check``).

``scan FILE...``: exit 0 clean, 1 on any finding, 2 when a file cannot be read/parsed. Output names the file,
the FHIR path and the kind of finding, never the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml

from gateway import yamlfile
from gateway.deid.engine import compile_plan, never_delivered
from gateway.deid.leakscan import SensitiveSet, sensitive_values
from gateway.deid.leakscan import scan as scan_document
from gateway.deid.profile import (
    check_profile,
    extension_problems,
    load_profiles,
    profile_from_data,
    profile_warnings,
    read_yaml,
)
from gateway.deid.rules import DEFAULT_RULES, check_rules, rules_from_data

DEFAULT_PROFILES = DEFAULT_RULES.parents[1] / "profiles"

app = typer.Typer(help="De-identification: leak scan and profile checks.", no_args_is_help=True)


def _load_json(path: Path, unreadable: list[int] | None = None) -> object:
    """A JSON document, or NDJSON wrapped in a collection Bundle so that paths still name the entry; the
    numbers of NDJSON lines that cannot be read go to `unreadable` (the rest is still scanned), or raise."""
    data = path.read_bytes()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if unreadable is None or b"\n" not in data.strip():
            raise
    entries = []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                entries.append({"resource": orjson.loads(line)})
            except orjson.JSONDecodeError:
                unreadable.append(number)
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _read_reporting(path: Path) -> tuple[object | None, list[int]]:
    """The document (None: the file cannot be read at all) and the numbers of its NDJSON lines that cannot
    be read; each is reported on stderr, by file and line, never by content."""
    unreadable: list[int] = []
    try:
        doc = _load_json(path, unreadable)
    except (OSError, ValueError):
        typer.echo(f"{path}: unreadable", err=True)
        return None, []
    for number in unreadable:
        typer.echo(f"{path}: line {number}: unreadable", err=True)
    return doc, unreadable


def _originals(paths: list[Path]) -> dict:
    """The inputs as one collection Bundle (an export's NDJSON files together); one that cannot be read
    whole is exit 2, naming the file and line: a value it holds would not be sought."""
    entries: list[dict] = []
    for path in paths:
        doc, unreadable = _read_reporting(path)
        if doc is None or unreadable:
            raise typer.Exit(2)
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            entries.extend(doc.get("entry") or [])
        else:
            entries.append({"resource": doc})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


@app.command("scan")
def scan(
    files: Annotated[list[Path], typer.Argument(help="De-identified bundles (JSON or NDJSON) to check.")],
    original: Annotated[
        list[Path] | None,
        typer.Option(
            "--original",
            help="The input (a bundle, or an export's NDJSON files: repeat the option): its identifying"
            " values are sought too.",
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option("--registry", help="With --original: the profile the files were made for."),
    ] = None,
    profiles_dir: Annotated[
        Path | None, typer.Option("--profiles-dir", help="Where that profile is (default: shipped).")
    ] = None,
) -> None:
    """Leak gate: exit 1 if a file still contains a BSN or an identifying value of the original."""
    sensitive: SensitiveSet | None = None
    options = {}
    if registry is not None and not original:
        typer.echo("--registry says how the --original was de-identified: give --original too", err=True)
        raise typer.Exit(2)
    if registry is not None:
        folder = profiles_dir or DEFAULT_PROFILES
        try:
            options = load_profiles(folder)[registry].leak_gate_options()
        except (OSError, ValueError, KeyError):
            typer.echo(f"{registry}: no such profile in {folder}", err=True)
            raise typer.Exit(2) from None
    if original:
        sensitive = sensitive_values(_originals(original), **options)
    worst = 0
    for path in files:
        doc, unreadable = _read_reporting(path)
        if doc is None or unreadable:  # not (all) scanned: whatever it holds is unknown
            worst = 2
        if doc is None:
            continue
        findings = scan_document(doc, sensitive)
        for f in findings:
            typer.echo(f"{path}: {f.path}: {f.kind}")
        if findings and worst == 0:
            worst = 1
        elif not findings and not unreadable:
            typer.echo(f"{path}: clean")
    raise typer.Exit(worst)


def _warn_never_delivered(valid: dict[Path, Any], rules: Any, problems: list[str]) -> None:
    """A type the rules always take a required element of is dropped from every delivery (a probe's
    DocumentReference listed with its attachment while attachments go): valid, but surely not meant."""
    for path, data in valid.items():
        if any(str(p).startswith(f"{path}: ") for p in problems):
            continue
        for rtype, element in never_delivered(compile_plan(profile_from_data(data, path.name), rules)):
            typer.echo(
                f"{path}: warning: resources.{rtype} is never delivered: the rules always remove {element}, "
                "which it requires"
            )


def _profile_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    return out


@app.command("profiles-check")
def profiles_check(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Profile files or directories (default: the shipped profiles/)."),
    ] = None,
    rules: Annotated[Path, typer.Option("--rules", help="The de-identification rules file.")] = DEFAULT_RULES,
) -> None:
    """Validate registry profiles and the rules file; exit 1 listing every problem."""
    if isinstance(paths, Path):
        paths = [paths]  # called as a function with one directory (gateway/cli.py)
    problems: list[str] = []
    seen: dict[str, Path] = {}
    listing: dict[Path, list[Any]] = {}  # the extensions each profile lists, checked against the rules
    valid: dict[Path, Any] = {}  # compiled with the rules: the types that can never be delivered
    for path in _profile_files(paths or [DEFAULT_PROFILES]):
        try:
            data = read_yaml(path)
        except (OSError, ValueError):
            problems.append(f"{path}: unreadable")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: {yamlfile.problem(exc)}")
            continue
        found = check_profile(data)
        problems += [f"{path}: {p}" for p in found]
        if not found:
            valid[path] = data
        if isinstance(data, dict) and isinstance(data.get("extensions"), list):
            listing[path] = data["extensions"]
        for warning in profile_warnings(data):
            typer.echo(f"{path}: warning: {warning} (the reference is always dropped)")
        pid = data.get("id") if isinstance(data, dict) else None
        if isinstance(pid, str):
            if pid in seen:
                problems.append(f"{path}: id '{pid}' also used by {seen[pid]}")
            seen[pid] = path
    try:
        rules_data = read_yaml(rules)
        rule_problems = check_rules(rules_data)
        problems += [f"{rules}: {p}" for p in rule_problems]
        if not rule_problems:  # a profile's extensions are checked against readable rules only
            kept = {url: rule["method"] for url, rule in (rules_data.get("extensions") or {}).items()}
            for path, urls in listing.items():
                problems += [f"{path}: {p}" for p in extension_problems(urls, kept)]
            _warn_never_delivered(valid, rules_from_data(rules_data, rules.name), problems)
    except (OSError, ValueError):
        problems.append(f"{rules}: unreadable")
    except yaml.YAMLError as exc:
        problems.append(f"{rules}: {yamlfile.problem(exc)}")
    for line in problems:
        typer.echo(line)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{len(seen)} profile(s) and the rules are valid")
