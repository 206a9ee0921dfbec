"""TresTTP against the TRES stub (tests/stubs/tres_stub.py, from ZorgTTP/rtres) under uvicorn: form fields,
the 1,000-value cap, per-value and abort codes, whitespace refused before sending, retries, reversal, and
RoutingTTP (MRN → TRES, the rest → gPAS) with one call per backend."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend, TTPUnavailable
from gateway.ttp.gpas import GpasTTP, looks_like_original, original_string
from gateway.ttp.tres import RoutingTTP, TresTTP, read_tres_answer
from tests.servers import serve
from tests.stubs.gpas_stub import GpasState, create_gpas_stub
from tests.stubs.tres_stub import TresState, create_tres_stub, encrypt

REGISTRY = "registry-example"
PASSWORD = "test-password"
ENC, DEC = "encryptpost", "decryptpost"


def _mrn(n: int) -> list[PrePseudonym]:
    return [PrePseudonym("MRN", 1, secrets.token_bytes(40)) for _ in range(n)]


def _tres(base: str, **kw) -> TresTTP:
    options = {"domain": "zorgttp.nl", "project": "registry-mrn", "username": "gateway",
               "password_env": "TRES_PW", "secret": {"TRES_PW": PASSWORD}.get, "backoff": 0.01, **kw}
    return TresTTP(base, **options)


def _run(base: str, fn, **kw):
    async def go():
        async with _tres(base, **kw) as ttp:
            return await fn(ttp)
    return asyncio.run(go())


def test_is_a_ttp_backend():
    assert isinstance(_tres("http://127.0.0.1:1"), TTPBackend)
    assert "test-password" not in repr(_tres("http://127.0.0.1:1"))


def test_encrypts_mrn_pre_pseudonyms_deterministically_with_the_rtres_form_fields():
    state = TresState()
    items = _mrn(4)
    with serve(create_tres_stub(state)) as base:
        first = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
        again = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
    assert [r.index for r in first] == [0, 1, 2, 3] and {r.type for r in first} == {"MRN"}
    assert all(r.identifier_value and r.identifier_value.startswith("3::") for r in first)
    assert [r.identifier_value for r in first] == [r.identifier_value for r in again]
    assert len(state.received(ENC)) == 2
    sent = [v for values in state.received(ENC) for v in values]
    assert all(looks_like_original(v) for v in sent)  # never a plain patient number
    assert sent[:4] == [original_string(i) for i in items]
    fields = state.requests[0]["fields"]
    assert fields == {"dn": "zorgttp.nl", "pn": "registry-mrn", "un": "gateway", "si": "FALSE", "se": "FALSE",
                      "separator": "#"}


def test_search_image_flag():
    state = TresState()
    with serve(create_tres_stub(state)) as base:
        [result] = _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(1)), search_image=True)
    assert state.requests[0]["fields"]["si"] == "TRUE"
    assert result.identifier_value.split("::")[3].startswith("1:")


def test_at_most_1000_values_per_request():
    state = TresState(max_values=1000)
    with serve(create_tres_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(2500)))
    assert sorted(len(v) for v in state.received(ENC)) == [500, 1000, 1000]  # chunks go concurrently
    assert all(r.identifier_value for r in results) and [r.index for r in results] == list(range(2500))
    with pytest.raises(ValueError):
        _tres("http://127.0.0.1:1", chunk_size=1001)


def test_whitespace_and_separator_values_are_refused_before_sending():
    state = TresState()
    good = encrypt(original_string(_mrn(1)[0]), False)
    with serve(create_tres_stub(state)) as base:
        results = _run(base, lambda t: t.depseudonymise(REGISTRY, [" ", good, "a#b", "\t", " x"]))
        nothing = _run(base, lambda t: t.depseudonymise(REGISTRY, ["  "]))
    assert [r.error_code for r in results] == ["blank-value", None, "invalid-format", "blank-value",
                                               "invalid-format"]
    assert state.received(DEC) == [[good]]  # only the valid value left the gateway, and only once
    assert nothing[0].error_code == "blank-value"


def test_other_types_are_not_sent():
    state = TresState()
    items = [PrePseudonym("B", 1, secrets.token_bytes(32)), *_mrn(1)]
    with serve(create_tres_stub(state)) as base:
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
    assert results[0].error_code == "unsupported-type" and results[0].identifier_value is None
    assert results[1].identifier_value and state.received(ENC) == [[original_string(items[1])]]


def test_per_value_code_316_on_decrypt_keeps_the_others():
    state = TresState()
    items = _mrn(2)
    with serve(create_tres_stub(state)) as base:
        made = _run(base, lambda t: t.pseudonymise(REGISTRY, items))
        tampered = made[1].identifier_value[:-6] + "AAAAA="
        back = _run(base, lambda t: t.depseudonymise(REGISTRY, [made[0].identifier_value, tampered]))
    assert back[0].identifier_value == nlps1.b64u(items[0].value) and back[0].error_code is None
    assert back[1].identifier_value is None and back[1].error_code == "tres-316"


def test_per_value_codes_and_abort_codes_from_the_answer():
    rows = read_tres_answer({"ResponseCode": "0#310#316", "ResponseMessage": "c1#plain text not given#bad"},
                            3, ENC)
    assert rows == [("c1", None), (None, "tres-310"), (None, "tres-316")]
    for code in (100, 200, 313, 314, 999):
        with pytest.raises(TTPUnavailable) as info:
            read_tres_answer({"ResponseCode": f"0#{code}", "ResponseMessage": "c1#secret-ish text"}, 2, ENC)
        assert str(code) in str(info.value) and "secret-ish" not in str(info.value)
    # TRES' reply to an empty text is mapped per value, as rtres does
    empty = {"ResponseCode": "999", "ResponseMessage": "Value cannot be null.\r\nParameter name: text"}
    assert read_tres_answer(empty, 1, DEC) == [(None, "tres-316")]
    with pytest.raises(TTPUnavailable):
        read_tres_answer({"ResponseCode": "0#0", "ResponseMessage": "a"}, 2, ENC)


def test_wrong_credentials_or_project_abort_the_call():
    state = TresState()
    with serve(create_tres_stub(state)) as base:
        with pytest.raises(TTPUnavailable) as creds:
            _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(2)), secret={"TRES_PW": "wrong-pw"}.get)
        with pytest.raises(TTPUnavailable) as project:
            _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(2)), project="other")
    assert "code 100" in str(creds.value) and "wrong-pw" not in str(creds.value)
    assert "code 200" in str(project.value)


def test_missing_password_is_a_configuration_error():
    with pytest.raises(ValueError) as info:
        TresTTP("http://127.0.0.1:1", domain="d", project="p", username="u", password_env="UNSET_TRES_PW",
                secret=lambda name: None)
    assert "password_env" in str(info.value)


def test_retries_503_then_200_and_429_retry_after():
    state = TresState()
    state.script.failures = [(503, {}), (429, {"Retry-After": "1"})]
    with serve(create_tres_stub(state)) as base:
        started = time.monotonic()
        results = _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(2)), retries=3)
        elapsed = time.monotonic() - started
    assert all(r.identifier_value for r in results)
    assert len(state.received(ENC)) == 1 and 0.95 <= elapsed < 5


def test_gives_up_fail_closed():
    state = TresState()
    state.script.failures = [(503, {})] * 5
    with serve(create_tres_stub(state)) as base, pytest.raises(TTPUnavailable):
        _run(base, lambda t: t.pseudonymise(REGISTRY, _mrn(1)), retries=1)


def test_probe():
    with serve(create_tres_stub(TresState())) as base:
        _run(base, lambda t: t.probe())
        with pytest.raises(TTPUnavailable):
            _run(base, lambda t: t.probe(), username="nobody")


def test_routing_one_call_per_backend_merged_by_index():
    tres_state, gpas_state = TresState(), GpasState()
    items = [PrePseudonym("B", 1, secrets.token_bytes(32)), *_mrn(1), PrePseudonym("GG", 1, b"\1" * 32),
             *_mrn(1)]
    with serve(create_tres_stub(tres_state)) as tres_base, serve(create_gpas_stub(gpas_state)) as gpas_base:
        async def go():
            router = RoutingTTP({"MRN": _tres(tres_base)},
                                GpasTTP(gpas_base, domain_map={REGISTRY: "registry-example"}))
            try:
                await router.probe()
                return await router.pseudonymise(REGISTRY, items)
            finally:
                await router.aclose()
        results = asyncio.run(go())
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.type for r in results] == ["B", "MRN", "GG", "MRN"]
    assert results[0].identifier_value.startswith("reg_") and results[2].identifier_value.startswith("reg_")
    assert results[1].identifier_value.startswith("3::") and results[3].identifier_value.startswith("3::")
    assert tres_state.received(ENC)[-1] == [original_string(items[1]), original_string(items[3])]
    assert gpas_state.received("pseudonymizeAllowCreate") == [[original_string(items[0]),
                                                               original_string(items[2])]]


def test_routing_fails_closed_when_one_backend_fails():
    gpas_state = GpasState()
    with serve(create_gpas_stub(gpas_state)) as gpas_base:
        async def go():
            router = RoutingTTP({"MRN": _tres("http://127.0.0.1:9", retries=0)},
                                GpasTTP(gpas_base, domain_map={REGISTRY: "registry-example"}))
            try:
                return await router.pseudonymise(REGISTRY, [*_mrn(1), PrePseudonym("B", 1, b"\2" * 32)])
            finally:
                await router.aclose()
        with pytest.raises(TTPUnavailable):
            asyncio.run(go())


def test_empty_batch_sends_nothing():
    state = TresState()
    with serve(create_tres_stub(state)) as base:
        assert _run(base, lambda t: t.pseudonymise(REGISTRY, [])) == []
    assert state.requests == []


def test_vector_patient_routed_mrn_reverses_to_the_hospital_layer():
    """Pseudonymise stage with RoutingTTP (MRN → TRES, rest → gPAS); the MRN value comes back through TRES to
    the vector's MRN pre-pseudonym, which only the hospital's K_mrn opens."""
    import json
    from pathlib import Path

    from gateway.pseudonym.mapping import load_input_mapping
    from gateway.pseudonym.source import SourceStage
    from gateway.pseudonymise import pseudonymise_patients

    vectors = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())
    keys, case = vectors["keys"], vectors["cases"][0]
    source = SourceStage({1: bytes.fromhex(keys["source_key_v1_hex"])}, 1,
                         bytes.fromhex(keys["provider_mrn_master_hex"]), keys["provider"])
    types = [p["type"] for p in case["pseudonyms"]]
    mrn_vector = next(p for p in case["pseudonyms"] if p["type"] == "MRN")
    tres_state, gpas_state = TresState(), GpasState()
    with serve(create_tres_stub(tres_state)) as tres_base, serve(create_gpas_stub(gpas_state)) as gpas_base:
        async def go():
            router = RoutingTTP({"MRN": _tres(tres_base)},
                                GpasTTP(gpas_base, domain_map={REGISTRY: "registry-example"}))
            try:
                outcome = await pseudonymise_patients(
                    {"urn:uuid:p1": case["patient"]}, registry=REGISTRY, types=types,
                    mapping=load_input_mapping(), source=source, mrn_system=keys["mrn_system"], ttp=router,
                    system_template="urn:test:{registry}:{type}")
                mrn_value = next(i["value"] for i in outcome.identifiers["urn:uuid:p1"]
                                 if i["type"]["text"] == "NLPS1 MRN")
                return outcome, await router.depseudonymise(REGISTRY, [mrn_value])
            finally:
                await router.aclose()
        outcome, [back] = asyncio.run(go())
    assert sum(outcome.types_added.values()) == len(types)
    assert back.identifier_value == mrn_vector["pre_b64u"]
    assert source.mrn_key(REGISTRY, 1).reveal(nlps1.unb64u(back.identifier_value)) == "NLPS1|MRN|P0001234"
    sent = [v for values in tres_state.received(ENC) for v in values]
    assert sent == [f"MRN.v1.{mrn_vector['pre_b64u']}"]
    assert not any("P0001234" in v or "111222333" in v for v in sent)
    assert len(gpas_state.received("pseudonymizeAllowCreate")) == 1
