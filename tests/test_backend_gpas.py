"""GpasTTP against the gPAS stub (tests/stubs/gpas_stub.py, from the published TTP-FHIR gateway examples)
under uvicorn: batching counted at the stub, per-value errors, matching by part name, Basic and OAuth2 auth,
retries (503 → 200, 429 Retry-After), fail closed, reversal of MRN values, the pseudonymise stage."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

import pytest

from gateway.forward import OAuth2ClientCredentials
from gateway.pseudonym import nlps1
from gateway.pseudonym.mapping import load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonym.types import PrePseudonym
from gateway.pseudonymise import pseudonymise_patients
from gateway.ttp.backend import TTPBackend, TTPRejected, TTPUnavailable
from gateway.ttp.gpas import BasicAuth, GpasTTP, auth_from_options, looks_like_original, original_string
from tests.servers import free_port, serve
from tests.stubs.common import StubAuth
from tests.stubs.gpas_stub import GpasState, create_gpas_stub

REGISTRY = "registry-example"
DOMAIN = {REGISTRY: "registry-example"}
PSA = "pseudonymizeAllowCreate"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())


def _items(n: int, ptype: str = "B") -> list[PrePseudonym]:
    return [PrePseudonym(ptype, 1, secrets.token_bytes(32)) for _ in range(n)]


def _run(base: str, coro_fn, **kw):
    async def go():
        async with GpasTTP(base, domain_map=kw.pop("domain_map", DOMAIN), backoff=0.01, **kw) as ttp:
            return await coro_fn(ttp)
    return asyncio.run(go())


def _all_sent(state: GpasState) -> list[str]:
    return [v for values in state.received(PSA) for v in values]


def test_is_a_ttp_backend():
    assert isinstance(GpasTTP("http://127.0.0.1:1", domain_map=DOMAIN), TTPBackend)


def test_round_trip_one_request_stable_and_only_pre_pseudonyms_sent():
    state = GpasState()
    items = _items(5) + _items(3, "SNGGV")
    with serve(create_gpas_stub(state)) as base:
        first = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
        again = _run(base, lambda t: t.pseudonymise(REGISTRY, list(reversed(items))))
    assert [r.index for r in first] == list(range(8))
    assert [r.type for r in first] == [i.type for i in items]
    assert all(r.identifier_value and r.identifier_value.startswith("reg_") and r.error_code is None
               for r in first)
    assert len({r.identifier_value for r in first}) == 8
    assert [r.identifier_value for r in again] == [r.identifier_value for r in reversed(first)]
    assert len(state.received(PSA)) == 2  # one request per call
    sent = _all_sent(state)
    assert all(looks_like_original(v) for v in sent)  # the stub never saw anything but pre-pseudonyms
    assert sent[:8] == [original_string(i) for i in items]
    assert all(r["targets"] == ["registry-example"] for r in state.requests)


def test_vector_patient_through_the_pseudonymise_stage():
    """The gateway's stage with GpasTTP: the stub sees only `<TYPE>.v1.<pre>` of the vector's pre-values."""
    keys, case = VECTORS["keys"], VECTORS["cases"][0]
    source = SourceStage({1: bytes.fromhex(keys["source_key_v1_hex"])}, 1,
                         bytes.fromhex(keys["provider_mrn_master_hex"]), keys["provider"])
    types = [p["type"] for p in case["pseudonyms"]]
    state = GpasState()
    with serve(create_gpas_stub(state)) as base:
        outcome = _run(base, lambda t: pseudonymise_patients(
            {"urn:uuid:p1": case["patient"]}, registry=REGISTRY, types=types, mapping=load_input_mapping(),
            source=source, mrn_system=keys["mrn_system"], ttp=t,
            system_template="urn:gpas:{registry}:{type}"))
    idents = outcome.identifiers["urn:uuid:p1"]
    assert [i["type"]["text"] for i in idents] == [f"NLPS1 {t}" for t in types]
    assert all(i["value"].startswith("reg_") for i in idents)
    [sent] = state.received(PSA)
    expected = {f"{p['type']}.v1.{p['pre_b64u']}" for p in case["pseudonyms"] if p["type"] != "MRN"}
    assert expected <= set(sent) and len(sent) == len(types)
    plain = {str(v) for v in case["input"].values() if v} | {"111222333", "P0001234", "Putten", "Johanna"}
    assert not any(p in v for v in sent for p in plain)


def test_batches_split_by_batch_size_counted_at_the_stub():
    state = GpasState(max_originals=1000)  # an installation that caps the originals per request
    items = _items(2500)
    with serve(create_gpas_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, items), batch_size=1000)
    assert sorted(len(v) for v in state.received(PSA)) == [500, 1000, 1000]  # chunks go concurrently
    assert all(r.identifier_value for r in results)
    assert [r.index for r in results] == list(range(2500))


def test_a_batch_above_the_installation_cap_fails_closed():
    state = GpasState(max_originals=10)
    with serve(create_gpas_stub(state)) as base, pytest.raises(TTPRejected) as info:
        _run(base, lambda t: t.pseudonymise(REGISTRY, _items(11)), batch_size=100)
    assert info.value.status == 400


def test_duplicates_go_once_and_get_the_same_pseudonym():
    state = GpasState()
    item = _items(1)[0]
    with serve(create_gpas_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, [item, item, item]))
    assert len(_all_sent(state)) == 1
    assert len({r.identifier_value for r in results}) == 1 and [r.index for r in results] == [0, 1, 2]


def test_per_value_errors_keep_the_other_values():
    state = GpasState()
    items = _items(4)
    state.refuse.add(original_string(items[2]))
    with serve(create_gpas_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
    assert results[2].identifier_value is None and results[2].error_code == "gpas-not-found"
    assert all(r.identifier_value and r.error_code is None for i, r in enumerate(results) if i != 2)


def test_answers_matched_by_part_name_not_position():
    state = GpasState(reverse=True)  # parameters and their parts in reverse order
    items = _items(6)
    with serve(create_gpas_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
    table = {o: p for (_, o), p in state.table.items()}
    assert [r.identifier_value for r in results] == [table[original_string(i)] for i in items]


def test_basic_auth():
    state = GpasState(auth=StubAuth(mode="basic"))
    with serve(create_gpas_stub(state)) as base:
        ok = _run(base, lambda t: t.pseudonymise(REGISTRY, _items(2)),
                  auth=BasicAuth("gateway", "test-password"))
        with pytest.raises(TTPRejected) as info:
            _run(base, lambda t: t.pseudonymise(REGISTRY, _items(2)), auth=BasicAuth("gateway", "wrong"))
    assert all(r.identifier_value for r in ok)
    assert info.value.status == 401
    assert "wrong" not in str(info.value)


def test_oauth2_client_credentials_token_from_the_stub_and_refresh_after_401():
    state = GpasState(auth=StubAuth(mode="oauth2"))
    with serve(create_gpas_stub(state)) as base:
        auth = OAuth2ClientCredentials(f"{base}/token", "gateway", "test-client-secret")

        async def go():
            async with GpasTTP(base, domain_map=DOMAIN, auth=auth, backoff=0.01) as ttp:
                a = await ttp.pseudonymise(REGISTRY, _items(2))
                b = await ttp.pseudonymise(REGISTRY, _items(2))
                state.auth.revoked.update(state.auth.issued)  # revoked before it expired
                c = await ttp.pseudonymise(REGISTRY, _items(2))
                return a + b + c
        results = asyncio.run(go())
    assert all(r.identifier_value for r in results)
    assert state.auth.token_requests == 2  # cached once, fetched again only after the 401


def test_oauth2_wrong_client_secret_fails_closed():
    state = GpasState(auth=StubAuth(mode="oauth2"))
    with serve(create_gpas_stub(state)) as base, pytest.raises(TTPUnavailable) as info:
        auth = OAuth2ClientCredentials(f"{base}/token", "gateway", "wrong-secret")
        _run(base, lambda t: t.pseudonymise(REGISTRY, _items(1)), auth=auth)
    assert "wrong-secret" not in str(info.value)
    assert not state.requests  # nothing was sent without a token


def test_retries_503_then_succeeds():
    state = GpasState()
    state.script.failures = [(503, {}), (502, {})]
    with serve(create_gpas_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, _items(3)), retries=3)
    assert all(r.identifier_value for r in results)
    assert len(state.received(PSA)) == 1  # the failures were answered before the stub read the body


def test_429_honours_retry_after():
    state = GpasState()
    state.script.failures = [(429, {"Retry-After": "1"})]
    with serve(create_gpas_stub(state)) as base:
        started = time.monotonic()
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, _items(2)), retries=2)
        elapsed = time.monotonic() - started
    assert all(r.identifier_value for r in results)
    assert 0.95 <= elapsed < 5


def test_gives_up_fail_closed():
    state = GpasState()
    state.script.failures = [(503, {})] * 3
    with serve(create_gpas_stub(state)) as base, pytest.raises(TTPUnavailable) as info:
        _run(base, lambda t: t.pseudonymise(REGISTRY, _items(2)), retries=2)
    assert "3 attempts" in str(info.value)


def test_unreachable_fails_closed():
    base = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TTPUnavailable):
        _run(base, lambda t: t.pseudonymise(REGISTRY, _items(1)), retries=1)
    with pytest.raises(TTPUnavailable):
        _run(base, lambda t: t.probe())


def test_unknown_domain_and_unmapped_registry_are_refused():
    state = GpasState()
    with serve(create_gpas_stub(state)) as base:
        with pytest.raises(TTPRejected) as unknown:
            _run(base, lambda t: t.pseudonymise(REGISTRY, _items(1)), domain_map={REGISTRY: "nope"})
        with pytest.raises(TTPRejected) as unmapped:
            _run(base, lambda t: t.pseudonymise("registry-other", _items(1)))
    assert unknown.value.status == 404 and unmapped.value.status == 404


def test_incomplete_or_foreign_answers_fail_closed():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    mode = {"kind": "missing"}

    @app.post("/$pseudonymizeAllowCreate")
    async def answer(body: dict) -> JSONResponse:
        originals = [p["valueString"] for p in body["parameter"] if p["name"] == "original"]
        if mode["kind"] == "missing":
            originals = originals[:-1]
        params = [{"name": "pseudonym", "part": [
            {"name": "original", "valueIdentifier": {"value": o if mode["kind"] != "foreign" else "X"}},
            {"name": "pseudonym", "valueIdentifier": {"value": "psn"}},
            {"name": "target", "valueIdentifier": {"value": "registry-example"}}]} for o in originals]
        return JSONResponse({"resourceType": "Parameters", "parameter": params})

    with serve(app) as base:
        for kind in ("missing", "foreign"):
            mode["kind"] = kind
            with pytest.raises(TTPUnavailable):
                _run(base, lambda t: t.pseudonymise(REGISTRY, _items(3)))


def test_depseudonymise_mrn_returns_the_inner_layer_only():
    state = GpasState()
    mrn = PrePseudonym("MRN", 1, secrets.token_bytes(40))
    other = PrePseudonym("B", 1, secrets.token_bytes(32))

    async def go(ttp: GpasTTP):
        made = await ttp.pseudonymise(REGISTRY, [mrn, other])
        values = [made[0].identifier_value, made[1].identifier_value, "reg_UNKNOWN1"]
        return await ttp.depseudonymise(REGISTRY, values)

    with serve(create_gpas_stub(state)) as base:
        back = _run(base, go)
    assert back[0].identifier_value == nlps1.b64u(mrn.value) and back[0].error_code is None
    assert back[1].identifier_value is None and back[1].error_code == "not-reversible"
    assert back[2].identifier_value is None and back[2].error_code == "gpas-not-found"
    assert len(state.received("dePseudonymize")) == 1


def test_probe():
    with serve(create_gpas_stub(GpasState())) as base:
        _run(base, lambda t: t.probe())


def test_auth_from_options_reads_secrets_by_name_only():
    env = {"GPAS_PW": "pw", "GPAS_SECRET": "s3"}
    basic = auth_from_options({"type": "basic", "username": "u", "password_env": "GPAS_PW"}, env.get)
    assert isinstance(basic, BasicAuth) and basic.password == "pw" and "pw" not in repr(basic)
    oauth = auth_from_options({"type": "oauth2", "token_url": "https://as/token", "client_id": "c",
                               "client_secret_env": "GPAS_SECRET"}, env.get)
    assert isinstance(oauth, OAuth2ClientCredentials)
    with pytest.raises(ValueError):
        auth_from_options({"type": "basic", "username": "u", "password_env": "UNSET"}, env.get)
    with pytest.raises(ValueError):
        auth_from_options({"type": "kerberos"}, env.get)


def test_refusal_texts_carry_no_server_diagnostics():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/$pseudonymizeAllowCreate")
    async def refuse() -> JSONResponse:
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "value B.v1.SECRETISH refused"}]},
            status_code=422)

    with serve(app) as base, pytest.raises(TTPRejected) as info:
        _run(base, lambda t: t.pseudonymise(REGISTRY, _items(1)))
    assert info.value.status == 422 and "issue-processing" in str(info.value)
    assert "SECRETISH" not in str(info.value)


def test_empty_batch_sends_nothing():
    state = GpasState()
    with serve(create_gpas_stub(state)) as base:
        assert _run(base, lambda t: t.pseudonymise(REGISTRY, [])) == []
    assert state.requests == []
