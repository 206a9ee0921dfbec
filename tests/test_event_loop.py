"""A large Bundle does not take the event loop: /healthz and other EHRs are answered while it is processed.

A probe saw a 100,000-entry Bundle hold the served gateway for seconds, /healthz included, so that an
orchestrator would have restarted it mid-delivery. The check is relative, not a timed goal: the longest wait
for /healthz during the post must be a small part of the post itself (before the fix it was most of it)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import orjson
import pytest

from gateway.bulk.chains import offline_chains
from gateway.outcome import FhirError
from gateway.process import process_bundle
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


@pytest.mark.parametrize("entry", [404, True, "x", {"resource": {}}])
def test_a_bundle_whose_entry_is_no_list_is_a_400_on_the_served_path(tmp_path, entry):
    """The fuzz test found it: the size of a served Bundle was taken before validation, and `entry: 404`
    was a 500."""
    chains = offline_chains("example-generic", tmp_path)
    bundle_doc = {"resourceType": "Bundle", "type": "transaction", "entry": entry}
    run = process_bundle(
        bundle_doc,
        registry=chains.registry,
        provider=chains.provider,
        validator=chains.validator,
        mapping=chains.mapping,
        serving=True,
    )
    with pytest.raises(FhirError) as info:
        asyncio.run(run)
    assert info.value.status == 400
