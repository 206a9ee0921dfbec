"""Operator commands: the objection register and the outbox (deliveries, dead letters, requeue)."""

from __future__ import annotations

from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from gateway.config import Settings, load_config

objections_app = typer.Typer(no_args_is_help=True, help="The gateway's objection (opt-out) register.")
deliveries_app = typer.Typer(no_args_is_help=True, help="Deliveries in the outbox, dead letters, requeue.")
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
    from gateway.keys import load_keys
    from gateway.optout import ObjectionCsvError, objection_digest, read_objection_csv
    from gateway.store import open_store

    settings = Settings(config=config)
    cfg = load_config(config)
    keys = load_keys(settings.key_dir, [p.id for p in cfg.providers])
    store = open_store(settings.store_url)
    bad: list[ObjectionCsvError] = []
    added = total = 0
    for number in read_objection_csv(csv_file, on_error=bad.append):
        total += 1
        added += bool(
            store.optout_add(provider, registry, objection_digest(keys.objection_key(), provider, number))
        )
    for err in bad[:20]:
        console.print(f"[yellow]{err}[/yellow]")  # line number and problem, never the row
    console.print(f"{total} objections read, {added} new, {len(bad)} rows refused")
    raise typer.Exit(1 if bad else 0)


def _client(url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


@deliveries_app.command("list")
def list_deliveries(
    url: str = typer.Option("http://127.0.0.1:8200", "--url", envvar="FHIR_GATEWAY_URL"),
    api_key: str = typer.Option(..., "--api-key", envvar="FHIR_GATEWAY_API_KEY"),
    status: str = typer.Option(None, help="queued | delivering | delivered | dead"),
    registry: str = typer.Option(None),
    admin: bool = typer.Option(False, "--admin", help="all providers (needs the admin key)"),
) -> None:
    """List deliveries by status (dead letters: --status dead). Counts only, never patient data."""
    path = "/admin/deliveries" if admin else "/deliveries"
    params = {k: v for k, v in {"status": status, "registry": registry}.items() if v}
    with _client(url, api_key) as client:
        response = client.get(path, params=params)
    if response.status_code != 200:
        console.print(f"[red]{response.status_code}: {response.text[:300]}[/red]")
        raise typer.Exit(1)
    table = Table(title="Deliveries")
    for col in ("id", "registry", "status", "attempts", "registry status", "last error"):
        table.add_column(col)
    for d in response.json():
        table.add_row(
            d["id"],
            d["registry"],
            d["status"],
            str(d["attempts"]),
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
) -> None:
    """Put a dead letter back in the queue (after the registry or the data was fixed)."""
    path = f"/admin/deliveries/{delivery_id}/$requeue" if admin else f"/deliveries/{delivery_id}/$requeue"
    with _client(url, api_key) as client:
        response = client.post(path)
    console.print(f"{response.status_code}: {response.text[:300]}")
    raise typer.Exit(0 if response.status_code == 200 else 1)
