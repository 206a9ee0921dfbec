"""The `fhir-gateway` command line.

Each command imports what it needs when it runs, so `fhir-gateway --help` stays fast and one broken
optional part cannot take the whole command line down.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import ssl
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gateway import __version__
from gateway.memory import return_large_buffers_to_the_os

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="FHIR delivery gateway: validate, opt-out, pseudonymise, de-identify and forward to registries.",
)
keys_app = typer.Typer(
    no_args_is_help=True, help="The gateway's own keys (source key, provider MRN keys, secret)."
)
clients_app = typer.Typer(no_args_is_help=True, help="EHR client credentials.")
profiles_app = typer.Typer(no_args_is_help=True, help="Registry delivery profiles.")
app.add_typer(keys_app, name="keys")
app.add_typer(clients_app, name="clients")
app.add_typer(profiles_app, name="profiles")

console = Console()
err_console = Console(stderr=True)


def _mount_subcommands() -> None:
    """Sub-apps owned by their packages (TTP, receiver, deliveries, objections)."""
    from gateway.admin_cli import audit_app, deliveries_app, objections_app
    from gateway.receiver.commands import app as receiver_app
    from gateway.ttp.commands import app as ttp_app

    app.add_typer(ttp_app, name="ttp", help="The reference TTP: serve, keys, check.")
    app.add_typer(
        receiver_app, name="receiver", help="A registry-side receiver for testers and registry holders."
    )
    app.add_typer(objections_app, name="objections")
    app.add_typer(deliveries_app, name="deliveries")
    app.add_typer(audit_app, name="audit")


@app.callback()
def main() -> None:
    """FHIR delivery gateway: validate, opt-out, pseudonymise, de-identify and forward FHIR to registries."""
    return_large_buffers_to_the_os()  # every command handles bundle-sized buffers (see gateway/memory.py)


@app.command()
def version() -> None:
    """Print the gateway version."""
    typer.echo(__version__)


@app.command()
def serve(
    config: Path = typer.Option(Path("gateway.yaml"), "--config", "-c", envvar="FHIR_GATEWAY_CONFIG"),
    host: str = typer.Option(None, envvar="FHIR_GATEWAY_HOST"),
    port: int = typer.Option(None, envvar="FHIR_GATEWAY_PORT"),
    worker: bool = typer.Option(
        None,
        "--worker/--no-worker",
        help="run the outbox worker in this process (default: FHIR_GATEWAY_RUN_WORKER, true); with "
        "--no-worker, `fhir-gateway worker` processes forward",
    ),
) -> None:
    """Run the gateway service (ingest, admin API and the outbox worker) under uvicorn."""
    import uvicorn

    from gateway.bootstrap import startup_runtime
    from gateway.memory import freeze_start_up_objects
    from gateway.service.app import create_app
    from gateway.service.logs import configure
    from gateway.service.protocol import with_header_timeout

    runtime, settings = startup_runtime(config, fail=_fail)
    configure(settings.log_level)
    host = host or settings.host
    tls = _tls_files(settings.tls_certfile, settings.tls_keyfile, host)
    app = create_app(runtime, run_worker=settings.run_worker if worker is None else worker)
    freeze_start_up_objects()
    uvicorn.run(
        app,
        host=host,
        port=port or settings.port,
        **tls,
        log_config=None,
        proxy_headers=False,  # trust is decided on the peer address (trusted_proxies), never X-Forwarded-For
        timeout_graceful_shutdown=30,
        # longer than common client pools keep idle connections, so the server never closes one under them
        timeout_keep_alive=75,
        http=with_header_timeout(settings.header_timeout_seconds),
    )


def _tls_files(certfile: Path | None, keyfile: Path | None, host: str) -> dict[str, str]:
    """uvicorn's TLS options; a warning when the gateway listens beyond loopback in plain HTTP: API keys and
    Bundles (patient data before pseudonymisation) would cross the network readable."""
    if (certfile is None) != (keyfile is None):
        _fail("FHIR_GATEWAY_TLS_CERTFILE and FHIR_GATEWAY_TLS_KEYFILE go together: set both or neither")
    if certfile is not None and keyfile is not None:
        for path in (certfile, keyfile):
            if not path.is_file():
                _fail(f"TLS file not found: {path}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:  # as uvicorn will load them: a mismatch or a key with a passphrase is one line, not a traceback
            context.load_cert_chain(certfile, keyfile, password="")
        except (ssl.SSLError, ValueError) as exc:
            _fail(f"TLS certificate and key cannot be used together ({exc.__class__.__name__}): {certfile}")
        return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}
    if not _loopback(host):
        logging.getLogger("gateway").warning(
            "serving plain HTTP on %s: put a TLS-terminating proxy in front, or set "
            "FHIR_GATEWAY_TLS_CERTFILE and FHIR_GATEWAY_TLS_KEYFILE",
            host,
        )
    return {}


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command("worker")
def worker_command(
    config: Path = typer.Option(Path("gateway.yaml"), "--config", "-c", envvar="FHIR_GATEWAY_CONFIG"),
    metrics_port: int = typer.Option(
        None, "--metrics-port", help="serve this worker's Prometheus metrics on 127.0.0.1:<port>"
    ),
) -> None:
    """Only the outbox worker: forward what API processes (`serve --no-worker`) committed to the store.
    Run as many as you like against one store; SIGTERM finishes the deliveries in flight."""
    import asyncio

    from gateway.bootstrap import startup_runtime
    from gateway.memory import freeze_start_up_objects
    from gateway.service.logs import configure
    from gateway.worker_process import run_worker_process

    runtime, settings = startup_runtime(config, fail=_fail)
    configure(settings.log_level)
    freeze_start_up_objects()
    asyncio.run(run_worker_process(runtime, metrics_port))


@app.command()
def check(
    config: Path = typer.Option(Path("gateway.yaml"), "--config", "-c", envvar="FHIR_GATEWAY_CONFIG"),
) -> None:
    """Go-live check without serving: configuration, profiles and keys, the store, the TTP of every
    provider and the FHIR endpoint of every registry (GET /metadata with the configured credentials).
    Exit 1 naming each part that fails; nothing is delivered."""
    import asyncio

    from gateway.bootstrap import startup_runtime
    from gateway.golive import check_runtime

    runtime, _ = startup_runtime(config, fail=_fail)  # configuration, profiles, keys: one line, exit 2
    results = asyncio.run(check_runtime(runtime))
    table = Table(title=f"fhir-gateway check ({config})")
    for col in ("part", "result"):
        table.add_column(col)
    for part, problem in results:
        table.add_row(part, f"[red]{problem}[/red]" if problem else "[green]ok[/green]")
    console.print(table)
    raise typer.Exit(1 if any(problem for _, problem in results) else 0)


def _fail(message: str) -> None:
    err_console.print(f"[red]fhir-gateway: {message}[/red]")
    raise typer.Exit(2)


@app.command()
def demo(
    examples: Path = typer.Option(Path("examples"), help="folder of example bundles to replay"),
    registry: str = typer.Option("example-generic", help="registry (delivery profile) to deliver to"),
    work_dir: Path = typer.Option(
        None, help="a new or empty folder for the keys, the store and the receiver's data (default: temp)"
    ),
) -> None:
    """Start the embedded chain (TTP, receiver, gateway on SQLite), replay the examples, show the result."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(examples, registry=registry, work_dir=work_dir, console=console))


@app.command()
def replay(
    paths: list[Path] = typer.Argument(..., help="bundle (.json) or NDJSON files, or folders of them"),
    to: str = typer.Option(..., "--to", help="base URL of the gateway"),
    registry: str = typer.Option(..., "--registry"),
    api_key: str = typer.Option(..., "--api-key", envvar="FHIR_GATEWAY_API_KEY"),
    respond_async: bool = typer.Option(False, "--async", help="Prefer: respond-async"),
) -> None:
    """Post example bundles or NDJSON exports to a running gateway and print a table of results."""
    from rich.progress import Progress

    from gateway.replay import expand
    from gateway.replay import replay as do_replay

    files = expand(paths)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying", total=len(files))
        results = do_replay(
            files,
            base_url=to,
            registry=registry,
            api_key=api_key,
            respond_async=respond_async,
            on_done=lambda _: progress.advance(task),
        )
    console.print(results_table(results))
    if any(r.status >= 400 or r.status == 0 for r in results):
        raise typer.Exit(1)


def results_table(results) -> Table:
    table = Table(title="Replay results")
    for col in ("file", "HTTP", "outcome", "delivery", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.file, str(r.status), r.outcome, r.delivery or "-", r.detail)
    return table


@app.command()
def deidentify(
    bundles: list[Path] = typer.Argument(..., help="FHIR Bundle or single-resource JSON files"),
    registry: str = typer.Option(..., "--registry"),
    out: Path = typer.Option(None, "--out", help="write <name>.deid.json files here (default: stdout)"),
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        envvar="FHIR_GATEWAY_CONFIG",
        help="gateway config; without it an embedded TTP with fresh keys is used",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="also check every input and output resource with its fhir.resources R4B model"
    ),
    profiles_dir: Path = typer.Option(
        None,
        "--profiles-dir",
        help="without --config: take the registry's profile from this folder (a profile being written)",
    ),
) -> None:
    """The offline path: validate, opt-out, pseudonymise and de-identify files; print a summary per file."""
    from gateway.offline import run_deidentify

    code = run_deidentify(
        bundles,
        registry=registry,
        out=out,
        config=config,
        console=console,
        strict=strict,
        profiles_dir=profiles_dir,
    )
    raise typer.Exit(code)


@app.command()
def selftest(vectors: Path = typer.Option(..., "--vectors", exists=True, dir_okay=False)) -> None:
    """Check NLPS1 against a vectors file; exit 1 naming each case and type that differs."""
    from gateway.pseudonym.commands import selftest as run

    run(vectors)


def _mount_bulk() -> None:
    from gateway.bulk.commands import bulk

    app.command("bulk")(bulk)


@app.command()
def scan(
    files: list[Path] = typer.Argument(..., help="FHIR JSON or NDJSON files to scan for direct identifiers"),
    original: list[Path] = typer.Option(
        None,
        "--original",
        help="the input the files were made from (a Bundle, or an export's NDJSON files: repeat the option);"
        " its identifying values are sought too",
    ),
    registry: str = typer.Option(
        None, "--registry", help="with --original: the profile the files were made for (the data it keeps)"
    ),
    profiles_dir: Path = typer.Option(None, "--profiles-dir", help="where that profile is (default: ours)"),
) -> None:
    """Scan FHIR files for direct identifiers; exit 1 on a finding. Findings name paths, not values.

    Always: BSNs (also written with separators) and person resources that still carry a name, telecom,
    photo, contact, street address or an identifier other than a pseudonym. With --original also every
    name, address, phone number, identifier and birth date of that input, wherever it appears."""
    from gateway.deid.commands import scan as run

    run(files, original, registry, profiles_dir)


@profiles_app.command("check")
def profiles_check(
    paths: list[Path] = typer.Argument(None, help="profile files or folders (default: the shipped folder)"),
    rules: Path = typer.Option(None, "--rules", help="the de-identification rules file (default: shipped)"),
) -> None:
    """Validate every delivery profile and the rules file; exit 1 listing every problem."""
    from gateway.deid.commands import DEFAULT_RULES
    from gateway.deid.commands import profiles_check as run

    run(paths or None, rules or DEFAULT_RULES)


@app.command("mrn-reveal")
def mrn_reveal(
    values: list[str] = typer.Argument(..., help="MRN pseudonyms (v<n>.<...>) as the registry returned them"),
    registry: str = typer.Option(..., "--registry"),
    config: Path = typer.Option(Path("gateway.yaml"), "--config", "-c", envvar="FHIR_GATEWAY_CONFIG"),
    provider: str = typer.Option(None, "--provider", help="whose numbers (default: the first provider)"),
) -> None:
    """At the hospital: turn MRN pseudonyms fed back by a registry into the hospital's own patient numbers."""
    from gateway.keys import KeyFileError
    from gateway.mrn import reveal_command

    try:
        code = reveal_command(values, registry, config, provider)
    except (ValueError, KeyFileError) as exc:  # configuration, keys, TTP credential: one line
        _fail(str(exc))
    raise typer.Exit(code)


@keys_app.command("init")
def keys_init(
    key_dir: Path = typer.Option(Path("var/keys"), envvar="FHIR_GATEWAY_KEY_DIR"),
    provider: list[str] = typer.Option(
        [], "--provider", help="provider id (AGB/URA) to create an MRN key for"
    ),
) -> None:
    """Create missing key files (mode 0600). Existing keys are never overwritten."""
    from gateway.keys import check_value, init_keys, read_key_file

    for path in init_keys(key_dir, provider):
        console.print(f"created {path}")
        if path.name.startswith("source-key"):
            kcv = check_value(read_key_file(path))
            console.print(
                f"  a random source key (check value {kcv}): replace it with the ecosystem's K_src before "
                "the first delivery, and set FHIR_GATEWAY_SOURCE_KEY_CHECK to the check value published "
                "with it",
                highlight=False,
            )


@keys_app.command("list")
def keys_list(key_dir: Path = typer.Option(Path("var/keys"), envvar="FHIR_GATEWAY_KEY_DIR")) -> None:
    """List key files (names only, never content; a source key's check value)."""
    from gateway.keys import check_value, list_keys, read_key_file

    if not key_dir.is_dir():
        _fail(f"no key folder at {key_dir.absolute()} (--key-dir or FHIR_GATEWAY_KEY_DIR)")
    names = list_keys(key_dir)
    for name in names:
        # a source key's check value is no secret: it is compared with the one the ecosystem publishes
        source = name.startswith("source-key")
        kcv = f"  check value {check_value(read_key_file(key_dir / name))}" if source else ""
        console.print(f"{name}{kcv}", highlight=False)
    if not names:
        _fail(f"no key files in {key_dir.absolute()}")


@clients_app.command("new-key")
def clients_new_key() -> None:
    """Make a new API key: prints the key once (give it to the EHR) and its SHA-256 for gateway.yaml."""
    from gateway.service.auth import hash_api_key

    key = secrets.token_urlsafe(32)
    console.print(f"API key (shown once): {key}")
    console.print(f"api_key_sha256: {hash_api_key(key)}")


_mount_subcommands()
_mount_bulk()


if __name__ == "__main__":
    app()
