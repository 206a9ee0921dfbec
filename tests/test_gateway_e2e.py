"""The whole chain over real HTTP: reference TTP, registry receiver and gateway under uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.deid.leakscan import scan
from gateway.demo import PROVIDER, embedded_chain
from tests.identity import identifying_values, leaked_kinds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REGISTRY = "example-generic"
FHIR = {"Content-Type": "application/fhir+json"}


def _post(
    chain,
    path: Path | bytes,
    *,
    key: str | None = None,
    headers: dict | None = None,
    registry: str = REGISTRY,
) -> httpx.Response:
    body = path.read_bytes() if isinstance(path, Path) else path
    h = {**FHIR, "Authorization": f"Bearer {key or chain.ehr_api_key}", **(headers or {})}
    return httpx.post(
        f"{chain.gateway_url}/registries/{registry}/Bundle", content=body, headers=h, timeout=60
    )


def _transaction(patient_entry: dict, *resources: dict) -> bytes:
    """A transaction Bundle: the given Patient entry, then each resource POSTed under a fresh urn:uuid."""
    entries = [patient_entry] + [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": r,
            "request": {"method": "POST", "url": r["resourceType"]},
        }
        for r in resources
    ]
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _received(chain) -> list[dict]:
    deliveries = httpx.get(f"{chain.receiver_url}/deliveries").json()
    return [httpx.get(f"{chain.receiver_url}/Bundle/{d['id']}").json() for d in deliveries]


def _wait_until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _fault(chain, **fault) -> None:
    """The registry's next answer(s), once nothing else is on its way to it: an earlier test's delivery
    still in flight would take the fault meant for this test's Bundle."""
    _wait_until(lambda: (d := chain.runtime.store.depth())["queued"] + d["delivering"] == 0)
    httpx.post(f"{chain.receiver_url}/_faults", json=fault)


class RecordingTTP:
    """Wraps the real TTP app and keeps every request body it receives (the TTP's request log)."""

    def __init__(self, app) -> None:
        self.app, self.bodies, self.paths = app, [], []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.paths.append(scope["path"])
        chunks = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(b"".join(chunks))
            return message

        return await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    recorder: dict[str, RecordingTTP] = {}

    def wrap(app):
        recorder["ttp"] = RecordingTTP(app)
        return recorder["ttp"]

    with embedded_chain(
        tmp_path_factory.mktemp("e2e"),
        [REGISTRY, "example-cancer-registry"],
        receiver_faults=True,
        ttp_sealed=False,
        wrap_ttp_app=wrap,
    ) as c:
        c.ttp_recorder = recorder["ttp"]
        yield c


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_example_arrives_pseudonymised(chain, example):
    response = _post(chain, example)
    assert response.status_code == 200, response.text
    params = {p["name"]: p for p in response.json()["parameter"]}
    assert params["status"]["valueCode"] == "delivered"
    delivery = params["delivery"]["valueString"]
    stored = httpx.get(
        f"{chain.gateway_url}/deliveries/{delivery}", headers={"Authorization": f"Bearer {chain.ehr_api_key}"}
    ).json()
    assert stored["status"] == "delivered" and stored["registryStatus"] == 200

    arrived = [b for b in _received(chain) if b["identifier"]["value"] == _identifier_of(chain, delivery)]
    assert len(arrived) == 1
    out = arrived[0]
    assert scan(out) == []
    text = orjson.dumps(out).decode()
    assert leaked_kinds(json.loads(example.read_text()), text) == []
    assert chain.ttp_url.split("//")[1] not in text  # the TTP's address in the hospital: not the registry's
    patients = [e["resource"] for e in out["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert patients, "the registry must receive the pseudonymised patient"
    for patient in patients:
        assert all(i["type"]["coding"][0]["code"] == "PSEUDED" for i in patient["identifier"])
        assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"} in [
            {k: s[k] for k in ("system", "code")} for s in patient["meta"]["security"]
        ]


def _identifier_of(chain, delivery_id: str) -> str:
    d = chain.runtime.store.get(delivery_id, with_payload=True)
    return orjson.loads(d.payload)["identifier"]["value"]


def test_opted_out_patient_never_reaches_ttp_nor_registry(chain):
    from gateway.keys import load_keys
    from gateway.pseudonym.extract import extract_inputs
    from gateway.pseudonym.mapping import load_input_mapping
    from gateway.pseudonym.source import SourceStage

    example = EXAMPLES / "03-opt-out-transaction.json"
    bundle = json.loads(example.read_text())
    objector = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "objector-1")
    keys = load_keys(chain.work_dir / "keys", [PROVIDER])
    stage = SourceStage(keys.source_keys, keys.source_version, keys.provider_mrn[PROVIDER], PROVIDER)
    types = chain.runtime.registries[REGISTRY].types
    extraction = extract_inputs(
        objector, types, load_input_mapping(), chain.runtime.providers[PROVIDER].mrn_system
    )
    objector_pres = [p.value for p in stage.pre_pseudonyms(extraction, REGISTRY)]
    assert objector_pres, "the objector would have had pseudonyms: the check below must mean something"

    chain.runtime.providers[PROVIDER].ttp.clear()  # the gateway's pseudonym cache would hide the TTP call
    before = len(chain.ttp_recorder.bodies)
    response = _post(chain, example, headers={"Idempotency-Key": "opt-out-check"})
    assert response.status_code == 200, response.text
    params = {p["name"]: p for p in response.json()["parameter"]}
    assert params["patientsDroppedOptOut"]["valueInteger"] == 1
    # the EHR sees what was dropped for the objection, per resource type (types and counts, no values)
    objector_types = Counter(
        e["resource"]["resourceType"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] != "Patient" and "objector-1" in orjson.dumps(e["resource"]).decode()
    )
    dropped = {p["name"]: p["valueInteger"] for p in params["resourcesDropped"]["part"]}
    assert dropped["opted-out:Patient"] == 1
    for rtype, n in objector_types.items():
        assert dropped[f"opted-out:{rtype}"] == n, rtype

    sent_to_ttp = b"".join(chain.ttp_recorder.bodies[before:])
    assert sent_to_ttp, "the other patient was pseudonymised, so the TTP was called"
    from gateway.pseudonym.nlps1 import b64u

    for pre in objector_pres:
        assert b64u(pre).encode() not in sent_to_ttp
    # nothing of the objector at the registry: no resource whose original id was theirs survives
    delivered = orjson.loads(
        chain.runtime.store.get(params["delivery"]["valueString"], with_payload=True).payload
    )
    types_out = [e["resource"]["resourceType"] for e in delivered["entry"]]
    assert types_out.count("Patient") == 1
    assert "Consent" not in types_out
    # a probe: the audit trail said how many were withheld, never why; now the reasons' fixed codes
    (event,) = [
        e
        for e in chain.runtime.store.list_audit(registry=REGISTRY)
        if e.delivery_id == params["delivery"]["valueString"] and e.event == "accepted"
    ]
    assert event.counts["optOutReasons"] == {"consent-deny": 1}


def test_an_idempotency_key_used_again_for_another_bundle_is_refused(chain):
    """The same key with another body used to answer with the earlier delivery: the new Bundle was never
    delivered and the EHR was not told (a fresh-eyes finding). The first body again is still a re-post."""
    example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
    first = _post(chain, example, headers={"Idempotency-Key": "reused-key"})
    assert first.status_code == 200, first.text
    other = orjson.loads(example.read_bytes())
    other["entry"][3]["resource"]["effectiveDateTime"] = "2025-06-01T10:00:00+02:00"
    refused = _post(chain, orjson.dumps(other), headers={"Idempotency-Key": "reused-key"})
    assert refused.status_code == 422, refused.text
    issue = refused.json()["issue"][0]
    assert issue["code"] == "business-rule" and "Idempotency-Key" in issue["diagnostics"]
    again = _post(chain, example, headers={"Idempotency-Key": "reused-key"})
    ids = [{p["name"]: p for p in r.json()["parameter"]}["delivery"]["valueString"] for r in (first, again)]
    assert again.status_code == 200 and ids[0] == ids[1]
    # a probe: the re-post's answer had a status and no counts; it has the first answer's now
    skip = ("pseudonymTypes", "registryStatus")
    counts = [{p["name"]: p for p in r.json()["parameter"] if p["name"] not in skip} for r in (first, again)]
    assert counts[0] == counts[1] and counts[0]["resourcesDelivered"]["valueInteger"] > 0


def test_a_bundle_identifier_used_again_for_other_content_is_refused_and_a_regenerated_bundle_is_not(chain):
    """A fresh-eyes finding: a changed Bundle under the same Bundle.identifier was answered 2xx with the
    earlier delivery and never delivered. A regenerated one (serialised again, re-stamped, new urn:uuids)
    is still a re-post, and so is a re-serialised body under the same Idempotency-Key."""
    import re
    import uuid

    example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
    original = orjson.loads(example.read_bytes())
    original["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
    first = _post(chain, orjson.dumps(original))
    assert first.status_code == 200, first.text
    text = orjson.dumps(original, option=orjson.OPT_INDENT_2).decode()
    for urn in set(re.findall(r"urn:uuid:[0-9a-f-]{36}", text)) - {original["identifier"]["value"]}:
        text = text.replace(urn, f"urn:uuid:{uuid.uuid4()}")  # the EHR mints new fullUrls for a retry
    regenerated = orjson.loads(text)
    regenerated["timestamp"] = "2026-11-24T12:00:00+01:00"
    regenerated["entry"][0]["resource"]["meta"] = {"lastUpdated": "2026-11-24T12:00:00+01:00"}
    again = _post(chain, orjson.dumps(regenerated, option=orjson.OPT_INDENT_2))
    ids = [{p["name"]: p for p in r.json()["parameter"]}["delivery"]["valueString"] for r in (first, again)]
    assert again.status_code == 200 and ids[0] == ids[1], again.text
    changed = orjson.loads(orjson.dumps(original))
    changed["entry"][3]["resource"]["effectiveDateTime"] = "2025-06-01T10:00:00+02:00"
    refused = _post(chain, orjson.dumps(changed))
    assert refused.status_code == 422 and "Bundle.identifier" in refused.text, refused.text
    # other content that is not valid either: what is wrong with it is said, not the key (a probe)
    changed["entry"][3]["resource"]["effectiveDateTime"] = "2025-13-01"
    invalid = _post(chain, orjson.dumps(changed))
    assert invalid.status_code == 400 and "Bundle.identifier" not in invalid.text, invalid.text
    assert "Bundle.entry[3].resource.effectiveDateTime" in invalid.text
    keyed = _post(chain, example, headers={"Idempotency-Key": "reserialised"})
    pretty = orjson.dumps(orjson.loads(example.read_bytes()), option=orjson.OPT_INDENT_2)
    same = _post(chain, pretty, headers={"Idempotency-Key": "reserialised"})
    assert keyed.status_code == 200 and same.status_code == 200, same.text


def test_a_re_post_that_is_no_valid_bundle_is_refused_not_answered_with_the_delivery(chain):
    """A probe: the content digest covers the entries, so a re-post with `resourceType: Patient` at the top,
    a bogus `signature`, or a fullUrl with a space (in an entry nothing refers to) was answered 200 with the
    earlier delivery, though a fresh post of any of them is refused."""
    bundle = orjson.loads((EXAMPLES / "04-synthea-transaction.json").read_bytes())
    bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
    assert _post(chain, orjson.dumps(bundle)).status_code == 200
    not_a_bundle = {**bundle, "resourceType": "Patient"}
    bogus = {**bundle, "signature": {"bogus": 1}, "total": -5}
    spaced = orjson.loads(orjson.dumps(bundle))
    referenced = orjson.dumps([e["resource"] for e in bundle["entry"]]).decode()
    lonely = next(e for e in spaced["entry"] if e["fullUrl"] not in referenced)
    lonely["fullUrl"] = "http://x/Zwartkopje/0612398765 x"
    for again, status in ((not_a_bundle, 422), (bogus, 400), (spaced, 400)):
        response = _post(chain, orjson.dumps(again))
        assert response.status_code == status, response.text
        assert "Zwartkopje" not in response.text and "0612398765" not in response.text
    # a later probe: the digest leaves meta stamps out, and a re-post whose lastUpdated is no instant, or
    # whose versionId has spaces, was answered 200 (a fresh post of it is refused)
    for stamp, value in (("lastUpdated", "garbage"), ("lastUpdated", "999911120"), ("versionId", "a b c")):
        stamped = orjson.loads(orjson.dumps(bundle))
        stamped["entry"][0]["resource"].setdefault("meta", {})[stamp] = value
        response = _post(chain, orjson.dumps(stamped))
        assert response.status_code == 400 and f"meta.{stamp}" in response.text, response.text
        assert "999911120" not in response.text
    assert _post(chain, orjson.dumps(bundle)).status_code == 200  # the same Bundle again: the delivery
    # a second probe: without a key or Bundle.identifier a re-post is known by a digest that leaves fullUrls
    # out, and one with two entries of one fullUrl was answered 200
    plain = orjson.loads((EXAMPLES / "01-nictiz-nl-core-transaction.json").read_bytes())
    plain.pop("identifier", None)
    plain["entry"][0]["resource"]["language"] = f"nl-x{uuid.uuid4().hex[:8]}"  # a Bundle not posted before
    first = _post(chain, orjson.dumps(plain))
    assert {p["name"]: p for p in first.json()["parameter"]}["status"]["valueCode"] == "delivered"
    plain["entry"][1]["fullUrl"] = plain["entry"][0]["fullUrl"]
    doubled = _post(chain, orjson.dumps(plain))
    assert doubled.status_code == 422 and "duplicate fullUrl" in doubled.text, doubled.text


def test_same_bundle_twice_is_one_delivery(chain):
    example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
    first = _post(chain, example, headers={"Idempotency-Key": "same-twice"})
    second = _post(chain, example, headers={"Idempotency-Key": "same-twice"})
    assert first.status_code == 200 and second.status_code == 200
    ids = [{p["name"]: p for p in r.json()["parameter"]}["delivery"]["valueString"] for r in (first, second)]
    assert ids[0] == ids[1]
    listing = httpx.get(
        f"{chain.gateway_url}/deliveries", headers={"Authorization": f"Bearer {chain.ehr_api_key}"}
    )
    assert sum(1 for d in listing.json() if d["id"] == ids[0]) == 1


def test_async_request_pattern(chain):
    response = _post(
        chain,
        EXAMPLES / "02-nlps1-vector-patients-transaction.json",
        headers={"Prefer": "respond-async", "Idempotency-Key": "async-1"},
    )
    assert response.status_code == 202
    status_url = chain.gateway_url + response.headers["Content-Location"]
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    final = _wait_until(lambda: (r := httpx.get(status_url, headers=auth)).status_code == 200 and r)
    assert final.json()["status"] == "delivered"


def test_registry_503_then_200_is_delivered_once(chain):
    _fault(chain, status=503, count=1)
    before = httpx.get(f"{chain.receiver_url}/").json()["bundles"]
    response = _post(
        chain,
        EXAMPLES / "02-nlps1-vector-patients-transaction.json",
        headers={"Idempotency-Key": "fault-503"},
    )
    assert response.status_code in (200, 202)
    delivery = response.headers["Content-Location"]
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    final = _wait_until(
        lambda: (r := httpx.get(chain.gateway_url + delivery, headers=auth)).status_code == 200 and r.json()
    )
    assert final["status"] == "delivered" and final["attempts"] == 2
    assert httpx.get(f"{chain.receiver_url}/").json()["bundles"] == before + 1


def test_a_synchronous_post_is_answered_queued_once_an_attempt_failed(chain):
    """A probe: with the registry down, a synchronous post held the EHR's connection for 20 s before its
    202; once an attempt has failed, the answer is known (queued for its retry) and given at once."""
    _fault(chain, status=503, count=2, retry_after="2")
    response = _post(
        chain,
        EXAMPLES / "02-nlps1-vector-patients-transaction.json",
        headers={"Idempotency-Key": "fault-503-twice"},
    )
    assert response.status_code == 202, response.text
    assert {p["name"]: p for p in response.json()["parameter"]}["status"]["valueCode"] == "queued"
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    # while it waits, its status says where it stands (it was an empty 202, a probe)
    waiting = httpx.get(chain.gateway_url + response.headers["Content-Location"], headers=auth)
    assert waiting.status_code == 202  # its retry is two seconds away (the registry's Retry-After)
    view = waiting.json()
    assert view["status"] == waiting.headers["X-Progress"] == "queued" and view["registryStatus"] == 503
    assert view["attempts"] == 1 and "nextAttemptAt" in view and waiting.headers["Retry-After"] in ("1", "2")
    final = _wait_until(
        lambda: (r := httpx.get(chain.gateway_url + response.headers["Content-Location"], headers=auth))
        .status_code
        == 200
        and r.json()
    )
    assert final["status"] == "delivered" and final["attempts"] == 3


def test_a_later_post_of_any_patient_of_a_waiting_bundle_goes_after_it(chain):
    """A probe: a Bundle of several patients was ordered by its first only. Waiting for its retry, a later
    post of its second patient went first, and the retried older Bundle then overwrote it at the registry."""
    example = orjson.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes())
    example["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
    second = {**example, "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}}
    second["entry"] = [e for e in example["entry"] if e["resource"]["id"].startswith("vector-2")]
    second["entry"][3]["resource"]["valueQuantity"] = {"value": 99, "unit": "kg"}
    before = len(_received(chain))
    _fault(chain, status=503, count=1, retry_after="2")
    first = _post(chain, orjson.dumps(example), headers={"Prefer": "respond-async"})
    assert first.status_code == 202, first.text
    _wait_until(lambda: httpx.get(f"{chain.receiver_url}/_faults").json() == [])  # the four were refused
    later = _post(chain, orjson.dumps(second))
    assert later.status_code in (200, 202), later.text
    received = _wait_until(lambda: len(r := _received(chain)) >= before + 2 and r)
    patients = [sum(e["resource"]["resourceType"] == "Patient" for e in b["entry"]) for b in received]
    patients = patients[before:]
    assert patients == [4, 1]  # the Bundle of four first (retried), then the later post of one of them


def test_an_old_dead_letter_is_not_requeued_over_a_newer_delivery_of_its_patients(chain):
    """A probe: a dead letter requeued after a newer delivery of the same patient went through overwrote
    that newer version at the registry. Refused now (409), unless the operator forces it."""
    example = orjson.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes())
    one = {**example, "entry": [e for e in example["entry"] if e["resource"]["id"].startswith("vector-3")]}
    older = {**one, "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}}
    newer = {**one, "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}}
    newer["entry"] = [dict(e) for e in one["entry"]]
    amended = {**newer["entry"][3]["resource"], "status": "amended"}
    newer["entry"][3] = {**newer["entry"][3], "resource": amended}
    _fault(chain, status=422, count=1)
    dead = _post(chain, orjson.dumps(older))
    assert dead.status_code == 422, dead.text
    dead_id = {p["name"]: p for p in dead.json()["parameter"]}["delivery"]["valueString"]
    assert _post(chain, orjson.dumps(newer)).status_code == 200
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    refused = httpx.post(f"{chain.gateway_url}/deliveries/{dead_id}/$requeue", headers=auth)
    assert refused.status_code == 409 and "newer delivery" in refused.text, refused.text
    assert httpx.get(f"{chain.gateway_url}/deliveries/{dead_id}", headers=auth).json()["status"] == "dead"
    forced = httpx.post(f"{chain.gateway_url}/deliveries/{dead_id}/$requeue?force=true", headers=auth)
    assert forced.status_code == 200, forced.text


def test_a_synchronous_post_behind_a_failed_delivery_of_its_patient_is_answered_queued(chain):
    """A re-probe: a sync post of a patient whose earlier delivery failed and waits for its retry had no
    attempt of its own, and held the EHR's connection until the retry went (up to 20 s)."""
    example = orjson.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes())
    one = [e for e in example["entry"] if e["resource"]["id"].startswith("vector-4")]
    first = {**example, "entry": one, "identifier": {"system": "urn:x", "value": str(uuid.uuid4())}}
    later = {**first, "identifier": {"system": "urn:x", "value": str(uuid.uuid4())}}
    later["entry"] = [dict(e) for e in one]
    amended = {**later["entry"][3]["resource"], "status": "amended"}
    later["entry"][3] = {**later["entry"][3], "resource": amended}
    _fault(chain, status=503, count=1, retry_after="5")
    assert _post(chain, orjson.dumps(first), headers={"Prefer": "respond-async"}).status_code == 202
    _wait_until(lambda: httpx.get(f"{chain.receiver_url}/_faults").json() == [])  # its attempt failed
    behind = _post(chain, orjson.dumps(later))
    assert behind.status_code == 202, behind.text  # not 200 five seconds later, after the retry
    assert {p["name"]: p for p in behind.json()["parameter"]}["status"]["valueCode"] == "queued"
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    final = _wait_until(
        lambda: (r := httpx.get(chain.gateway_url + behind.headers["Content-Location"], headers=auth))
        .status_code
        == 200
        and r.json()
    )
    assert final["status"] == "delivered"


def test_registry_429_retry_after_is_honoured(chain):
    _fault(chain, status=429, count=1, retry_after="1")
    started = time.monotonic()
    response = _post(
        chain,
        EXAMPLES / "02-nlps1-vector-patients-transaction.json",
        headers={"Idempotency-Key": "fault-429"},
    )
    assert response.status_code in (200, 202)
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    final = _wait_until(
        lambda: (
            (
                r := httpx.get(chain.gateway_url + response.headers["Content-Location"], headers=auth)
            ).status_code
            == 200
            and r.json()
        )
    )
    assert final["status"] == "delivered"
    assert time.monotonic() - started >= 0.9  # waited as the registry asked


def test_registry_400_goes_to_dead_letters_and_can_be_requeued(chain):
    _fault(chain, status=400, count=1)
    response = _post(
        chain,
        EXAMPLES / "02-nlps1-vector-patients-transaction.json",
        headers={"Idempotency-Key": "fault-400"},
    )
    assert response.status_code == 422
    delivery_id = {p["name"]: p for p in response.json()["parameter"]}["delivery"]["valueString"]
    auth = {"Authorization": f"Bearer {chain.ehr_api_key}"}
    dead = httpx.get(f"{chain.gateway_url}/deliveries?status=dead", headers=auth).json()
    assert delivery_id in [d["id"] for d in dead]
    requeued = httpx.post(f"{chain.gateway_url}/deliveries/{delivery_id}/$requeue", headers=auth)
    assert requeued.status_code == 200
    # a probe: the EHR client's requeue was audited as done by "operator"
    (event,) = [e for e in chain.runtime.store.list_audit(delivery_id=delivery_id) if e.event == "requeued"]
    assert event.actor == chain.runtime.config.clients[0].id
    final = _wait_until(
        lambda: (
            (r := httpx.get(f"{chain.gateway_url}/deliveries/{delivery_id}", headers=auth)).status_code == 200
            and r.json()
        )
    )
    assert final["status"] == "delivered"
    # a probe: nothing tied a delivery to the registry's record of it; its Bundle.identifier does
    assert final["bundleIdentifier"] in httpx.get(f"{chain.receiver_url}/_accepted").json()


def test_authentication_and_registry_authorisation(chain):
    example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
    no_key = httpx.post(
        f"{chain.gateway_url}/registries/{REGISTRY}/Bundle", content=example.read_bytes(), headers=FHIR
    )
    assert no_key.status_code == 401
    assert no_key.json()["resourceType"] == "OperationOutcome"
    assert _post(chain, example, key="wrong-key").status_code == 401
    assert _post(chain, example, registry="no-such-registry").status_code == 404
    assert (
        httpx.get(
            f"{chain.gateway_url}/admin/audit", headers={"Authorization": f"Bearer {chain.ehr_api_key}"}
        ).status_code
        == 403
    )


def test_bad_input_is_an_operation_outcome(chain):
    bad = _post(chain, b'{"resourceType": "Bundle", "type": "transaction", "entry": [')
    assert bad.status_code == 400
    assert bad.json()["resourceType"] == "OperationOutcome"
    wrong_type = httpx.post(
        f"{chain.gateway_url}/registries/{REGISTRY}/Bundle",
        content=b"{}",
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {chain.ehr_api_key}"},
    )
    assert wrong_type.status_code == 415


def test_admin_audit_and_processing_record_hold_counts_only(chain):
    admin = {"Authorization": f"Bearer {chain.admin_api_key}"}
    audit = httpx.get(f"{chain.gateway_url}/admin/audit?registry={REGISTRY}", headers=admin)
    assert audit.status_code == 200 and audit.json()
    record = httpx.get(f"{chain.gateway_url}/admin/processing-record/{REGISTRY}", headers=admin).json()
    times = [e["at"] for e in audit.json()] + [d["createdAt"] for d in httpx.get(
        f"{chain.gateway_url}/admin/deliveries", headers=admin).json()]
    assert times and all(re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in times)
    backwards = {"since": "2026-03-01", "until": "2026"}  # an empty record used to come back
    for path in (f"/admin/processing-record/{REGISTRY}", "/admin/audit"):
        wrong = httpx.get(f"{chain.gateway_url}{path}", params=backwards, headers=admin)
        assert wrong.status_code == 400 and "until must be after since" in wrong.text, wrong.text
    assert record["registry"] == REGISTRY and record["purpose"]
    everything = audit.text + json.dumps(record)
    for example in EXAMPLES.glob("*.json"):
        for _, value in identifying_values(json.loads(example.read_text())):
            assert value not in everything


def test_the_processing_record_counts_posted_deliveries_per_type(chain):
    """A probe: a posted Bundle's delivered event had no per-type counts, so the record's `resources`
    named only what bulk jobs had delivered (and nothing at all for a registry fed by posts)."""
    example = EXAMPLES / "01-nictiz-nl-core-transaction.json"
    response = _post(chain, example, headers={"Idempotency-Key": f"per-type-{uuid.uuid4()}"})
    assert response.status_code == 200, response.text
    assert {p["name"]: p for p in response.json()["parameter"]}["status"]["valueCode"] == "delivered"
    delivered = chain.runtime.store.processing_record(REGISTRY)["delivered"]
    assert delivered["resources"]["Patient"] >= 1 and delivered["resources"]["Provenance"] >= 1
    kept = sum(n for rtype, n in delivered["resources"].items() if rtype != "Provenance")
    assert kept == delivered["resourcesDelivered"] <= delivered["resourcesIn"]


def test_the_privacy_officer_reads_the_record_of_a_year_and_exports_the_audit_trail(chain, tmp_path):
    from typer.testing import CliRunner

    from gateway.cli import app

    _post(
        chain, EXAMPLES / "02-nlps1-vector-patients-transaction.json", headers={"Idempotency-Key": "fg-year"}
    )
    runner = CliRunner()
    auth = ["--url", chain.gateway_url, "--api-key", chain.admin_api_key]
    this_year = time.gmtime().tm_year
    shown = runner.invoke(app, ["audit", "record", REGISTRY, "--year", str(this_year), "--json", *auth])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)
    assert record["reportingPeriod"] == {"since": str(this_year), "until": str(this_year + 1)}
    assert record["bundlesDelivered"] >= 1 and record["delivered"]["patients"] >= 1
    assert record["legalBasis"] and record["recipient"]
    empty = runner.invoke(app, ["audit", "record", REGISTRY, "--year", "2001", "--json", *auth])
    assert json.loads(empty.output)["bundlesDelivered"] == 0 and json.loads(empty.output)["events"] == {}
    table = runner.invoke(app, ["audit", "record", REGISTRY, *auth])
    assert table.exit_code == 0 and "bundles delivered" in table.output
    bad = runner.invoke(app, ["audit", "record", REGISTRY, "--since", "last tuesday", *auth])
    assert bad.exit_code == 1 and "400" in bad.output and "last tuesday" not in bad.output.split("400", 1)[1]

    # a probe: outside a terminal the table cut the ids `deliveries requeue` takes
    listing = ["deliveries", "list", "--admin", "--registry", REGISTRY, *auth]
    listed, deliveries = runner.invoke(app, listing), runner.invoke(app, [*listing, "--json"])
    assert listed.exit_code == deliveries.exit_code == 0, listed.output
    ids = [d["id"] for d in json.loads(deliveries.output)]
    assert ids and all(len(i) == 32 and i in listed.output for i in ids)

    out = tmp_path / "audit.ndjson"
    exported = runner.invoke(app, ["audit", "export", "--out", str(out), "--registry", REGISTRY, *auth])
    assert exported.exit_code == 0, exported.output
    events = [json.loads(line) for line in out.read_text().splitlines()]
    admin = {"Authorization": f"Bearer {chain.admin_api_key}"}
    listed = httpx.get(
        f"{chain.gateway_url}/admin/audit", params={"registry": REGISTRY, "limit": 10000}, headers=admin
    )
    assert [e["id"] for e in events] == [e["id"] for e in listed.json()]  # every page, in order, once
    assert len(events) >= 2 and len({e["id"] for e in events}) == len(events)
    text = out.read_text()
    for example in EXAMPLES.glob("*.json"):
        for _, value in identifying_values(json.loads(example.read_text())):
            assert value not in text


def test_metadata_health_and_metrics(chain):
    assert httpx.get(f"{chain.gateway_url}/metadata").json()["resourceType"] == "CapabilityStatement"
    assert httpx.get(f"{chain.gateway_url}/healthz").status_code == 200
    assert httpx.get(f"{chain.gateway_url}/readyz").status_code == 200
    assert httpx.get(f"{chain.gateway_url}/metrics").status_code == 401
    metrics = httpx.get(
        f"{chain.gateway_url}/metrics", headers={"Authorization": f"Bearer {chain.admin_api_key}"}
    )
    assert metrics.status_code == 200 and "gateway_bundles_total" in metrics.text


def test_two_providers_see_only_their_own_deliveries(tmp_path):
    other = "ura:11111111"
    with embedded_chain(
        tmp_path,
        [REGISTRY, "example-cancer-registry"],
        providers=(PROVIDER, other),
        client_registries={other: [REGISTRY]},
    ) as c:
        example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
        mine = _post(c, example, key=c.ehr_api_keys[PROVIDER])
        theirs = _post(c, example, key=c.ehr_api_keys[other])
        assert mine.status_code == 200 and theirs.status_code == 200
        my_id = {p["name"]: p for p in mine.json()["parameter"]}["delivery"]["valueString"]
        their_id = {p["name"]: p for p in theirs.json()["parameter"]}["delivery"]["valueString"]
        for key, own, foreign in (
            (c.ehr_api_keys[PROVIDER], my_id, their_id),
            (c.ehr_api_keys[other], their_id, my_id),
        ):
            auth = {"Authorization": f"Bearer {key}"}
            listed = [d["id"] for d in httpx.get(f"{c.gateway_url}/deliveries", headers=auth).json()]
            assert own in listed and foreign not in listed
            assert httpx.get(f"{c.gateway_url}/deliveries/{foreign}", headers=auth).status_code == 404
        # registry not configured for that client
        assert (
            _post(c, example, key=c.ehr_api_keys[other], registry="example-cancer-registry").status_code
            == 403
        )
        # the same person delivered by two providers gets the same pseudonyms in one registry
        bundles = [orjson.loads(c.runtime.store.get(i, with_payload=True).payload) for i in (my_id, their_id)]
        nggv = [
            sorted(
                i["value"]
                for e in b["entry"]
                if e["resource"]["resourceType"] == "Patient"
                for i in e["resource"]["identifier"]
                if "NGGV" in i["system"]
            )
            for b in bundles
        ]
        assert nggv[0] and nggv[0] == nggv[1]


def test_key_rotation_and_registry_side_rekeying(tmp_path):
    """The registry holder re-keys its stored pseudonyms after a rotation; new deliveries then match them.
    Two hospitals deliver: an MRN pseudonym's TTP layer binds its hospital, which the registry could not
    know, so every MRN failed to translate where the receiver was not told one provider (a probe); the
    gateway now names it in the identifier's assigner."""
    other = "ura:11111111"
    with embedded_chain(tmp_path, [REGISTRY], providers=(PROVIDER, other)) as c:
        example = EXAMPLES / "02-nlps1-vector-patients-transaction.json"

        def post_from_both(key: str) -> None:
            for provider in (PROVIDER, other):
                headers = {"Idempotency-Key": key}
                assert _post(c, example, key=c.ehr_api_keys[provider], headers=headers).status_code == 200

        post_from_both("before-rotation")
        old = _patient_pseudonyms(c)
        assert old and all(v.startswith("v1.") for v in old)
        assert len(_mrn_assigners(c)) == 8 and set(_mrn_assigners(c).values()) == {PROVIDER, other}

        from gateway.ttp.keystore import KeyStore

        # what `fhir-gateway ttp keys rotate` does; the running TTP picks the new version up
        assert KeyStore.load(tmp_path / "ttp-keys").rotate(REGISTRY) == 2
        rekeyed = httpx.post(f"{c.receiver_url}/_rekey", timeout=60).json()
        assert rekeyed["translated"] > 0 and rekeyed["failed"] == 0, rekeyed
        translated = _patient_pseudonyms(c)
        assert translated and all(v.startswith("v2.") for v in translated)

        # a gateway picks a new key version up when its pseudonym cache expires (runtime: 10 min) or restarts
        for provider in (PROVIDER, other):
            c.runtime.providers[provider].ttp.clear()
        post_from_both("after-rotation")
        fresh = _patient_pseudonyms(c)
        assert fresh == translated  # the same people, the same v2 pseudonyms: linkage survives the rotation


def _mrn_assigners(chain) -> dict[str, str]:
    """Each stored MRN pseudonym and the provider its assigner names."""
    found = {}
    for bundle in _received(chain):
        for entry in bundle["entry"]:
            for ident in entry["resource"].get("identifier") or []:
                if ident.get("type", {}).get("text") == "NLPS1 MRN":
                    found[ident["value"]] = ident["assigner"]["identifier"]["value"]
    return found


def _patient_pseudonyms(chain) -> list[str]:
    values = set()
    for bundle in _received(chain):
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                patient = httpx.get(f"{chain.receiver_url}/Patient/{resource['id']}").json()
                values.update(i["value"] for i in patient["identifier"])
    return sorted(values)


def test_mrn_pseudonym_reverses_for_the_delivering_hospital_only(tmp_path):
    """A registry feeds results back under the MRN pseudonym; only the delivering hospital gets its number."""
    import asyncio

    from gateway.mrn import reveal_mrns

    other = "ura:11111111"
    with embedded_chain(tmp_path, [REGISTRY], providers=(PROVIDER, other)) as c:
        response = _post(c, EXAMPLES / "02-nlps1-vector-patients-transaction.json")
        assert response.status_code == 200
        delivery = {p["name"]: p for p in response.json()["parameter"]}["delivery"]["valueString"]
        delivered = orjson.loads(c.runtime.store.get(delivery, with_payload=True).payload)
        mrn_values = [
            i["value"]
            for e in delivered["entry"]
            if e["resource"]["resourceType"] == "Patient"
            for i in e["resource"]["identifier"]
            if i["system"].endswith(":MRN")
        ]
        assert len(mrn_values) == 4

        async def reveal(provider: str):
            from gateway.ttp.client import HttpTTPClient

            async with HttpTTPClient(c.ttp_url, c.ttp_api_keys[provider]) as ttp:
                source = c.runtime.providers[provider].source
                return await reveal_mrns(mrn_values, registry=REGISTRY, source=source, ttp=ttp)

        mine = asyncio.run(reveal(PROVIDER))
        assert sorted(r.mrn for r in mine) == ["H-778899", "P0001234", "X42", "Z1"]
        theirs = asyncio.run(reveal(other))
        assert all(r.mrn is None and r.error for r in theirs)


def test_what_a_privacy_probe_got_past_the_leak_gate_is_refused(chain):
    """Found by a probe on 2026-11-24: a BSN sent as a decimal or written with dots, the patient's birth
    date as an Observation value. Each is now a 422 that names the path, and nothing reaches the registry."""
    source = json.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_text())
    patient_entry = source["entry"][0]
    patient = patient_entry["resource"]
    subject = {"reference": f"Patient/{patient['id']}"}
    home = {k: patient["address"][0][k] for k in ("line", "city", "postalCode")}
    observation = {"resourceType": "Observation", "status": "final", "subject": subject}
    cases = {
        "bsn-decimal": [
            {
                **observation,
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "valueQuantity": {"value": 999911120.0},
            }
        ],
        "bsn-dotted": [
            {
                **observation,
                "code": {
                    "coding": [{"system": "http://example.org/x", "code": "a", "display": "BSN 9999.11.120"}]
                },
            }
        ],
        "birth-date": [
            {
                **observation,
                "code": {"coding": [{"system": "http://loinc.org", "code": "21112-8"}]},
                "valueDateTime": patient["birthDate"],
            }
        ],
    }
    before = len(_received(chain))
    for name, resources in cases.items():
        body = _transaction(patient_entry, *resources)
        response = _post(chain, body, headers={"Idempotency-Key": f"probe-{name}"})
        assert response.status_code == 422, (name, response.text)
        issues = response.json()["issue"]
        assert any(
            i["code"] == "security" and i["expression"][0].startswith("Bundle.entry[") for i in issues
        ), name
        for value in ("999911120", "9999.11.120", patient["birthDate"], home["line"][0], home["postalCode"]):
            assert value not in response.text, name
    assert len(_received(chain)) == before


def test_a_home_visit_is_delivered_with_the_home_address_generalised(chain):
    """Probes delivered a home visit's Location (the patient's own address, also with the street abbreviated
    or left out) in full; an Organization at the home too. Each now gets what Patient.address gets (PC4, no
    street), and the delivery goes through."""
    source = json.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_text())
    patient_entry = source["entry"][0]
    patient = patient_entry["resource"]
    home = {k: patient["address"][0][k] for k in ("line", "city", "postalCode")}
    street, number = home["line"][0].rsplit(" ", 1)
    places = [
        {"resourceType": "Location", "id": "home-1", "name": "thuis", "address": home},
        {
            "resourceType": "Location",
            "id": "home-2",
            "address": {**home, "line": [f"{street[:4]}str. {number}"]},
        },
        {"resourceType": "Location", "id": "home-3", "address": {"postalCode": home["postalCode"]}},
        {"resourceType": "Organization", "id": "org-1", "name": "praktijk aan huis", "address": [home]},
    ]
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HH"},
        "subject": {"reference": f"Patient/{patient['id']}"},
        "location": [{"location": {"reference": f"Location/home-{n}"}} for n in (1, 2, 3)],
        "serviceProvider": {"reference": "Organization/org-1"},
    }
    response = _post(
        chain, _transaction(patient_entry, *places, encounter), headers={"Idempotency-Key": "home-visit"}
    )
    assert response.status_code == 200, response.text
    delivery = {p["name"]: p for p in response.json()["parameter"]}["delivery"]["valueString"]
    out = orjson.loads(chain.runtime.store.get(delivery, with_payload=True).payload)
    delivered = [
        e["resource"] for e in out["entry"] if e["resource"]["resourceType"] in ("Location", "Organization")
    ]
    assert len(delivered) == 4
    for place in delivered:
        address = place["address"][0] if isinstance(place["address"], list) else place["address"]
        assert address["postalCode"] == home["postalCode"][:4] and "line" not in address
    text = orjson.dumps(out).decode()
    assert street not in text and home["postalCode"] not in text


def test_an_audit_event_names_the_request_it_came_from(chain):
    """A probe: a refused post in the audit trail could not be matched to the EHR's request or the logs."""
    fresh = orjson.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes())
    fresh["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:4d0f5c1e-6a8e-4b57-9d3e"}
    good = _post(chain, orjson.dumps(fresh))
    bad = _post(chain, b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": 1}]}')
    assert good.status_code == 200 and bad.status_code == 400
    events = chain.runtime.store.list_audit(registry=REGISTRY, limit=10000)
    by_request = {e.request_id: e for e in events if e.request_id}
    assert by_request[bad.headers["X-Request-ID"]].event == "refused"
    assert by_request[good.headers["X-Request-ID"]].event in ("accepted", "received")


def test_a_bundle_of_only_objectors_posted_again_is_counted_once_in_the_processing_record(chain):
    """A re-posted Bundle that was delivered is one delivery; one with nothing to deliver (every patient
    objected) wrote a `nothing-to-deliver` event per post, and the record counted its objector once per
    retry of the EHR (a session's known limit)."""
    bundle = json.loads((EXAMPLES / "03-opt-out-transaction.json").read_text())
    bundle["entry"] = [e for e in bundle["entry"] if "objector-1" in orjson.dumps(e["resource"]).decode()]
    bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
    body = orjson.dumps(bundle)

    def withheld() -> int:
        return chain.runtime.store.processing_record(REGISTRY)["patientsWithheld"]

    before = withheld()
    for _ in range(3):
        response = _post(chain, body)
        params = {p["name"]: p for p in response.json()["parameter"]}
        assert response.status_code == 200 and params["patientsDroppedOptOut"]["valueInteger"] == 1
    assert withheld() == before + 1
    # the same objector in another Bundle is another post, counted (as a patient in two deliveries is)
    bundle["identifier"]["value"] = f"urn:uuid:{uuid.uuid4()}"
    assert _post(chain, orjson.dumps(bundle)).status_code == 200
    assert withheld() == before + 2


def test_readiness_asks_the_ttp_at_most_once_a_second_whoever_asks(chain):
    """A probe: /readyz needs no login and asked every provider's TTP at each call (50 calls, 100 TTP
    requests): anyone could make the gateway flood its TTP. "Ready" is kept for a second."""
    before = chain.ttp_recorder.paths.count("/metadata")
    started = time.monotonic()
    answers = [httpx.get(f"{chain.gateway_url}/readyz").status_code for _ in range(30)]
    elapsed = time.monotonic() - started
    assert answers == [200] * 30
    asked = chain.ttp_recorder.paths.count("/metadata") - before
    assert 1 <= asked <= int(elapsed) + 2, (asked, elapsed)
    # ... and at once: a re-probe's 200 concurrent calls made 400 TTP requests
    time.sleep(1.1)  # past the second a "ready" is kept
    before = chain.ttp_recorder.paths.count("/metadata")

    async def together() -> list[int]:
        async with httpx.AsyncClient(base_url=chain.gateway_url, timeout=30) as client:
            return [r.status_code for r in await asyncio.gather(*(client.get("/readyz") for _ in range(50)))]

    started = time.monotonic()
    assert asyncio.run(together()) == [200] * 50
    elapsed = time.monotonic() - started
    # once per second at most (a loaded machine may take more than one to answer the 50)
    assert 1 <= chain.ttp_recorder.paths.count("/metadata") - before <= int(elapsed) + 1, elapsed


def test_a_path_with_a_trailing_slash_is_not_redirected(chain):
    """A probe: `POST /registries/x/Bundle/` was a 307 to a Location built from the Host header, always
    http://: an EHR that follows it behind a TLS proxy re-posts the Bundle in clear text, to any host."""
    response = httpx.post(
        f"{chain.gateway_url}/registries/{REGISTRY}/Bundle/",
        content=b"{}",
        headers={**FHIR, "Authorization": f"Bearer {chain.ehr_api_key}", "Host": "evil.example"},
    )
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["resourceType"] == "OperationOutcome"


def test_a_credential_sent_twice_is_refused(chain):
    """A probe: of two Authorization (or X-API-Key) headers the last one counted, silently: a proxy that adds
    its own instead of replacing the client's would let the client choose who it is."""
    key = chain.ehr_api_key
    for headers in (
        [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")],
        [("X-API-Key", key), ("X-API-Key", "another")],
        [("Authorization", f"Bearer {key}"), ("X-API-Key", key)],
    ):
        response = httpx.get(f"{chain.gateway_url}/deliveries", headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert key not in response.text


def test_a_version_posted_again_after_a_newer_one_is_delivered_again(chain):
    """A registry holder's probe: A, B, A of one patient without an Idempotency-Key or Bundle.identifier
    (a correction taken back) answered the third post "delivered" with A's first delivery, and the registry
    kept B. A named key keeps meaning "the same request" (a late retry must not undo B)."""
    bundle = orjson.loads((EXAMPLES / "01-nictiz-nl-core-transaction.json").read_bytes())
    bundle.pop("identifier", None)
    patient = bundle["entry"][0]
    patient["resource"]["id"] = f"reverted-{uuid.uuid4().hex[:8]}"  # a patient no other test posts

    def version(value: float) -> bytes:
        pulse = {
            "resourceType": "Observation", "id": "pulse", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": patient["fullUrl"]},
            "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": "/min"},
        }  # fmt: skip
        entry = {"fullUrl": f"urn:uuid:{uuid.UUID(int=7)}", "resource": pulse,
                 "request": {"method": "PUT", "url": "Observation/pulse"}}
        return orjson.dumps({**bundle, "entry": [patient, entry]})

    def posted(body: bytes) -> str:
        return posted_with(body, {})

    def posted_with(body: bytes, headers: dict) -> str:
        response = _post(chain, body, headers=headers)
        assert response.status_code == 200, response.text
        return {p["name"]: p for p in response.json()["parameter"]}["delivery"]["valueString"]

    def at_the_registry() -> float:
        (last,) = _received(chain)[-1:]
        (pulse,) = [e["resource"] for e in last["entry"] if e["resource"]["resourceType"] == "Observation"]
        return httpx.get(f"{chain.receiver_url}/Observation/{pulse['id']}").json()["valueQuantity"]["value"]

    first, corrected = posted(version(80)), posted(version(81))
    assert at_the_registry() == 81
    taken_back = posted(version(80))
    assert taken_back not in (first, corrected) and at_the_registry() == 80
    assert posted(version(80)) == taken_back  # once more: that delivery
    again = posted(version(81))
    assert again not in (first, corrected, taken_back) and at_the_registry() == 81
    # under a named key a re-post is the same request, answered with its delivery
    keyed = {"Idempotency-Key": f"pulse-{uuid.uuid4().hex}"}
    named = posted_with(version(79), keyed)
    posted(version(78))
    assert posted_with(version(79), keyed) == named and at_the_registry() == 78
