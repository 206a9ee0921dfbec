"""GicsConsent against the gICS stub (tests/stubs/gics_stub.py, from the published TTP-FHIR gateway examples)
under uvicorn: objection policies, bulk $allConsentsForPerson with client and server paging, $isConsented per
patient, cache, fail closed, auth, and that no BSN or patient number ever reaches gICS."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.forward import OAuth2ClientCredentials
from gateway.optout.base import CombinedOptOut, Decision, OptOutSource, PatientRef
from gateway.optout.gics import GicsConsent, gics_from_config, hmac_signer_id, parse_policies
from gateway.optout.register import objection_digest
from gateway.ttp.gpas import BasicAuth
from tests.servers import free_port, serve
from tests.stubs.common import StubAuth
from tests.stubs.gics_stub import POLICY_SYSTEM, GicsState, StoredConsent, create_gics_stub

KEY = bytes.fromhex("11" * 32)  # test key
PROVIDER, REGISTRY, DOMAIN = "ura:00000000", "registry-example", "registry-objections"
OPT_OUT = f"{POLICY_SYSTEM}|p-opt-out"
BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"


def _patient(n: int, mrn: str | None = None) -> PatientRef:
    mrn = mrn if mrn is not None else f"P{n:07d}"
    resource = {"resourceType": "Patient", "id": f"p{n}",
                "identifier": [{"system": BSN_SYSTEM, "value": "111222333"},
                               {"system": "http://ehr.example.org/mrn", "value": mrn}]}
    return PatientRef(f"urn:uuid:p{n}", resource, mrn or None, PROVIDER, REGISTRY)


def _sid(p: PatientRef) -> str:
    return objection_digest(KEY, PROVIDER, p.mrn or "")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _check(base: str, patients, *, rounds: int = 1, between=None, **kw) -> list[dict[str, Decision]]:
    async def go():
        options = {"domain": DOMAIN, "objection_policies": [OPT_OUT], "signer_id": hmac_signer_id(KEY),
                   "backoff": 0.01, **kw}
        async with GicsConsent(base, **options) as source:
            out = []
            for i in range(rounds):
                if i and between:
                    between()
                out.append(await source.check(patients))
            return out
    return asyncio.run(go())


def _statuses(decisions: dict[str, Decision]) -> dict[str, tuple[str, str]]:
    return {k: (d.status, d.reason) for k, d in decisions.items()}


def _state_with(objected=(), other=(), **kw) -> GicsState:
    state = GicsState(**kw)
    for p in objected:
        state.records[_sid(p)] = [StoredConsent()]
    for p in other:
        state.records[_sid(p)] = [StoredConsent(policy=(POLICY_SYSTEM, "MDAT_erheben"))]
    return state


def test_is_an_optout_source():
    source = GicsConsent("http://127.0.0.1:1", domain=DOMAIN, objection_policies=[OPT_OUT],
                         signer_id=hmac_signer_id(KEY))
    checker: OptOutSource = source  # the protocol is not runtime-checkable: typed assignment + signature
    assert asyncio.iscoroutinefunction(checker.check)


def test_bulk_decisions_one_request_and_only_keyed_ids_sent():
    patients = [_patient(1), _patient(2), _patient(3)]
    state = _state_with(objected=[patients[0]], other=[patients[1]])
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients)
    assert _statuses(decisions) == {"urn:uuid:p1": ("objected", "gics-objection"),
                                    "urn:uuid:p2": ("allowed", "gics-no-objection"),
                                    "urn:uuid:p3": ("allowed", "gics-no-record")}
    assert [r["operation"] for r in state.requests] == ["allConsentsForPerson"]
    sent = state.signer_ids_received()
    assert sent == [_sid(p) for p in patients]
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in sent)
    assert not {"111222333", "P0000001", "P0000002", "P0000003"} & set(sent)


def test_an_objection_under_an_old_number_holds_and_each_number_is_asked():
    from dataclasses import replace

    renumbered = replace(_patient(1), other_mrns=("P0000099",))
    old = replace(_patient(99), key="old")
    known_under_old = replace(_patient(2), other_mrns=("P0000098",))
    state = _state_with(objected=[old], other=[replace(_patient(98), key="x")])
    with serve(create_gics_stub(state)) as base:
        [bulk] = _check(base, [renumbered, known_under_old], no_record="unknown")
        [single] = _check(base, [renumbered], bulk=False)
    assert _statuses(bulk) == {"urn:uuid:p1": ("objected", "gics-objection"),
                               "urn:uuid:p2": ("allowed", "gics-no-objection")}  # known under its old number
    assert single["urn:uuid:p1"].status == "objected"
    asked = set(state.signer_ids_received())
    assert {_sid(renumbered), _sid(old), _sid(known_under_old)} <= asked
    assert not {"P0000001", "P0000099", "P0000098"} & asked


def test_client_paging_by_page_size():
    patients = [_patient(n) for n in range(1, 6)]
    state = _state_with(objected=[patients[4]])
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients, page_size=2)
    assert sorted(len(r["signers"]) for r in state.requests) == [1, 2, 2]  # pages go concurrently
    assert decisions["urn:uuid:p5"].status == "objected"
    assert all(decisions[f"urn:uuid:p{n}"].status == "allowed" for n in range(1, 5))


def test_server_paging_next_links_are_followed():
    patients = [_patient(n) for n in range(1, 5)]
    state = _state_with(objected=[patients[3]], other=patients[:3], page_limit=1)
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients)
    assert len(state.requests) == 4  # one page per Consent
    assert decisions["urn:uuid:p4"].status == "objected"
    assert {decisions[f"urn:uuid:p{n}"].reason for n in (1, 2, 3)} == {"gics-no-objection"}


def test_too_many_pages_is_unknown():
    patients = [_patient(n) for n in range(1, 5)]
    state = _state_with(other=patients, page_limit=1)
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients, max_pages=2)
    assert {d.status for d in decisions.values()} == {"unknown"}


def test_withdrawn_or_expired_objection_is_not_an_objection():
    p1, p2 = _patient(1), _patient(2)
    state = GicsState(records={_sid(p1): [StoredConsent(status="inactive")],
                               _sid(p2): [StoredConsent(start="2019-01-01T00:00:00+01:00",
                                                             end="2020-01-01T00:00:00+01:00")]})
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, [p1, p2])
    assert {d.status for d in decisions.values()} == {"allowed"}


def test_no_record_can_be_configured_unknown():
    with serve(create_gics_stub(GicsState())) as base:
        [decisions] = _check(base, [_patient(1)], no_record="unknown")
    assert _statuses(decisions) == {"urn:uuid:p1": ("unknown", "gics-no-record")}


def test_per_patient_is_consented():
    patients = [_patient(1), _patient(2)]
    state = _state_with(objected=[patients[0]], other=[patients[1]])
    policies = [OPT_OUT, f"{POLICY_SYSTEM}|p-registry-objection"]
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients, bulk=False, objection_policies=policies)
    assert _statuses(decisions) == {"urn:uuid:p1": ("objected", "gics-objection"),
                                    "urn:uuid:p2": ("allowed", "gics-no-objection")}
    assert [r["operation"] for r in state.requests] == ["isConsented"] * 4  # patients × policies
    assert set(state.signer_ids_received()) == {_sid(p) for p in patients}


def test_cache_short_lived_and_only_clean_answers():
    clock = Clock()
    patients = [_patient(1)]
    state = _state_with(objected=patients)

    def later():
        clock.t += 61
    with serve(create_gics_stub(state)) as base:
        cached = _check(base, patients, rounds=2, clock=clock)
        assert len(state.requests) == 1 and cached[1]["urn:uuid:p1"].status == "objected"
        _check(base, patients, rounds=2, clock=clock, between=later)
        assert len(state.requests) == 3  # expired after the TTL: asked again
        state.script.failures = [(503, {})] * 3
        failed = _check(base, patients, rounds=2, clock=clock, retries=0)
    assert [d["urn:uuid:p1"].status for d in failed] == ["unknown", "unknown"]
    assert len(state.script.failures) == 1  # both rounds asked gICS: a failure is never cached


def test_unavailable_or_refusing_gics_is_unknown():
    patients = [_patient(1)]
    with serve(create_gics_stub(GicsState(domain="other-domain"))) as base:
        [refused] = _check(base, patients)
    [down] = _check(f"http://127.0.0.1:{free_port()}", patients, retries=1)
    assert _statuses(refused) == {"urn:uuid:p1": ("unknown", "gics-unavailable")}
    assert _statuses(down) == {"urn:uuid:p1": ("unknown", "gics-unavailable")}


def test_retries_503_then_200_and_429_retry_after():
    patients = [_patient(1)]
    state = _state_with(objected=patients)
    state.script.failures = [(503, {}), (429, {"Retry-After": "1"})]
    with serve(create_gics_stub(state)) as base:
        [decisions] = _check(base, patients, retries=2)
    assert decisions["urn:uuid:p1"].status == "objected"


def test_no_signer_id_or_a_plain_identifier_as_signer_id_is_never_sent():
    state = GicsState()
    with serve(create_gics_stub(state)) as base:
        [no_mrn] = _check(base, [_patient(1, mrn="")])
        [bsn] = _check(base, [_patient(2)], signer_id=lambda p: "111222333")
        [broken] = _check(base, [_patient(3)], signer_id=lambda p: 1 / 0)
    assert no_mrn["urn:uuid:p1"] == Decision("unknown", "gics-no-signer-id")
    assert bsn["urn:uuid:p2"] == Decision("unknown", "gics-signer-id-is-an-identifier")
    assert broken["urn:uuid:p3"] == Decision("unknown", "gics-no-signer-id")
    assert state.requests == []


def test_basic_and_oauth2_auth():
    patients = [_patient(1)]
    basic_state = _state_with(objected=patients, auth=StubAuth(mode="basic"))
    oauth_state = _state_with(objected=patients, auth=StubAuth(mode="oauth2"))
    with serve(create_gics_stub(basic_state)) as base:
        [ok] = _check(base, patients, auth=BasicAuth("gateway", "test-password"))
        [bad] = _check(base, patients, auth=BasicAuth("gateway", "nope"))
    with serve(create_gics_stub(oauth_state)) as base:
        auth = OAuth2ClientCredentials(f"{base}/token", "gateway", "test-client-secret")
        [oauth] = _check(base, patients, auth=auth)
    assert ok["urn:uuid:p1"].status == "objected" and oauth["urn:uuid:p1"].status == "objected"
    assert bad["urn:uuid:p1"].status == "unknown"


def test_from_config_with_secrets_from_the_environment():
    env = {"GICS_KEY": KEY.hex(), "GICS_PW": "test-password"}
    patients = [_patient(1)]
    state = _state_with(objected=patients, auth=StubAuth(mode="basic"))
    with serve(create_gics_stub(state)) as base:
        auth = {"type": "basic", "username": "gateway", "password_env": "GICS_PW"}
        source = gics_from_config({"url": base, "domain": DOMAIN, "objection_policies": [OPT_OUT],
                                   "signer_key_env": "GICS_KEY", "auth": auth}, env.get)

        async def go():
            async with source:
                await source.probe()
                return await CombinedOptOut([source]).check(patients)
        decisions = asyncio.run(go())
    assert decisions["urn:uuid:p1"].status == "objected"
    with pytest.raises(ValueError):
        gics_from_config({"url": "http://x", "domain": DOMAIN, "objection_policies": [OPT_OUT]}, env.get)
    with pytest.raises(ValueError):
        parse_policies(["no-system"])


def test_the_signer_id_is_the_registers_digest_of_the_number_in_any_case():
    """A probe: the signer id was the digest of the number as given, the register's of the number
    upper-cased (as `objections import` stores it): a record numbered p0001234 found no gICS objection
    registered, as the docs say, under the register's digest."""
    from gateway.optout.register import registered_form

    lower = _patient(1, mrn="p0001234")
    for number in (registered_form("p0001234"), "p0001234"):  # the register's digest, and the older one
        state = GicsState(records={objection_digest(KEY, PROVIDER, number): [StoredConsent()]})
        with serve(create_gics_stub(state)) as base:
            [decisions] = _check(base, [lower])
        assert _statuses(decisions) == {"urn:uuid:p1": ("objected", "gics-objection")}, number
