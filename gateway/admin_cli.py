"""Operator commands: the objection register, the outbox (deliveries, dead letters, requeue) and, for the
privacy officer, the audit trail and the processing record (AVG article 30)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table

from gateway.config import Settings, load_config

objections_app = typer.Typer(no_args_is_help=True, help="The gateway's objection (opt-out) register.")
deliveries_app = typer.Typer(no_args_is_help=True, help="Deliveries in the outbox, dead letters, requeue.")
audit_app = typer.Typer(
    no_args_is_help=True, help="For the privacy officer: the processing record and the audit trail."
)
console = Console()


@objections_app.command("import")
def import_objections(
    csv_file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="CSV with a patient_number column"
    ),
    provider: str = typer.Option(..., "--provider", help="provider id (AGB/URA) the numbers belong to"),
    registry: str = typer.Option("*", "--registry", help="registry the objection is for; * means all"),
    config: Path = typer.Option(Path("gateway.yaml"), "--config", "-c", envvar="FHIR_GATEWAY_CONFIG"),
) -> None:
    """Import a provider's objection list. Only keyed hashes of the patient numbers are stored."""
    from gateway.keys import KeyFileError, load_keys
    from gateway.optout import ObjectionCsvError, objection_digest, read_objection_csv, registered_form
    from gateway.store import AuditInput, open_store

    settings = Settings(config=config)
    try:
        cfg = load_config(config)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    if registry != "*" and registry not in cfg.registries:
        console.print(f"[red]unknown registry {registry!r}: give one of the configuration's, or *[/red]")
        raise typer.Exit(2)
    if provider not in {p.id for p in cfg.providers}:
        console.print(f"[red]unknown provider {provider!r}: give one of the configuration's providers[/red]")
        raise typer.Exit(2)
    try:
        keys = load_keys(settings.key_dir, [p.id for p in cfg.providers])
    except KeyFileError as err:  # one line naming the file or variable (a re-probe saw a traceback)
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    store = open_store(settings.store_url)
    bad: list[ObjectionCsvError] = []
    added = total = 0
    outcome = "stopped"  # until the whole file is read: a store failure half-way is audited as such
    try:
        for number in read_objection_csv(csv_file, on_error=bad.append):
            total += 1
            digest = objection_digest(keys.objection_key(), provider, registered_form(number))
            added += bool(store.optout_add(provider, registry, digest))
        outcome = "imported"
    except ObjectionCsvError as err:  # the file as a whole (no header, empty): nothing was read
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    finally:
        if total:
            store.record_audit(
                AuditInput(
                    actor="cli:objections-import",
                    provider=provider,
                    registry=registry,
                    event="objection-registered",
                    outcome=outcome,
                    counts={"read": total, "new": added, "refused": len(bad)},
                )
            )
    for err in bad[:20]:
        console.print(f"[yellow]{err}[/yellow]")  # line number and problem, never the row
    where = _store_name(settings.store_url)
    console.print(f"{total} objections read, {added} new, {len(bad)} rows refused; store {where}")
    raise typer.Exit(1 if bad else 0)


def _store_name(url: str) -> str:
    """Where the objections went: a SQLite file's absolute path; a database server's host and name only."""
    from urllib.parse import urlsplit

    from gateway.store.dialects import sqlite_path

    if url.startswith("sqlite:"):
        return str(Path(sqlite_path(url)).absolute())
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}/{parts.path.lstrip('/')}"  # never the password


@contextlib.contextmanager
def _client(url: str, api_key: str) -> Iterator[httpx.Client]:
    """A client of the gateway's API; a gateway that cannot be reached is one line and exit 1."""
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
            yield client
    except httpx.TransportError as exc:
        console.print(f"[red]the gateway at {url} cannot be reached ({type(exc).__name__})[/red]")
        raise typer.Exit(1) from None


@deliveries_app.command("list")
def list_deliveries(
    url: str = typer.Option("http://127.0.0.1:8200", "--url", envvar="FHIR_GATEWAY_URL"),
    api_key: str = typer.Option(..., "--api-key", envvar="FHIR_GATEWAY_API_KEY"),
    status: str = typer.Option(None, help="queued | delivering | delivered | dead"),
    registry: str = typer.Option(None),
    admin: bool = typer.Option(False, "--admin", help="all providers (needs the admin key)"),
    as_json: bool = typer.Option(False, "--json", help="the deliveries as JSON (for scripts)"),
) -> None:
    """List deliveries by status (dead letters: --status dead). Counts only, never patient data."""
    path = "/admin/deliveries" if admin else "/deliveries"
    params = {k: v for k, v in {"status": status, "registry": registry}.items() if v}
    with _client(url, api_key) as client:
        response = client.get(path, params=params)
    if response.status_code != 200:
        console.print(f"[red]{response.status_code}: {response.text[:300]}[/red]")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(response.json(), indent=2))
        return
    table = Table(title="Deliveries")
    # the id whole, however narrow the terminal: it is what `deliveries requeue` takes (a probe's was cut)
    table.add_column("id", no_wrap=True, min_width=32)
    for col in ("registry", "status", "attempts", "created", "updated", "registry status", "last error"):
        table.add_column(col)
    for d in response.json():
        table.add_row(
            d["id"],
            d["registry"],
            d["status"],
            str(d["attempts"]),
            str(d.get("createdAt") or "-"),
            str(d.get("updatedAt") or "-"),
            str(d.get("registryStatus") or "-"),
            (d.get("lastError") or "")[:60],
        )
    console.print(table)


@deliveries_app.command("requeue")
def requeue(
    delivery_id: str = typer.Argument(...),
    url: str = typer.Option("http://127.0.0.1:8200", "--url", envvar="FHIR_GATEWAY_URL"),
    api_key: str = typer.Option(..., "--api-key", envvar="FHIR_GATEWAY_API_KEY"),
    admin: bool = typer.Option(False, "--admin"),
    force: bool = typer.Option(
        False,
        "--force",
        help="even if a newer delivery of one of its patients exists (this one would overwrite it)",
    ),
) -> None:
    """Put a dead letter back in the queue (after the registry or the data was fixed)."""
    path = f"/admin/deliveries/{delivery_id}/$requeue" if admin else f"/deliveries/{delivery_id}/$requeue"
    with _client(url, api_key) as client:
        response = client.post(path, params={"force": "true"} if force else None)
    console.print(f"{response.status_code}: {response.text[:300]}")
    raise typer.Exit(0 if response.status_code == 200 else 1)


_URL = typer.Option("http://127.0.0.1:8200", "--url", envvar="FHIR_GATEWAY_URL")
_ADMIN_KEY = typer.Option(..., "--api-key", envvar="FHIR_GATEWAY_ADMIN_API_KEY", help="the admin key")
_SINCE = typer.Option(None, "--since", help="2026, 2026-03, 2026-03-01 or an ISO date-time with zone")
_UNTIL = typer.Option(None, "--until", help="exclusive, in the same forms")


def _period(year: int | None, since: str | None, until: str | None) -> dict[str, str]:
    if year is not None:
        if since or until:
            raise typer.BadParameter("give --year or --since/--until, not both")
        return {"since": str(year), "until": str(year + 1)}
    return {k: v for k, v in {"since": since, "until": until}.items() if v}


def _get_json(client: httpx.Client, path: str, params: dict[str, Any]) -> Any:
    response = client.get(path, params=params)
    if response.status_code != 200:
        console.print(f"[red]{response.status_code}: {response.text[:300]}[/red]")
        raise typer.Exit(1)
    return response.json()


@audit_app.command("record")
def processing_record(
    registry: str = typer.Argument(..., help="the registry (recipient)"),
    year: int = typer.Option(None, "--year", help="a calendar year (UTC), e.g. 2026"),
    since: str = _SINCE,
    until: str = _UNTIL,
    provider: str = typer.Option(None, "--provider", help="one provider's record (each is a controller)"),
    as_json: bool = typer.Option(False, "--json", help="the record as JSON (for the processing register)"),
    url: str = _URL,
    api_key: str = _ADMIN_KEY,
) -> None:
    """The processing record for one registry over a period: purpose, legal basis, providers, bundles and
    resources delivered, patients withheld (objection, unknown status, no pseudonym), pseudonym types."""
    params = _period(year, since, until) | ({"provider": provider} if provider else {})
    with _client(url, api_key) as client:
        record = _get_json(client, f"/admin/processing-record/{registry}", params)
    if as_json:
        print(orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        return
    console.print(_record_table(record))


def _record_table(record: dict[str, Any]) -> Table:
    period = record.get("reportingPeriod") or {}
    seen = record.get("period") or {}
    table = Table(title=f"Processing record: {record['registry']}", show_header=False)
    table.add_column("item")
    table.add_column("value")
    rows = [
        ("recipient", str(record.get("recipient"))),
        ("purpose", str(record.get("purpose"))),
        ("legal basis", str(record.get("legalBasis"))),
        ("period asked", f"{period.get('since') or '(start)'} to {period.get('until') or '(now)'}"),
        ("events seen", f"{seen.get('first') or '-'} to {seen.get('last') or '-'}"),
        ("providers", ", ".join(record.get("providers") or []) or "-"),
        ("pseudonym types asked", ", ".join(record.get("pseudonymTypesOfProfile") or []) or "-"),
        ("pseudonym types delivered", ", ".join(record.get("pseudonymTypes") or []) or "-"),
        ("bundles delivered", str(record.get("bundlesDelivered", 0))),
        ("patients delivered", str(record.get("patientsDelivered"))),
        ("patients withheld", str(record.get("patientsWithheld"))),
        ("events", _flat_counts(record.get("events") or {})),
        ("delivered bundles: counts", _flat_counts(record.get("delivered") or {})),
        ("withheld (bundles and bulk groups): counts", _flat_counts(record.get("withheld") or {})),
        ("outbox now", _flat_counts(record.get("outbox") or {})),
    ]
    for item, value in rows:
        table.add_row(item, value)
    return table


def _flat_counts(counts: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for key, value in sorted(counts.items()):
        if isinstance(value, dict):
            inner = _flat_counts(value, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        elif value:
            parts.append(f"{prefix}{key}={value}")
    return ", ".join(parts)


@audit_app.command("export")
def export_audit(
    out: Path = typer.Option(..., "--out", "-o", help="NDJSON file to write (one event a line)"),
    registry: str = typer.Option(None, "--registry"),
    provider: str = typer.Option(None, "--provider"),
    since: str = _SINCE,
    until: str = _UNTIL,
    url: str = _URL,
    api_key: str = _ADMIN_KEY,
) -> None:
    """Every audit event of a period, oldest first, paged through the admin API (counts, never values)."""
    params: dict[str, Any] = {"registry": registry, "provider": provider, "since": since, "until": until}
    params = {k: v for k, v in params.items() if v} | {"limit": 5000}
    written = 0
    with _client(url, api_key) as client, out.open("wb") as fh:
        while page := _get_json(client, "/admin/audit", params):
            for event in page:
                fh.write(orjson.dumps(event) + b"\n")
            written += len(page)
            params["after"] = page[-1]["id"]
    console.print(f"{written} audit events written to {out}")
