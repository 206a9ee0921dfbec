"""The receiver's batched transaction path (versions looked up per Bundle, references rewritten in the
serialised bytes, one executemany) against the real app: upserts across Bundles, references at any depth
and with escaped characters, POST entries, all-or-nothing, and the order of the transaction-response."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.receiver import create_receiver_app
from tests.servers import serve
from tests.test_receiver import bsn_like_scan_stand_in, make_bundle, post


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    with serve(create_receiver_app(tmp_path / "recv", scan=bsn_like_scan_stand_in)) as base:
        yield base


def put(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
    }


def transaction(entries: list[dict[str, Any]], n: int | str = 1) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": f"bundle-{n}",
        "type": "transaction",
        "identifier": {"system": "urn:test:delivery", "value": f"d-{n}"},
        "entry": entries,
    }


def walk_rewrite(node: Any, refs: dict[str, str]) -> Any:
    """The meaning of the rewrite, as a plain walk: any `reference` element, at any depth, whose string
    value is an entry's fullUrl becomes that entry's Type/id; nothing else changes."""
    if isinstance(node, dict):
        out = {k: walk_rewrite(v, refs) for k, v in node.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in refs:
            out["reference"] = refs[out["reference"]]
        return out
    if isinstance(node, list):
        return [walk_rewrite(v, refs) for v in node]
    return node


def stored(base: str, location: str) -> httpx.Response:
    return httpx.get(f"{base}/{location.rsplit('/_history/', 1)[0]}")


def statuses(answer: httpx.Response) -> list[str]:
    return [e["response"]["status"] for e in answer.json()["entry"]]


def test_put_upserts_across_bundles_and_within_one(receiver: str) -> None:
    first = post(receiver, make_bundle(1, "p1", observations=2))
    assert statuses(first) == ["201 Created"] * 3
    # Another delivery (another identifier) with the same Patient and one old and one new Observation.
    second = make_bundle(2, "p1", observations=3, value=90.5)
    del second["entry"][1]
    answer = post(receiver, second)
    assert answer.status_code == 200
    assert statuses(answer) == ["200 OK", "200 OK", "201 Created"]
    responses = [e["response"] for e in answer.json()["entry"]]
    assert [r["location"] for r in responses] == [
        "Patient/p1/_history/2",
        "Observation/p1-obs-1/_history/2",
        "Observation/p1-obs-2/_history/1",
    ]
    assert [r["etag"] for r in responses] == ['W/"2"', 'W/"2"', 'W/"1"']
    obs = httpx.get(f"{receiver}/Observation/p1-obs-1").json()
    assert obs["meta"]["versionId"] == "2" and obs["valueQuantity"]["value"] == 90.5
    assert obs["meta"]["lastUpdated"] == responses[1]["lastModified"]
    untouched = httpx.get(f"{receiver}/Observation/p1-obs-0").json()
    assert untouched["meta"]["versionId"] == "1" and untouched["valueQuantity"]["value"] == 80.1
    # The same resource twice in one Bundle: the second entry counts on from the first and is what stays.
    twice = make_bundle(3, "p2", observations=1)
    again = orjson.loads(orjson.dumps(twice["entry"][1]))
    again["resource"]["status"] = "amended"
    twice["entry"].append(again)
    answer = post(receiver, twice)
    assert statuses(answer) == ["201 Created", "201 Created", "200 OK"]
    assert answer.json()["entry"][2]["response"]["location"] == "Observation/p2-obs-0/_history/2"
    obs = httpx.get(f"{receiver}/Observation/p2-obs-0").json()
    assert obs["status"] == "amended" and obs["meta"]["versionId"] == "2"
    assert httpx.get(f"{receiver}/_accepted").json() == {
        "urn:test:delivery|d-1": 1,
        "urn:test:delivery|d-2": 1,
        "urn:test:delivery|d-3": 1,
    }


def test_versions_are_looked_up_in_chunks_for_large_bundles(receiver: str) -> None:
    """More entries of one type than one `IN (...)` query takes (900 ids) still all find their version."""
    entries = [put(f"urn:uuid:o{i}", {"resourceType": "Observation", "id": f"o{i}"}) for i in range(1001)]
    assert statuses(post(receiver, transaction(entries[:950], 1))) == ["201 Created"] * 950
    answer = post(receiver, transaction(entries, 2))
    assert statuses(answer) == ["200 OK"] * 950 + ["201 Created"] * 51
    assert answer.json()["entry"][949]["response"]["location"] == "Observation/o949/_history/2"
    assert httpx.get(f"{receiver}/Observation/o900").json()["meta"]["versionId"] == "2"
    listing = httpx.get(f"{receiver}/deliveries").json()
    assert [d["entryCount"] for d in listing] == [950, 1001]
    assert listing[1]["resourceCounts"] == {"Observation": 1001}


def tricky_resource() -> dict[str, Any]:
    """References at depth, in lists, in extensions, and look-alikes that must stay as they are."""
    pat, enc = "urn:uuid:pat-1", "urn:uuid:enc-1"
    return {
        "resourceType": "Procedure",
        "id": "proc-1",
        "meta": {"source": "urn:test:source", "versionId": "from-the-sender", "tag": [{"code": "x"}]},
        "status": "completed",
        "subject": {"reference": pat, "display": pat},
        "encounter": {"reference": enc},
        "performer": [
            {"actor": {"reference": "Practitioner/external"}},
            {"actor": {"reference": pat}, "onBehalfOf": {"reference": "urn:uuid:not-in-this-bundle"}},
        ],
        "reasonReference": [{"reference": enc}, {"reference": pat}],
        "extension": [
            {"url": "urn:test:ext", "valueReference": {"reference": enc}},
            {"url": "urn:test:outer", "extension": [{"url": "inner", "valueReference": {"reference": pat}}]},
        ],
        "contained": [
            {
                "resourceType": "Provenance",
                "id": "prov",
                "target": [{"reference": "#"}],
                "agent": [{"who": {"reference": pat}, "onBehalfOf": {"identifier": {"value": pat}}}],
                "entity": [{"what": {"extension": [{"valueReference": {"reference": enc}}]}}],
            }
        ],
        "note": [{"text": pat}, {"text": f'{{"reference":"{pat}"}} and ,"reference":"{enc}"'}],
        "identifier": [{"system": "urn:test", "value": enc}],
        "xreference": pat,
        "referenced": {"reference ": pat},
        'a"reference': pat,
        "reference": enc,  # a top-level element named reference is rewritten too
        "code": {"coding": [{"system": "urn:test", "code": "reference"}], "text": "reference"},
    }


def test_references_are_rewritten_at_any_depth_and_nothing_else(receiver: str) -> None:
    entries = [
        put("urn:uuid:pat-1", {"resourceType": "Patient", "id": "p-1"}),
        put(
            "urn:uuid:enc-1",
            {"resourceType": "Encounter", "id": "e-1", "subject": {"reference": "urn:uuid:pat-1"}},
        ),
        put("urn:uuid:proc-1", tricky_resource()),
    ]
    bundle = transaction(entries)
    answer = post(receiver, bundle)
    assert answer.status_code == 200
    stamp = answer.json()["entry"][2]["response"]["lastModified"]
    got = httpx.get(f"{receiver}/Procedure/proc-1")
    proc = got.json()
    assert proc["subject"] == {"reference": "Patient/p-1", "display": "urn:uuid:pat-1"}
    assert proc["encounter"]["reference"] == "Encounter/e-1"
    assert [p["actor"]["reference"] for p in proc["performer"]] == ["Practitioner/external", "Patient/p-1"]
    assert proc["performer"][1]["onBehalfOf"]["reference"] == "urn:uuid:not-in-this-bundle"
    assert [r["reference"] for r in proc["reasonReference"]] == ["Encounter/e-1", "Patient/p-1"]
    assert proc["extension"][0]["valueReference"]["reference"] == "Encounter/e-1"
    assert proc["extension"][1]["extension"][0]["valueReference"]["reference"] == "Patient/p-1"
    contained = proc["contained"][0]
    assert contained["agent"][0]["who"]["reference"] == "Patient/p-1"
    assert contained["agent"][0]["onBehalfOf"]["identifier"]["value"] == "urn:uuid:pat-1"
    assert contained["entity"][0]["what"]["extension"][0]["valueReference"]["reference"] == "Encounter/e-1"
    assert contained["target"] == [{"reference": "#"}]
    assert proc["note"] == tricky_resource()["note"]
    assert proc["identifier"][0]["value"] == "urn:uuid:enc-1"
    assert proc["xreference"] == proc['a"reference'] == proc["referenced"]["reference "] == "urn:uuid:pat-1"
    assert proc["reference"] == "Encounter/e-1"
    assert proc["meta"] == {
        "source": "urn:test:source",
        "versionId": "1",
        "tag": [{"code": "x"}],
        "lastUpdated": stamp,
    }
    # Byte for byte what a plain walk over the parsed resource gives.
    refs = {
        "urn:uuid:pat-1": "Patient/p-1",
        "urn:uuid:enc-1": "Encounter/e-1",
        "urn:uuid:proc-1": "Procedure/proc-1",
    }
    expected = walk_rewrite(tricky_resource(), refs)
    expected["meta"] = {**expected["meta"], "versionId": "1", "lastUpdated": stamp}
    assert got.content == orjson.dumps(expected)
    encounter = httpx.get(f"{receiver}/Encounter/e-1").json()
    assert encounter["subject"] == {"reference": "Patient/p-1"}
    # The Bundle as received is kept unchanged (references not rewritten there).
    assert httpx.get(f"{receiver}/Bundle/bundle-1").content == orjson.dumps(bundle)


def test_reference_values_with_escaped_characters(receiver: str) -> None:
    odd = 'urn:uuid:we"ird\\one\n\t\u00e9\u2028'  # a quote, a backslash, control characters, non-ASCII
    entries = [
        put(odd, {"resourceType": "Patient", "id": "p-odd"}),
        put(
            "urn:uuid:obs-odd",
            {
                "resourceType": "Observation",
                "id": "obs-odd",
                "subject": {"reference": odd},
                "focus": [{"reference": odd + "x"}, {"reference": 'x"' + odd}, {"reference": "a\\"}],
                "note": [{"text": odd}],
                "specimen": {"reference": "urn:uuid:obs-odd"},
            },
        ),
    ]
    answer = post(receiver, transaction(entries))
    assert answer.status_code == 200
    got = httpx.get(f"{receiver}/Observation/obs-odd")
    obs = got.json()
    assert obs["subject"] == {"reference": "Patient/p-odd"}
    assert [f["reference"] for f in obs["focus"]] == [odd + "x", 'x"' + odd, "a\\"]
    assert obs["note"] == [{"text": odd}] and obs["specimen"] == {"reference": "Observation/obs-odd"}
    expected = walk_rewrite(
        entries[1]["resource"], {odd: "Patient/p-odd", "urn:uuid:obs-odd": "Observation/obs-odd"}
    )
    expected["meta"] = {
        "versionId": "1",
        "lastUpdated": answer.json()["entry"][1]["response"]["lastModified"],
    }
    assert got.content == orjson.dumps(expected)


def test_post_entries_are_created_with_new_ids_every_time(receiver: str) -> None:
    bundle = make_bundle(1, "p1", observations=2)
    for entry in bundle["entry"]:
        entry["request"] = {"method": "POST", "url": entry["resource"]["resourceType"]}
        del entry["resource"]["id"]
    first = post(receiver, bundle).json()["entry"]
    again = {**bundle, "identifier": {"system": "urn:test", "value": "again"}}
    second = post(receiver, again).json()["entry"]
    locations = [e["response"]["location"] for e in first + second]
    assert all(e["response"]["status"] == "201 Created" for e in first + second)
    assert all(loc.endswith("/_history/1") for loc in locations) and len(set(locations)) == 6
    assert [loc.split("/")[0] for loc in locations] == ["Patient", "Observation", "Observation"] * 2
    for answer in (first, second):
        patient = stored(receiver, answer[0]["response"]["location"]).json()
        assert answer[0]["response"]["location"] == f"Patient/{patient['id']}/_history/1"
        for entry, sent in zip(answer[1:], bundle["entry"][1:], strict=True):
            got = stored(receiver, entry["response"]["location"])
            obs = got.json()
            assert obs["subject"]["reference"] == f"Patient/{patient['id']}"
            # The new id and the meta are added at the end, in that order, as a plain walk would.
            meta = {"versionId": "1", "lastUpdated": entry["response"]["lastModified"]}
            expected = {**walk_rewrite(sent["resource"], {}), "id": obs["id"], "meta": meta}
            expected["subject"] = {"reference": f"Patient/{patient['id']}"}
            assert got.content == orjson.dumps(expected)


def test_an_invalid_entry_rejects_the_whole_bundle(receiver: str) -> None:
    assert post(receiver, make_bundle(1, "p1", observations=1)).status_code == 200
    bundle = make_bundle(2, "p1", observations=600, value=99.0)
    bundle["entry"][600]["request"]["url"] = "Observation/not-the-resource-id"
    bundle["entry"][300]["resource"]["resourceType"] = "not a type"
    r = post(receiver, bundle)
    assert r.status_code == 400
    issues = r.json()["issue"]
    assert [i["expression"] for i in issues] == [
        ["Bundle.entry[300].resource"],
        ["Bundle.entry[600].resource.id"],
    ]
    assert "not-the-resource-id" not in r.text and "not a type" not in r.text  # fields named, values never
    # Nothing of it was stored: the earlier versions stand, no new resources, no receipt, not counted.
    patient = httpx.get(f"{receiver}/Patient/p1").json()
    assert patient["meta"]["versionId"] == "1"
    obs = httpx.get(f"{receiver}/Observation/p1-obs-0").json()
    assert obs["meta"]["versionId"] == "1" and obs["valueQuantity"]["value"] == 80.1
    assert httpx.get(f"{receiver}/Observation/p1-obs-1").status_code == 404
    assert len(httpx.get(f"{receiver}/deliveries").json()) == 1
    assert httpx.get(f"{receiver}/_accepted").json() == {"urn:test:delivery|d-1": 1}


def test_a_final_newline_in_a_type_or_id_and_a_meta_that_is_no_object_are_refused(receiver: str) -> None:
    """A review of the receiver: "$" let `Patient\n` and an id `p1\n` in (stored under them), and a `meta`
    that is a string was a 500 in plain text."""
    cases = [("resourceType", "Patient\n", "Bundle.entry[0].resource")]
    cases += [("id", "p1\n", "Bundle.entry[0].request.url"), ("meta", "x", "Bundle.entry[0].resource.meta")]
    for key, value, where in cases:
        bundle = make_bundle(5, "p1", observations=1)
        patient = bundle["entry"][0]
        patient["resource"][key] = value
        if key == "id":
            patient["request"]["url"] = f"Patient/{value}"
        answer = post(receiver, bundle)
        assert answer.status_code == 400, (key, answer.text)
        assert answer.json()["issue"][0]["expression"] == [where]


def test_the_response_follows_the_bundle_order(receiver: str) -> None:
    existing = [
        put("urn:uuid:c1", {"resourceType": "Condition", "id": "c1"}),
        put("urn:uuid:pa", {"resourceType": "Patient", "id": "pa"}),
    ]
    assert post(receiver, transaction(existing, 1)).status_code == 200
    mixed = [
        put(
            "urn:uuid:o1",
            {"resourceType": "Observation", "id": "o1", "subject": {"reference": "urn:uuid:pb"}},
        ),
        put("urn:uuid:pa", {"resourceType": "Patient", "id": "pa"}),
        put("urn:uuid:e1", {"resourceType": "Encounter", "id": "e1"}),
        {
            "fullUrl": "urn:uuid:new",
            "resource": {"resourceType": "Condition"},
            "request": {"method": "POST", "url": "Condition"},
        },
        put("urn:uuid:c1", {"resourceType": "Condition", "id": "c1"}),
        put("urn:uuid:pb", {"resourceType": "Patient", "id": "pb"}),
        put("urn:uuid:o0", {"resourceType": "Observation", "id": "o0"}),
    ]
    answer = post(receiver, transaction(mixed, 2)).json()
    assert answer["type"] == "transaction-response"
    responses = [e["response"] for e in answer["entry"]]
    locations = [r["location"] for r in responses]
    assert locations[:3] == ["Observation/o1/_history/1", "Patient/pa/_history/2", "Encounter/e1/_history/1"]
    assert locations[3].startswith("Condition/") and locations[3].endswith("/_history/1")
    assert locations[4:] == ["Condition/c1/_history/2", "Patient/pb/_history/1", "Observation/o0/_history/1"]
    assert [r["status"] for r in responses] == [
        "201 Created",
        "200 OK",
        "201 Created",
        "201 Created",
        "200 OK",
        "201 Created",
        "201 Created",
    ]
    assert [r["etag"] for r in responses] == ['W/"1"', 'W/"2"', 'W/"1"', 'W/"1"', 'W/"2"', 'W/"1"', 'W/"1"']
    assert len({r["lastModified"] for r in responses}) == 1
    assert httpx.get(f"{receiver}/Observation/o1").json()["subject"] == {"reference": "Patient/pb"}
    assert httpx.get(f"{receiver}/deliveries").json()[1]["resourceCounts"] == {
        "Condition": 2,
        "Encounter": 1,
        "Observation": 2,
        "Patient": 2,
    }
