"""The whole gateway against the gPAS and gICS stubs, chosen by configuration alone (no code changes)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import httpx
import orjson

from gateway.config import ClientConfig, GatewayConfig, ProviderConfig, RegistryConfig, Settings, TTPConfig
from gateway.deid.leakscan import scan
from gateway.keys import init_keys, load_keys
from gateway.optout import objection_digest
from gateway.receiver.app import create_receiver_app
from gateway.runtime import build_runtime
from gateway.service.app import create_app
from gateway.service.auth import hash_api_key
from gateway.serving import serve_in_thread
from tests.stubs.gics_stub import POLICY_SYSTEM, GicsState, StoredConsent, create_gics_stub
from tests.stubs.gpas_stub import GpasState, create_gpas_stub

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "02-nlps1-vector-patients-transaction.json"
PROVIDER, REGISTRY = "ura:00000000", "example-generic"
MRN_SYSTEM = "http://ehr.example.org/fhir/NamingSystem/patient-number"


def test_gateway_with_gpas_pseudonyms_and_gics_objections(tmp_path):
    from gateway.bootstrap import ttp_backend

    gpas = GpasState(domains={"gw-example-generic": "gp_"})
    gics = GicsState(domain="registry-objections")
    init_keys(tmp_path / "keys", [PROVIDER])
    keys = load_keys(tmp_path / "keys", [PROVIDER])
    bundle = json.loads(EXAMPLE.read_text())
    objector = bundle["entry"][4]["resource"]  # the second vector person objects in gICS
    objector_mrn = next(i["value"] for i in objector["identifier"] if i.get("system") == MRN_SYSTEM).strip()
    gics.records[objection_digest(keys.objection_key(), PROVIDER, objector_mrn)] = [StoredConsent()]
    ehr_key = "ehr-test-key"
    with ExitStack() as stack:
        gpas_url = stack.enter_context(serve_in_thread(create_gpas_stub(gpas)))
        gics_url = stack.enter_context(serve_in_thread(create_gics_stub(gics)))
        receiver_url = stack.enter_context(
            serve_in_thread(create_receiver_app(tmp_path / "receiver", scan=scan))
        )
        ttp = TTPConfig(kind="gpas", options={"url": gpas_url, "domains": {REGISTRY: "gw-example-generic"}})
        gics_block = {
            "url": gics_url,
            "domain": "registry-objections",
            "objection_policies": [f"{POLICY_SYSTEM}|p-opt-out"],
        }
        config = GatewayConfig(
            providers=[ProviderConfig(id=PROVIDER, mrn_system=MRN_SYSTEM)],
            clients=[
                ClientConfig(
                    id="ehr", provider=PROVIDER, api_key_sha256=hash_api_key(ehr_key), registries=[REGISTRY]
                )
            ],
            registries={
                REGISTRY: RegistryConfig(
                    profile=REGISTRY,
                    endpoint=receiver_url,
                    optout=["gics", "bundle-consent"],
                    gics=gics_block,
                )
            },
            ttp=ttp,
        )
        settings = Settings(
            store_url=f"sqlite:///{tmp_path / 'gw.db'}", key_dir=tmp_path / "keys", worker_poll_seconds=0.05
        )
        runtime = build_runtime(
            config, settings, ttps={PROVIDER: ttp_backend(ttp, config.providers[0], tmp_path)}
        )
        gateway_url = stack.enter_context(serve_in_thread(create_app(runtime)))
        response = httpx.post(
            f"{gateway_url}/registries/{REGISTRY}/Bundle",
            content=EXAMPLE.read_bytes(),
            headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {ehr_key}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        params = {p["name"]: p for p in response.json()["parameter"]}
        assert params["patientsDroppedOptOut"]["valueInteger"] == 1
        delivered = orjson.loads(
            runtime.store.get(params["delivery"]["valueString"], with_payload=True).payload
        )

    # one pseudonymise request for the whole bundle, carrying pre-pseudonyms only
    batches = gpas.received("pseudonymizeAllowCreate")
    assert len(batches) == 1
    assert all(v.split(".", 2)[1].startswith("v") for v in batches[0])
    # gICS got keyed ids only, in one bulk request
    assert all(len(s) == 64 for s in gics.signer_ids_received())
    values = [
        i["value"]
        for e in delivered["entry"]
        if e["resource"]["resourceType"] == "Patient"
        for i in e["resource"]["identifier"]
    ]
    assert values and all(v.startswith("gp_") for v in values)
    assert objector_mrn not in orjson.dumps(delivered).decode()
