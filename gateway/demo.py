"""`fhir-gateway demo`: the whole chain on one machine, with fresh keys, in a few seconds.

Starts the reference TTP, a registry receiver and the gateway (SQLite store) as real HTTP servers on
127.0.0.1, replays the example bundles as an EHR would, and shows what arrived at the registry side.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from gateway.config import ClientConfig, GatewayConfig, ProviderConfig, RegistryConfig, Settings, TTPConfig
from gateway.replay import ReplayResult, expand, replay
from gateway.service.auth import hash_api_key
from gateway.serving import serve_in_thread

DEMO_BULK_PATIENTS = 40

PROVIDER = "ura:00000000"
MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"


@dataclass
class DemoChain:
    gateway_url: str
    ttp_url: str
    receiver_url: str
    ehr_api_keys: dict[str, str]  # provider id → the API key of that provider's EHR client
    admin_api_key: str
    work_dir: Path
    runtime: Any
    ttp_api_keys: dict[str, str] | None = None  # provider id → that provider's TTP key (tests)

    @property
    def ehr_api_key(self) -> str:
        return self.ehr_api_keys[PROVIDER]


@contextmanager
def embedded_chain(
    work_dir: Path,
    registries: list[str],
    *,
    providers: tuple[str, ...] = (PROVIDER,),
    store_url: str | None = None,
    run_worker: bool = True,
    receiver_faults: bool = False,
    ttp_sealed: bool = True,
    wrap_ttp_app: Callable[[Any], Any] | None = None,
    client_registries: dict[str, list[str]] | None = None,
) -> Iterator[DemoChain]:
    """TTP + receiver + gateway on loopback with fresh keys under `work_dir` (demo, tests, benchmarks).

    One EHR client per provider, allowed the registries in `client_registries[provider]` (default: all).
    """
    from gateway.deid.leakscan import scan
    from gateway.keys import init_keys
    from gateway.receiver.app import create_receiver_app
    from gateway.receiver.rekey import ttp_translator
    from gateway.runtime import build_runtime
    from gateway.service.app import create_app
    from gateway.ttp.app import create_app as create_ttp_app
    from gateway.ttp.auth import TTPAuth, hash_key
    from gateway.ttp.client import HttpTTPClient
    from gateway.ttp.keystore import init_keys as init_ttp_keys

    ttp_secrets = {p: os.urandom(24).hex() for p in providers}
    ehr_secrets = {p: os.urandom(24).hex() for p in providers}
    admin_secret = os.urandom(24).hex()
    ttp_keys = init_ttp_keys(work_dir / "ttp-keys", registries)
    holder_secret = os.urandom(24).hex()  # the registry holder's TTP key, for re-keying after a rotation
    callers = [
        {"name": f"gateway-{n}", "role": "provider", "provider": p, "key_sha256": hash_key(ttp_secrets[p])}
        for n, p in enumerate(providers)
    ]
    callers.append(
        {
            "name": "registry-holder",
            "role": "registry",
            "registries": list(registries),
            "key_sha256": hash_key(holder_secret),
        }
    )
    ttp_auth = TTPAuth.from_entries(callers)
    init_keys(work_dir / "keys", list(providers))
    with ExitStack() as stack:
        ttp_app = create_ttp_app(ttp_keys, ttp_auth)
        ttp_url = stack.enter_context(serve_in_thread(wrap_ttp_app(ttp_app) if wrap_ttp_app else ttp_app))
        translate = ttp_translator(ttp_url, holder_secret, registries[0])  # MRNs name their provider
        receiver = create_receiver_app(
            work_dir / "receiver", scan=scan, test_faults=receiver_faults, translate=translate
        )
        receiver_url = stack.enter_context(serve_in_thread(receiver))
        allowed = client_registries or {}
        config = GatewayConfig(
            providers=[
                ProviderConfig(id=p, name=f"Demo hospital {n}", mrn_system=MRN_SYSTEM)
                for n, p in enumerate(providers)
            ],
            clients=[
                ClientConfig(
                    id=f"ehr-{n}",
                    provider=p,
                    api_key_sha256=hash_api_key(ehr_secrets[p]),
                    registries=allowed.get(p, registries),
                )
                for n, p in enumerate(providers)
            ],
            registries={r: RegistryConfig(profile=r, endpoint=receiver_url) for r in registries},
            ttp=TTPConfig(url=ttp_url),
            admin_api_key_sha256=hash_api_key(admin_secret),
        )
        settings = Settings(
            store_url=store_url or f"sqlite:///{work_dir / 'gateway.db'}",
            key_dir=work_dir / "keys",
            worker_poll_seconds=0.05,
            bulk_work_dir=work_dir / "bulk",
        )
        ttps = {p: (HttpTTPClient(ttp_url, ttp_secrets[p], sealed=ttp_sealed), "nlps1") for p in providers}
        runtime = build_runtime(config, settings, ttps=ttps)
        gateway_url = stack.enter_context(serve_in_thread(create_app(runtime, run_worker=run_worker)))
        yield DemoChain(
            gateway_url, ttp_url, receiver_url, ehr_secrets, admin_secret, work_dir, runtime, ttp_secrets
        )


def run_demo(examples: Path, *, registry: str, work_dir: Path | None, console: Console) -> int:
    files = expand([examples])
    if not files:
        console.print(f"[red]no example bundles in {examples}[/red]")
        return 2
    temp = work_dir is None
    if work_dir is not None and work_dir.is_dir() and any(work_dir.iterdir()):
        # the demo makes fresh keys and refuses to overwrite any (a second run ended in a traceback)
        console.print(f"[red]{work_dir} is not empty: the demo needs a new or empty work folder[/red]")
        return 2
    work = Path(tempfile.mkdtemp(prefix="fhir-gateway-demo-")) if temp else work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(
            Panel.fit(
                "Starting the embedded chain on 127.0.0.1: reference TTP (fresh keys), registry receiver, "
                f"gateway (SQLite)\nwork folder: {work}",
                title="fhir-gateway demo",
            )
        )
        with embedded_chain(work, [registry]) as chain:
            console.print(
                f"TTP {chain.ttp_url}   receiver {chain.receiver_url}   gateway {chain.gateway_url}"
            )
            results = replay(files, base_url=chain.gateway_url, registry=registry, api_key=chain.ehr_api_key)
            console.print(_results_table(results))
            _show_registry_side(chain, console)
            bulk_ok = _show_bulk_delivery(chain, registry, work / "bulk-export", console)
        failed = [r for r in results if r.status >= 400 or r.status == 0]
        if not bulk_ok:
            console.print("[red]demo finished: the yearly delivery ($import) did not complete[/red]")
            return 1
        console.print(
            "[green]demo finished: every example went through the chain[/green]"
            if not failed
            else f"[red]demo finished with {len(failed)} failed deliveries[/red]"
        )
        return 1 if failed else 0
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def _results_table(results: list[ReplayResult]) -> Table:
    table = Table(title="1. What the EHR posted, and what the gateway answered")
    for col in ("example", "HTTP", "outcome", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.file, str(r.status), r.outcome, r.detail)
    return table


def _show_registry_side(chain: DemoChain, console: Console) -> None:
    with httpx.Client(base_url=chain.receiver_url, timeout=30) as client:
        deliveries = client.get("/deliveries").json()
        table = Table(title="2. What arrived at the registry (receiver, leak-scanned on arrival)")
        for col in ("bundle", "received", "resources"):
            table.add_column(col)
        for d in deliveries:
            counts = d.get("resourceCounts") or {}
            table.add_row(
                str(d.get("id")),
                str(d.get("receivedAt", "")),
                ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            )
        console.print(table)
        patient = _first_patient(client, deliveries)
    if patient:
        text = orjson.dumps(patient, option=orjson.OPT_INDENT_2).decode()
        console.print(
            Panel(
                Syntax(text, "json", word_wrap=True),
                title="3. A Patient as the registry sees it: pseudonyms only",
            )
        )


def _show_bulk_delivery(chain: DemoChain, registry: str, export: Path, console: Console) -> bool:
    """The yearly delivery: a synthetic Bulk Data export (generated here, one patient objecting) uploaded to
    `$import`, followed through its status resource until the job is done."""
    from gateway.bulk.commands import summary_table
    from gateway.bulk.summary import BulkSummary
    from gateway.bulk.synth import SynthSpec, write_export

    write_export(export, SynthSpec(patients=DEMO_BULK_PATIENTS, resources_per_patient=10, objecting={3}))
    body = b"".join(path.read_bytes() for path in sorted(export.glob("*.ndjson")))
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    with httpx.Client(base_url=chain.gateway_url, timeout=60, headers=auth) as client:
        ndjson = {"Content-Type": "application/fhir+ndjson"}
        answer = client.post(f"/registries/{registry}/$import", content=body, headers=ndjson)
        if answer.status_code != 202:
            console.print(f"[red]$import answered {answer.status_code}[/red]")
            return False
        location = answer.headers["Content-Location"]
        while (status := client.get(location)).status_code == 202:
            time.sleep(0.2)
    job = status.json()
    if job.get("state") != "completed":
        console.print(f"[red]$import job {location}: {job.get('state')} ({job.get('error')})[/red]")
        return False
    table = summary_table(BulkSummary.from_dict(job["summary"]))  # as `fhir-gateway bulk` prints it
    table.title = f"4. The yearly delivery: {len(body) / 1e6:.1f} MB of NDJSON through $import ({location})"
    console.print(table)
    return True


def _first_patient(client: httpx.Client, deliveries: list[dict]) -> dict | None:
    for d in deliveries:
        bundle = client.get(f"/Bundle/{d['id']}").json()
        for entry in bundle.get("entry", []):
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "Patient" and resource.get("identifier"):
                return resource
    return None
