"""`fhir-gateway receiver ...`: run the registry-side receiver, list what it received."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A registry-side FHIR receiver.")

DEFAULT_DATA = Path("receiver-data")
DataDir = Annotated[Path, typer.Option("--data-dir", help="where receiver.sqlite is kept")]


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8400, help="port to listen on"),
    data_dir: DataDir = DEFAULT_DATA,
    leak_scan: bool = typer.Option(
        True,
        "--leak-scan/--no-leak-scan",
        help="run gateway.deid.leakscan on every bundle (reject on a finding)",
    ),
    test_faults: bool = typer.Option(
        False, "--test-faults", help="enable POST /_faults (tests and demos only)"
    ),
    token_env: str = typer.Option(
        None, help="environment variable holding the bearer token senders must use"
    ),
    ttp_url: str = typer.Option(None, help="TTP base URL for POST /_rekey"),
    ttp_key_env: str = typer.Option(
        "FHIR_RECEIVER_TTP_API_KEY", help="environment variable with the TTP API key"
    ),
    registry: str = typer.Option(None, help="registry domain name at the TTP (for /_rekey)"),
    provider: str = typer.Option(
        None,
        help="the hospital of MRN pseudonyms delivered without one in their assigner (before the gateway "
        "named it), for /_rekey",
    ),
) -> None:
    """Serve the receiver under uvicorn."""
    import uvicorn

    from gateway.receiver.app import create_receiver_app
    from gateway.receiver.rekey import ttp_translator

    scan = None
    if leak_scan:
        try:
            from gateway.deid.leakscan import scan
        except ImportError:
            typer.echo(
                "gateway.deid.leakscan is not available; use --no-leak-scan to run without it", err=True
            )
            raise typer.Exit(2) from None
    translate = None
    if ttp_url:
        key = os.environ.get(ttp_key_env)
        if not key or not registry:
            typer.echo(f"--ttp-url needs --registry and the API key in ${ttp_key_env}", err=True)
            raise typer.Exit(2)
        translate = ttp_translator(ttp_url, key, registry, provider=provider)
    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        typer.echo(f"${token_env} is empty", err=True)
        raise typer.Exit(2)
    receiver = create_receiver_app(
        data_dir, scan=scan, translate=translate, test_faults=test_faults, token=token
    )
    uvicorn.run(receiver, host=host, port=port, log_level="info")


@app.command("list")
def list_(
    data_dir: DataDir = DEFAULT_DATA,
    limit: int = typer.Option(100, help="show at most this many (oldest first)"),
) -> None:
    """List the bundles the receiver accepted: time, entries, resource counts, times accepted."""
    from rich.console import Console
    from rich.table import Table

    from gateway.receiver.db import ReceiverDB, db_path

    if not db_path(data_dir).exists():
        typer.echo(f"no receiver data in {data_dir}", err=True)
        raise typer.Exit(1)
    db = ReceiverDB(data_dir)
    table = Table(title=f"Bundles received ({db.receipt_count()} in total)")
    for col in ("receipt", "received", "bundle identifier", "entries", "resources", "accepted"):
        table.add_column(col)
    for r in db.receipts(limit):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["resourceCounts"].items()))
        table.add_row(
            r["id"],
            r["receivedAt"],
            r["identifier"] or "-",
            str(r["entryCount"]),
            counts,
            str(r["acceptedCount"]),
        )
    Console().print(table)
    db.close()
