"""The reference TTP over real HTTP (uvicorn on loopback): vectors, batching, roles, rotation, MRN."""

import asyncio
import json
import secrets
from pathlib import Path

import httpx
import pytest

from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.app import create_app
from gateway.ttp.client import HttpTTPClient
from gateway.ttp.testing import RequestCounter, make_test_ttp
from tests.servers import serve

VECTORS = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())
KEYS = VECTORS["keys"]
REGISTRY = KEYS["registry"]
MASTER = bytes.fromhex(KEYS["ttp_master_hex"])


@pytest.fixture
def ttp(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY, "registry-other"], master=MASTER)
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    with serve(counter) as base:
        yield fixture, base, counter


def _params(target, originals):
    return {"resourceType": "Parameters", "parameter": [{"name": "target", "valueString": target}]
            + [{"name": "original", "valueString": o} for o in originals]}


def _client(base, fixture, caller="provider-a", **kw):
    return HttpTTPClient(base, fixture.api_keys[caller], **kw)


def _run(coro):
    return asyncio.run(coro)


async def _pseudonymise(base, fixture, registry, items, caller="provider-a", **kw):
    async with _client(base, fixture, caller, **kw) as client:
        return await client.pseudonymise(registry, items)


def _vector_items():
    rows = [p for case in VECTORS["cases"] for p in case["pseudonyms"]]
    return rows, [PrePseudonym(p["type"], 1, nlps1.unb64u(p["pre_b64u"])) for p in rows]


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plain"])
def test_vectors_through_http(ttp, sealed):
    fixture, base, counter = ttp
    rows, items = _vector_items()
    results = _run(_pseudonymise(base, fixture, REGISTRY, items, sealed=sealed))
    assert [r.identifier_value for r in results] == [p["identifier_value"] for p in rows]
    assert [r.type for r in results] == [p["type"] for p in rows]
    assert all(r.error_code is None for r in results)
    assert counter.counts[("POST", "/$pseudonymize")] == 1


def test_other_registry_vectors_differ(ttp):
    fixture, base, _ = ttp
    case = VECTORS["cases"][0]["pseudonyms"]
    # the MRN pre-pseudonym is registry-specific at the source already (K_mrn[provider, registry])
    mrn_other = nlps1.ProviderMrnKey(bytes.fromhex(KEYS["provider_mrn_master_hex"]), KEYS["provider"],
                                     "registry-other", 1)
    items = [PrePseudonym(p["type"], 1, mrn_other.pre(p["canonical"]) if p["type"] == "MRN"
                          else nlps1.unb64u(p["pre_b64u"])) for p in case]
    other = {row["type"]: row["identifier_value"] for row in VECTORS["other_registry"]}
    results = _run(_pseudonymise(base, fixture, "registry-other", items))
    assert [r.identifier_value for r in results] == [other[p["type"]] for p in case]
    assert all(r.identifier_value != p["identifier_value"] for r, p in zip(results, case, strict=True))


def test_hundred_patients_one_request(ttp):
    fixture, base, counter = ttp
    types = [t for t in nlps1.TYPES if t != "MRN"]
    items = [PrePseudonym(t, 1, secrets.token_bytes(32)) for _ in range(100) for t in types]
    results = _run(_pseudonymise(base, fixture, REGISTRY, items))
    assert len(results) == 900 and all(r.identifier_value for r in results)
    assert [r.index for r in results] == list(range(900))
    assert counter.counts[("POST", "/$pseudonymize")] == 1


def test_garbage_in_the_middle_fails_only_that_value(ttp):
    fixture, base, _ = ttp
    good = [f"B:1:{nlps1.b64u(secrets.token_bytes(32))}" for _ in range(4)]
    originals = [good[0], good[1], "B:1:not*base64*at*all*secret-ish-value", "XX:1:" + good[2][4:],
                 "B:1:" + "A" * 22, good[2], "MRN", good[3]]
    r = httpx.post(f"{base}/$pseudonymize", json=_params(REGISTRY, originals),
                   headers=fixture.headers("provider-a"))
    assert r.status_code == 200
    params = r.json()["parameter"]
    errors = {p["part"][0]["valueInteger"]: p["part"][2]["valueCode"] for p in params if p["name"] == "error"}
    assert errors == {2: "invalid-format", 3: "unknown-type", 4: "invalid-length", 6: "invalid-format"}
    assert "secret-ish-value" not in r.text.split('"error"', 1)[1]  # error parts never echo the value
    ok = [p for p in params if p["name"] == "pseudonym"]
    assert len(ok) == 4 and [p["part"][0]["valueInteger"] for p in ok] == [0, 1, 5, 7]
    # gPAS shape: original, target and pseudonym as valueIdentifier parts
    parts = {q["name"]: q for q in ok[0]["part"]}
    assert parts["original"]["valueIdentifier"]["value"] == good[0]
    assert parts["target"]["valueIdentifier"]["value"] == REGISTRY
    assert parts["pseudonym"]["valueIdentifier"]["value"].startswith("v1.")


def test_cross_provider_linkage(ttp):
    fixture, base, _ = ttp
    pre = [PrePseudonym(t, 1, secrets.token_bytes(32)) for t in ("B", "NGGV", "GG")]
    at_a = _run(_pseudonymise(base, fixture, REGISTRY, pre, "provider-a"))
    at_b = _run(_pseudonymise(base, fixture, REGISTRY, pre, "provider-b"))
    elsewhere = _run(_pseudonymise(base, fixture, "registry-other", pre, "provider-b"))
    assert [r.identifier_value for r in at_a] == [r.identifier_value for r in at_b]
    assert all(a.identifier_value != o.identifier_value for a, o in zip(at_a, elsewhere, strict=True))
    # the reversible type is bound to the delivering provider: no linkage across providers by design
    mrn = [PrePseudonym("MRN", 1, secrets.token_bytes(40))]
    assert (_run(_pseudonymise(base, fixture, REGISTRY, mrn, "provider-a"))[0].identifier_value
            != _run(_pseudonymise(base, fixture, REGISTRY, mrn, "provider-b"))[0].identifier_value)


def test_authentication_and_roles(ttp):
    fixture, base, _ = ttp
    body = _params(REGISTRY, [f"B:1:{nlps1.b64u(bytes(32))}"])
    url = f"{base}/$pseudonymize"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(url, json=body, headers={"X-API-Key": fixture.api_keys["provider-a"]})
    assert r.status_code == 200
    for caller in ("registry-holder", "admin"):
        r = httpx.post(url, json=body, headers=fixture.headers(caller))
        assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert httpx.post(f"{base}/$rotate", json=_params(REGISTRY, []),
                      headers=fixture.headers("provider-a")).status_code == 403
    assert httpx.post(f"{base}/$translate", json=_params("registry-other", []),
                      headers=fixture.headers("registry-holder")).status_code == 403
    r = httpx.post(url, json=_params("no-such-registry", []), headers=fixture.headers("provider-a"))
    assert r.status_code == 404


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"resourceType":"Patient"}',
                                  b'{"resourceType":"Parameters"}',
                                  b'{"resourceType":"Parameters","parameter":[]}',
                                  b'{"resourceType":"Parameters","parameter":[{"name":"target","valueString":'
                                  b'"registry-example"},{"name":"bogus","valueString":"x"}]}'])
def test_bad_input_is_4xx_outcome(ttp, body):
    fixture, base, _ = ttp
    r = httpx.post(f"{base}/$pseudonymize", content=body, headers=fixture.headers("provider-a"))
    assert 400 <= r.status_code < 500
    assert r.json()["resourceType"] == "OperationOutcome"


def test_limits(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY])
    app = create_app(fixture.keystore, fixture.auth, max_values=10, max_body=4096)
    with serve(app) as base:
        too_many = _params(REGISTRY, [f"B:1:{nlps1.b64u(bytes(32))}"] * 11)
        r = httpx.post(f"{base}/$pseudonymize", json=too_many, headers=fixture.headers("provider-a"))
        assert r.status_code == 413
        r = httpx.post(f"{base}/$pseudonymize", content=b" " * 5000, headers=fixture.headers("provider-a"))
        assert r.status_code == 413


def test_rotation_and_translate_round_trip(ttp):
    fixture, base, _ = ttp
    provider = KEYS["provider"]
    rows = VECTORS["rotation"]
    r = httpx.post(f"{base}/$rotate", json=_params(REGISTRY, []), headers=fixture.headers("admin"))
    assert r.status_code == 200
    assert {p["name"]: p.get("valueInteger") for p in r.json()["parameter"]}["version"] == 2
    assert json.loads((fixture.key_dir / "keyring.json").read_text())["domains"][REGISTRY]["current"] == 2

    async def go():
        async with _client(base, fixture, "registry-holder") as holder:
            values = [(row["type"], row["v1"], provider if row["type"] == "MRN" else None) for row in rows]
            return await holder.translate(REGISTRY, values)

    translated = _run(go())
    assert [t.identifier_value for t in translated] == [row["v2"] for row in rows]
    # new pseudonyms now come out under v2 and equal the translated ones
    case = VECTORS["cases"][0]["pseudonyms"]
    items = [PrePseudonym(p["type"], 1, nlps1.unb64u(p["pre_b64u"])) for p in case]
    fresh = _run(_pseudonymise(base, fixture, REGISTRY, items))
    v2 = {row["type"]: row["v2"] for row in rows}
    assert [f.identifier_value for f in fresh] == [v2[p["type"]] for p in case]
    # retiring v1 makes old values untranslatable (per value, not the batch)
    fixture.keystore.retire(REGISTRY, 1, force=True)
    again = _run(_translate_one(base, fixture, ("B", rows[0]["v1"], None)))
    assert again.identifier_value is None and again.error_code == "unknown-or-retired-version"


async def _translate_one(base, fixture, value):
    async with _client(base, fixture, "registry-holder") as holder:
        return (await holder.translate(REGISTRY, [value]))[0]


def test_mrn_reversal_only_for_the_delivering_provider(ttp):
    fixture, base, _ = ttp
    mrn_master = bytes.fromhex(KEYS["provider_mrn_master_hex"])
    mrn_key = nlps1.ProviderMrnKey(mrn_master, KEYS["provider"], REGISTRY, 1)
    pre = mrn_key.pre("NLPS1|MRN|P0001234")
    [final] = _run(_pseudonymise(base, fixture, REGISTRY, [PrePseudonym("MRN", 1, pre)], "provider-a"))
    mrn_vector = next(p for p in VECTORS["cases"][0]["pseudonyms"] if p["type"] == "MRN")
    assert final.identifier_value == mrn_vector["identifier_value"]

    async def reverse(caller, values):
        async with _client(base, fixture, caller) as client:
            return await client.depseudonymise(REGISTRY, values)

    [opened] = _run(reverse("provider-a", [final.identifier_value]))
    assert mrn_key.reveal(nlps1.unb64u(opened.identifier_value)) == "NLPS1|MRN|P0001234"
    [refused] = _run(reverse("provider-b", [final.identifier_value]))
    assert refused.identifier_value is None and refused.error_code == "does-not-open"
    b_value = next(p for p in VECTORS["cases"][0]["pseudonyms"] if p["type"] == "B")["identifier_value"]
    [wrong_type] = _run(reverse("provider-a", [b_value]))
    assert wrong_type.error_code == "does-not-open"
    r = httpx.post(f"{base}/$de-pseudonymize", json=_params(REGISTRY, [f"B:{b_value}"]),
                   headers=fixture.headers("provider-a"))
    assert r.json()["parameter"][0]["part"][2]["valueCode"] == "not-reversible"
    body = _params(REGISTRY, [f"MRN:{final.identifier_value}"])
    for caller in ("registry-holder", "admin"):
        r = httpx.post(f"{base}/$de-pseudonymize", json=body, headers=fixture.headers(caller))
        assert r.status_code == 403
        assert "P0001234" not in r.text and final.identifier_value not in r.text


def test_metadata_and_public_key(ttp):
    fixture, base, _ = ttp
    cap = httpx.get(f"{base}/metadata").json()
    assert cap["resourceType"] == "CapabilityStatement"
    operations = {op["name"] for op in cap["rest"][0]["operation"]}
    assert operations == {"pseudonymize", "translate", "de-pseudonymize", "rotate"}
    jwk = httpx.get(f"{base}/.well-known/nlps1-public-key").json()["keys"][0]
    assert jwk["crv"] == "X25519" and jwk["kid"] == fixture.keystore.key_id
    assert nlps1.unb64u(jwk["x"]) == fixture.keystore.public_key_raw()
