"""`fhir-gateway ttp ...`: run the reference TTP, manage its keys and callers, check a configured TTP.

    fhir-gateway ttp keys init --key-dir var/ttp-keys --registry registry-example
    fhir-gateway ttp callers add umc --role provider --provider ura:00000000 --file var/ttp-callers.yaml
    fhir-gateway ttp serve --key-dir var/ttp-keys --api-keys-file var/ttp-callers.yaml
    FHIR_GATEWAY_TTP_API_KEY=... fhir-gateway ttp check --url http://127.0.0.1:8300 --registry reg-a
    fhir-gateway ttp check --kind gpas --url https://ttp/ttp-fhir/fhir/gpas --option domain=REG_A
        --option auth.type=basic --option auth.username=gw --option auth.password_env=GPAS_PW  (one line)

Nothing here prints a key except ``callers add``, which prints the new caller's API key once.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.auth import ROLES, AuthConfigError, TTPAuth, add_caller, load_callers, remove_caller
from gateway.ttp.backend import TTPRejected, TTPUnavailable
from gateway.ttp.keystore import (
    DEFAULT_KEY_DIR,
    ENV_KEY_DIR,
    KeyStore,
    KeyStoreError,
    init_keys,
    list_domains,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="The NLPS1 reference TTP.")
keys_app = typer.Typer(no_args_is_help=True, help="TTP keys: master key, HPKE key, registry domain versions.")
callers_app = typer.Typer(no_args_is_help=True, help="Callers of the TTP and their API keys (hashes only).")
app.add_typer(keys_app, name="keys")
app.add_typer(callers_app, name="callers")
console = Console(soft_wrap=True)  # one line per message, whatever the terminal width
errors = Console(stderr=True, soft_wrap=True)

KeyDir = Annotated[Path | None, typer.Option("--key-dir", help="key directory (or FHIR_GATEWAY_TTP_KEY_DIR)")]
CallersFile = Annotated[Path, typer.Option("--file", help="callers file (YAML or .json)")]
DEFAULT_CALLERS = Path("ttp-callers.yaml")


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _load(key_dir: Path | None) -> KeyStore:
    try:
        return KeyStore.load(key_dir)
    except KeyStoreError as exc:
        raise _fail(str(exc)) from None


@app.command()
def serve(
    key_dir: KeyDir = None,
    api_keys_file: Annotated[Path, typer.Option("--api-keys-file", help="callers file")] = DEFAULT_CALLERS,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8300,
    sealed_only: Annotated[bool, typer.Option(
        "--sealed-only/--allow-plain",
        help="refuse batches without the HPKE envelope (domain spec §4.1.5: HPKE and its replay guard); "
             "--allow-plain for tests and `ttp check --plain`")] = True,
    max_values: Annotated[int, typer.Option(help="values per request")] = 100_000,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    client_subject_header: Annotated[str | None, typer.Option(help="mTLS subject header (proxy)")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(help="peer allowed to set that header")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    replay_db: Annotated[Path | None, typer.Option(
        help="SQLite file of used request ids, shared by every TTP process on this host (default: in memory, "
             "one process)")] = None,
) -> None:
    """Run the TTP under uvicorn."""
    import logging

    import uvicorn

    # The TTP logs operation, caller, count and duration per batch (never values): make that visible.
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s:     %(name)s: %(message)s")

    from gateway.ttp.app import create_app

    keystore = _load(key_dir)
    try:
        auth = TTPAuth.from_file(api_keys_file, client_subject_header=client_subject_header,
                                 trusted_proxies=frozenset(trusted_proxy or ()))
    except (AuthConfigError, OSError) as exc:
        raise _fail(f"callers file: {exc}") from None
    from gateway.ttp.envelope import SharedReplayGuard

    guard = SharedReplayGuard(replay_db) if replay_db else None
    api = create_app(keystore, auth, allow_plain=not sealed_only, max_values=max_values, replay_guard=guard)
    uvicorn.run(api, host=host, port=port, log_level=log_level,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)


@keys_app.command("init")
def keys_init(
    key_dir: KeyDir = None,
    registry: Annotated[list[str] | None, typer.Option("--registry", help="registry (repeatable)")] = None,
) -> None:
    """Create the master key, the HPKE key and the keyring (mode 0600); never overwrites."""
    # where `keys list` and `serve` look (a probe's init wrote to var/ttp-keys while they read the variable)
    key_dir = Path(key_dir or os.environ.get(ENV_KEY_DIR) or DEFAULT_KEY_DIR)
    try:
        store = init_keys(key_dir, registry or [])
    except KeyStoreError as exc:
        raise _fail(str(exc)) from None
    console.print(f"created keys in {key_dir} (HPKE key id {store.key_id}); domains: {list_domains(store)}")


@keys_app.command("list")
def keys_list(key_dir: KeyDir = None) -> None:
    """Registry domains with their current and retired versions (no key material)."""
    store = _load(key_dir)
    console.print(f"HPKE key id: {store.key_id}")
    for registry, entry in list_domains(store).items():
        since = f" since {entry['since']}" if "since" in entry else ""
        console.print(f"{registry}: current v{entry['current']}{since}, retired {entry['retired'] or '-'}")


@keys_app.command("rotate")
def keys_rotate(registry: str, key_dir: KeyDir = None) -> None:
    """Add version n+1 for a registry domain and make it current (a running TTP re-reads the keyring)."""
    store = _load(key_dir)
    try:
        console.print(f"{registry}: now at v{store.rotate(registry)}")
    except KeyStoreError as exc:
        raise _fail(str(exc)) from None


@keys_app.command("add-registry")
def keys_add_registry(registry: str, key_dir: KeyDir = None) -> None:
    """Add a registry domain at version 1."""
    try:
        _load(key_dir).add_registry(registry)
    except KeyStoreError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{registry}: added at v1")


@keys_app.command("retire")
def keys_retire(
    registry: str,
    version: int,
    key_dir: KeyDir = None,
    force: Annotated[bool, typer.Option(help="before the gateways' pseudonym caches ran out")] = False,
) -> None:
    """Retire an old version once the registry holder has translated its stored pseudonyms."""
    try:
        _load(key_dir).retire(registry, version, force=force)
    except KeyStoreError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{registry}: v{version} retired")


@callers_app.command("add")
def callers_add(
    name: str,
    role: Annotated[str, typer.Option(help=f"one of {', '.join(ROLES)}")],
    file: CallersFile = DEFAULT_CALLERS,
    provider: Annotated[str | None, typer.Option(help="provider id, e.g. ura:00000000")] = None,
    registry: Annotated[list[str] | None, typer.Option("--registry", help="registry id (repeatable)")] = None,
) -> None:
    """Add a caller and print its API key ONCE (only the SHA-256 hash is stored)."""
    try:
        key = add_caller(file, name, role, provider=provider, registries=registry or ())
    except AuthConfigError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"added {name} ({role}) to {file}; a running `ttp serve` of this file takes it in at once. "
        "API key (shown once, store it now):",
        highlight=False,
    )
    typer.echo(key)


@callers_app.command("remove")
def callers_remove(name: str, file: CallersFile = DEFAULT_CALLERS) -> None:
    """Revoke a caller (a leaked key): a running `ttp serve` of this file refuses its key at once."""
    try:
        remove_caller(file, name)
    except (AuthConfigError, OSError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"removed {name} from {file}; its key is refused from the next request on", highlight=False)


@callers_app.command("list")
def callers_list(file: CallersFile = DEFAULT_CALLERS) -> None:
    """Names, roles, providers and registries (never hashes)."""
    try:
        for c in load_callers(file):
            console.print(f"{c.get('name')}: {c.get('role')} provider={c.get('provider', '-')} "
                          f"registries={','.join(c.get('registries') or []) or '-'}", highlight=False)
    except (AuthConfigError, OSError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def check(
    url: Annotated[str, typer.Option(help="TTP base URL")] = "http://127.0.0.1:8300",
    registry: Annotated[str, typer.Option(help="registry domain to test")] = "registry-example",
    api_key: Annotated[str, typer.Option(envvar="FHIR_GATEWAY_TTP_API_KEY", help="API key (env preferred)",
                                         show_default=False)] = "",
    ca_file: Annotated[str | None, typer.Option(help="CA bundle for TLS")] = None,
    plain: Annotated[bool, typer.Option(help="test without the HPKE envelope")] = False,
    timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    kind: Annotated[str, typer.Option(help="nlps1 (reference TTP), gpas, tres, tres+nlps1, tres+gpas")] = (
        "nlps1"),
    option: Annotated[list[str] | None, typer.Option("--option", help="KEY=VALUE for --kind (repeatable, "
                                                     "dotted keys nest; secrets by *_env name)")] = None,
) -> None:
    """Probe a TTP: metadata, public key, authentication and one round trip with a synthetic value."""
    if kind != "nlps1":
        ok = asyncio.run(_check_kind(kind, url, registry, option or []))
    else:
        ok = asyncio.run(_check(url, registry, api_key, ca_file, plain, timeout))
    if not ok:
        raise typer.Exit(1)


async def _check_kind(kind: str, url: str, registry: str, pairs: list[str]) -> bool:
    """gPAS / TRES / routed set-ups (docs/backends/): probe, deterministic round trip, MRN reversal."""
    from gateway.config import secret_from_env
    from gateway.ttp.factory import check_configured, options_from_pairs

    try:
        options = options_from_pairs(pairs, kind=kind, url=url, registry=registry)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    steps = await check_configured(kind, options, registry=registry, provider="check", secret=secret_from_env)
    for name, ok, detail in steps:
        console.print(f"[{'green' if ok else 'red'}]{'ok  ' if ok else 'FAIL'}[/] {name}: {detail}",
                      highlight=False)
    good = bool(steps) and all(ok for _, ok, _ in steps)
    console.print(f"[{'green' if good else 'red'}]verdict: {kind} TTP {'usable' if good else 'NOT usable'} "
                  f"for {registry}[/]", highlight=False)
    return good


async def _check(url: str, registry: str, api_key: str, ca_file: str | None, plain: bool,
                 timeout: float) -> bool:
    from gateway.ttp.client import HttpTTPClient

    def step(ok: bool, text: str) -> bool:
        console.print(f"[{'green' if ok else 'red'}]{'ok  ' if ok else 'FAIL'}[/] {text}", highlight=False)
        return ok

    async with HttpTTPClient(url, api_key, timeout=timeout, retries=1, sealed=not plain,
                             verify=ca_file or True) as client:
        try:
            await client.probe()
            step(True, f"metadata: {url}/metadata answers with a CapabilityStatement")
            if not plain:
                _, kid = await client.public_key()
                step(True, f"public key: HPKE X25519 key id {kid}")
        except TTPUnavailable as exc:
            step(False, str(exc))
            console.print("[red]verdict: TTP NOT usable[/red]")
            return False
        # A random pre-pseudonym: it stands for nobody, sent twice to show the answer is deterministic.
        synthetic = PrePseudonym("GG", 1, secrets.token_bytes(32))
        started = time.perf_counter()
        try:
            results = await client.pseudonymise(registry, [synthetic, synthetic])
        except TTPRejected as exc:
            hint = {401: "the API key is not accepted",
                    403: "this caller may not pseudonymise for the registry",
                    404: "the TTP does not know this registry domain"}.get(exc.status, exc.diagnostics)
            step(False, f"round trip: HTTP {exc.status}: {hint}")
            console.print("[red]verdict: TTP reachable but NOT usable with this key/registry[/red]")
            return False
        except TTPUnavailable as exc:
            step(False, f"round trip: {exc}")
            console.print("[red]verdict: TTP NOT usable[/red]")
            return False
        elapsed = (time.perf_counter() - started) * 1000
        values = [r.identifier_value for r in results]
        good = (values[0] is not None and values[0] == values[1]
                and re.fullmatch(r"v[1-9][0-9]*\.[A-Za-z0-9_-]{64}", values[0]) is not None)
        if not step(good, f"round trip: {'deterministic NLPS1 pseudonym' if good else 'unexpected answer'} "
                          f"({elapsed:.0f} ms, {'sealed' if not plain else 'plain'})"):
            console.print("[red]verdict: TTP answers but NOT correctly[/red]")
            return False
        version = values[0].split(".", 1)[0] if values[0] else "?"
        console.print(f"[green]verdict: TTP usable for {registry} (domain key {version})[/green]",
                      highlight=False)
        return True
