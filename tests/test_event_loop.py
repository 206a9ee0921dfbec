"""A large Bundle does not take the event loop: /healthz and other EHRs are answered while it is processed.

A probe saw a 100,000-entry Bundle hold the served gateway for seconds, /healthz included, so that an
orchestrator would have restarted it mid-delivery. The check is relative, not a timed goal: the longest wait
for /healthz during the post must be a small part of the post itself (before the fix it was most of it)."""

from __future__ import annotations

import threading
import time

import httpx
import orjson

from tests.badinput.generate import MRN_SYSTEM as GENERATED_MRN_SYSTEM
from tests.badinput.generate import bundle, observation, patient
from tests.processes import MRN_SYSTEM, process_chain

ENTRIES = 12_000


def test_healthz_is_answered_while_a_large_bundle_is_processed(tmp_path):
    numbers = [{"system": MRN_SYSTEM, "value": "P0001234"}]
    assert GENERATED_MRN_SYSTEM != MRN_SYSTEM  # the gateway here knows its patients by another system
    one_patient = patient(identifier=numbers)
    body = orjson.dumps(bundle(one_patient, *(observation() for _ in range(ENTRIES))))
    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway()
        headers = {
            "Content-Type": "application/fhir+json",
            "Authorization": f"Bearer {chain.ehr_api_key}",
            "Prefer": "respond-async",
        }
        posted: dict[str, object] = {}

        def post() -> None:
            started = time.monotonic()
            response = httpx.post(
                f"{gw.url}/registries/example-generic/Bundle", content=body, headers=headers, timeout=300
            )
            posted.update(status=response.status_code, seconds=time.monotonic() - started, text=response.text)

        waits: list[float] = []
        sender = threading.Thread(target=post)
        with httpx.Client(base_url=gw.url, timeout=300) as client:
            sender.start()
            while sender.is_alive():
                asked = time.monotonic()
                assert client.get("/healthz").status_code == 200
                waits.append(time.monotonic() - asked)
        sender.join()
    assert posted["status"] == 202, posted["text"]
    assert len(waits) > 10  # /healthz was asked all through the post
    assert max(waits) < posted["seconds"] / 4, (max(waits), posted["seconds"])
