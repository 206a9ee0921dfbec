"""Property-based fuzzing of the running gateway over HTTP (hypothesis).

Random JSON documents, random bytes and mutated example bundles (nodes dropped, replaced or duplicated,
random strings in dates and references) are posted to the Bundle endpoint. Whatever arrives, the answer is
a 2xx or a 4xx OperationOutcome: never a 5xx, never a hang (every request has a client timeout).
Example counts are bounded for CI; deadlines are off (the chain's first calls warm caches).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo import embedded_chain

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.json"))
SEEDS = [json.loads(p.read_text()) for p in EXAMPLES]
REGISTRY = "example-generic"
TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # a hang fails the example instead of stalling the run
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[httpx.Client]:
    with embedded_chain(tmp_path_factory.mktemp("fuzz"), [REGISTRY]) as chain:
        # respond-async: an accepted bundle answers 202 once stored, without waiting for the registry
        headers = {"Authorization": f"Bearer {chain.ehr_api_key}", "Content-Type": "application/fhir+json",
                   "Prefer": "respond-async"}
        with httpx.Client(base_url=chain.gateway_url, headers=headers, timeout=TIMEOUT) as client:
            yield client
            # after all the fuzzing, a good bundle still goes through
            good = client.post(f"/registries/{REGISTRY}/Bundle", content=EXAMPLES[1].read_bytes(),
                               headers={"Idempotency-Key": "fuzz-final"})
            assert good.status_code == 202, good.text


def assert_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        doc = response.json()
        assert doc["resourceType"] == "OperationOutcome", doc
        assert doc["issue"] and all(i["severity"] in ("error", "fatal", "warning", "information")
                                    for i in doc["issue"])
    else:
        assert response.json()["resourceType"] == "Parameters"


STATUSES: Counter[str] = Counter()  # by test and status, printed at the end of the module


def post(client: httpx.Client, body: bytes, kind: str) -> httpx.Response:
    response = client.post(f"/registries/{REGISTRY}/Bundle", content=body)
    STATUSES[f"{kind} {response.status_code}"] += 1
    return response


# --- strategies -------------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=25)
FHIR_KEYS = ["resourceType", "type", "entry", "resource", "fullUrl", "request", "method", "url", "id",
             "identifier", "subject", "reference", "patient", "birthDate", "name", "meta", "contained"]
fhir_ish = st.recursive(
    scalars | st.sampled_from(["Bundle", "Patient", "transaction", "collection", "urn:uuid:x", "Patient/1"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FHIR_KEYS), inner, max_size=6),
    max_leaves=30,
)
bundle_like = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Bundle", "Patient", "Parameters", "bundle", ""])},
    optional={"type": st.sampled_from(["transaction", "batch", "collection", "searchset"]) | scalars,
              "entry": st.lists(fhir_ish, max_size=4) | fhir_ish},
)


def paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every location in a JSON tree, as a tuple of keys/indexes."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def get(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


# dates and references twice: those mutations keep the bundle valid JSON/FHIR more often, so they reach
# opt-out, pseudonymisation and de-identification instead of stopping at the schema
MUTATIONS = ["drop", "replace", "duplicate", "date", "date", "reference", "reference"]
DATE_KEYS = ("date", "Date", "DateTime", "start", "end", "instant", "issued", "recorded", "lastUpdated")


@st.composite
def mutated_bundles(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        locations = [p for p in paths(doc) if p]
        if not locations:  # everything dropped already
            break
        kind = draw(st.sampled_from(MUTATIONS))
        if kind in ("date", "reference"):
            wanted = [p for p in locations if isinstance(p[-1], str) and isinstance(get(doc, p), str)
                      and (p[-1] == "reference" if kind == "reference" else p[-1].endswith(DATE_KEYS))]
            if not wanted:
                continue
            where = draw(st.sampled_from(wanted))
            get(doc, where[:-1])[where[-1]] = draw(st.text(max_size=40) | st.sampled_from(
                ["", "Patient/", "urn:uuid:", "#", "Patient/../../etc", "2026-13-45", "${DATE, T, D, -60}",
                 "0000-00-00T25:61:61Z", "Patient?identifier=x", "http://evil.example/Patient/1"]))
            continue
        where = draw(st.sampled_from(locations))
        parent, key = get(doc, where[:-1]), where[-1]
        if kind == "drop":
            del parent[key]
        elif kind == "replace":
            parent[key] = draw(json_values)
        elif isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[f"{key}"] = [copy.deepcopy(parent[key]), copy.deepcopy(parent[key])]
    return doc


# --- properties -------------------------------------------------------------------------------------------

@FUZZ
@given(doc=json_values | bundle_like)
def test_random_json_documents(gateway: httpx.Client, doc: Any) -> None:
    assert_answer(post(gateway, json.dumps(doc, ensure_ascii=False).encode(), "random-json"))


@FUZZ
@given(doc=mutated_bundles())
def test_mutated_example_bundles(gateway: httpx.Client, doc: dict[str, Any]) -> None:
    assert_answer(post(gateway, json.dumps(doc, ensure_ascii=False).encode(), "mutated"))


@settings(max_examples=60, deadline=None, database=None)
@given(body=st.binary(max_size=2000) | st.sampled_from(EXAMPLES).map(lambda p: p.read_bytes()[:1000]))
def test_random_bytes(gateway: httpx.Client, body: bytes) -> None:
    assert_answer(post(gateway, body, "bytes"))


# printable ASCII without surrounding blanks (HTTP itself strips those; h11 refuses to send them)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300).map(str.strip)


@settings(max_examples=80, deadline=None, database=None)
@given(content_type=header_text | st.sampled_from(["application/fhir+json; charset=utf-8; fhirVersion=4.0",
                                                   "application/fhir+json;;;", "application/json; charset=",
                                                   "application/fhir+json; fhirVersion"]),
       idempotency=header_text, prefer=header_text | st.just("respond-async"), auth_noise=header_text)
def test_random_headers(gateway: httpx.Client, content_type: str, idempotency: str, prefer: str,
                        auth_noise: str) -> None:
    """Content-Type, Idempotency-Key and Prefer are read by the service itself: any printable value is fine.
    A second credential header with noise must not confuse authentication (the Bearer key decides)."""
    headers = {"Content-Type": content_type, "Idempotency-Key": idempotency, "Prefer": prefer,
               "X-API-Key": auth_noise, "x-client-cert-subject": auth_noise}
    response = gateway.post(f"/registries/{REGISTRY}/Bundle", content=EXAMPLES[1].read_bytes(),
                            headers=headers)
    STATUSES[f"headers {response.status_code}"] += 1
    assert_answer(response)


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    if not STATUSES:
        pytest.skip("run with the fuzz tests for a tally")
    with capsys.disabled():
        print(f"\nfuzz over HTTP: {sum(STATUSES.values())} requests; " + ", ".join(
            f"{k}: {v}" for k, v in sorted(STATUSES.items())))
    assert not [k for k in STATUSES if k.endswith(tuple(f" 5{n:02d}" for n in range(100)))]
