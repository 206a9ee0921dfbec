"""The chain with the gateway as a real OS process (`fhir-gateway serve --config`): kill and restart tests.

The reference TTP and the receiver run under uvicorn in threads of the test process; the gateway runs as a
subprocess configured exactly as an operator would: a YAML file, key files, secrets in the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.deid.leakscan import scan
from gateway.keys import init_keys, load_keys
from gateway.receiver.app import create_receiver_app
from gateway.service.auth import hash_api_key
from gateway.serving import free_port, serve_in_thread
from gateway.ttp.app import create_app as create_ttp_app
from gateway.ttp.auth import TTPAuth, hash_key
from gateway.ttp.keystore import init_keys as init_ttp_keys

PROVIDER = "ura:00000000"
MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class ProcessChain:
    work_dir: Path
    ttp_url: str
    receiver_url: str
    config_path: Path
    env: dict[str, str]
    ehr_api_key: str
    admin_api_key: str
    gateways: list[GatewayProcess] = field(default_factory=list)

    def start_gateway(
        self, *, port: int | None = None, log_level: str = "INFO", extra_env: dict[str, str] | None = None
    ) -> GatewayProcess:
        port = port or free_port()
        log_path = self.work_dir / f"gateway-{port}-{len(self.gateways)}.log"
        env = {
            **self.env,
            "FHIR_GATEWAY_PORT": str(port),
            "FHIR_GATEWAY_LOG_LEVEL": log_level,
            **(extra_env or {}),
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )
        gw = GatewayProcess(f"http://127.0.0.1:{port}", proc, log_path)
        _wait_ready(gw)
        self.gateways.append(gw)
        return gw

    def stop_all(self) -> None:
        for gw in self.gateways:
            with contextlib.suppress(Exception):
                gw.kill(signal.SIGTERM)


def _wait_ready(gw: GatewayProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}: {gw.logs()[-2000:]}")
        try:
            if httpx.get(f"{gw.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    gw.kill()
    raise RuntimeError("gateway did not become ready")


@contextlib.contextmanager
def process_chain(
    work_dir: Path,
    *,
    registries: tuple[str, ...] = ("example-generic",),
    store_url: str | None = None,
    receiver_faults: bool = True,
    profiles_dir: Path | None = None,
    registry_options: dict[str, Any] | None = None,
) -> Iterator[ProcessChain]:
    """TTP and receiver in threads of this process; gateways as their own OS processes (`start_gateway`).
    `registry_options` go into every registry's configuration (e.g. `{"strict": True}`)."""
    ttp_secret, ehr_secret, admin_secret = (os.urandom(24).hex() for _ in range(3))
    ttp_keys = init_ttp_keys(work_dir / "ttp-keys", list(registries))
    ttp_auth = TTPAuth.from_entries(
        [{"name": "gateway", "role": "provider", "provider": PROVIDER, "key_sha256": hash_key(ttp_secret)}]
    )
    init_keys(work_dir / "keys", [PROVIDER])
    with contextlib.ExitStack() as stack:
        ttp_url = stack.enter_context(serve_in_thread(create_ttp_app(ttp_keys, ttp_auth)))
        receiver_url = stack.enter_context(
            serve_in_thread(
                create_receiver_app(work_dir / "receiver", scan=scan, test_faults=receiver_faults)
            )
        )
        config = {
            "providers": [{"id": PROVIDER, "name": "Test hospital", "mrn_system": MRN_SYSTEM}],
            "clients": [
                {
                    "id": "ehr",
                    "provider": PROVIDER,
                    "api_key_sha256": hash_api_key(ehr_secret),
                    "registries": list(registries),
                }
            ],
            "registries": {
                r: {"profile": r, "endpoint": receiver_url, "timeout_seconds": 10, **(registry_options or {})}
                for r in registries
            },
            "ttp": {"url": ttp_url, "api_key_env": "TEST_TTP_KEY"},
            "admin_api_key_sha256": hash_api_key(admin_secret),
        }
        if profiles_dir is not None:
            config["profiles_dir"] = str(profiles_dir)
        config_path = work_dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "TEST_TTP_KEY": ttp_secret,
            "FHIR_GATEWAY_KEY_DIR": str(work_dir / "keys"),
            # this chain's own source key stands in for the ecosystem's (as the go-live check asks)
            "FHIR_GATEWAY_SOURCE_KEY_CHECK": load_keys(work_dir / "keys", [PROVIDER]).source_check_value,
            "FHIR_GATEWAY_STORE_URL": store_url or f"sqlite:///{work_dir / 'gateway.db'}",
            "FHIR_GATEWAY_WORKER_POLL_SECONDS": "0.05",
        }
        chain = ProcessChain(work_dir, ttp_url, receiver_url, config_path, env, ehr_secret, admin_secret)
        try:
            yield chain
        finally:
            chain.stop_all()


# -- process trees (Linux /proc) ----------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    """The pids of every living process below `pid` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (a zombie has ended: it only waits for its parent to reap it)."""
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            living.add(pid)
    return living
