"""`fhir-gateway worker`: the outbox worker as its own process, beside API processes started with
`serve --no-worker` (or FHIR_GATEWAY_RUN_WORKER=false), against one store.

Scale-out: API processes take bundles and commit them to the outbox; worker processes forward them. Leases in
the store keep workers apart (gateway/worker.py), on one host or several (PostgreSQL for several hosts).
A worker never asks the TTP anything and never sees unpseudonymised data: it reads and sends outbox payloads.
SIGTERM or SIGINT: it stops claiming, finishes what it is sending, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from gateway.runtime import Runtime

log = logging.getLogger("gateway.worker")


async def run_worker_process(runtime: Runtime, metrics_port: int | None = None) -> None:
    """Forward until a stop signal; then finish in-flight deliveries and close the clients."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if metrics_port is not None:
        try:
            _serve_metrics(runtime, metrics_port)
        except OSError as exc:  # the port is taken: one line for the operator, not a traceback
            raise SystemExit(f"fhir-gateway worker: metrics port {metrics_port}: {exc.strerror}") from None
    await runtime.start(run_worker=True, intake=False)
    log.info("outbox worker started", extra={"registries": len(runtime.registries)})
    try:
        await stop.wait()
    finally:
        await runtime.stop()


def _serve_metrics(runtime: Runtime, port: int) -> None:
    """Prometheus text on 127.0.0.1:<port>/ (delivery attempts and latency; no patient data in any label)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr="127.0.0.1", registry=runtime.metrics.registry)
