"""Hypothesis: ``deidentify`` never raises on random nested JSON inside allowed resources, whatever the
JSON types, and what it delivers still only references delivered resources."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.deid import deidentify, scan
from gateway.deid.r4 import r4
from tests.test_deid_support import KEY_A, PROVENANCE, fake_pseudonyms, plan_for, references

PLAN = plan_for("example-generic")
TYPES = sorted(PLAN.nodes)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["Patient/p1", "urn:uuid:e1", "#c1", "Patient?identifier=x|1", "2024-02-30", "1012 AB"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "reference",
                    "url",
                    "extension",
                    "value",
                    "display",
                    "system",
                    "code",
                    "coding",
                    "identifier",
                    "valueString",
                    "modifierExtension",
                    "start",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@st.composite
def resources(draw: Any) -> dict[str, Any]:
    rtype = draw(st.sampled_from(TYPES))
    names = sorted(r4().elements[rtype])
    body = draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=6), json_values, max_size=8))
    body.pop("modifierExtension", None) if draw(st.booleans()) else None
    return {**body, "resourceType": rtype, "id": draw(st.sampled_from(["p1", "e1", "x", "c1"]))}


@st.composite
def bundles(draw: Any) -> dict[str, Any]:
    entries = draw(st.lists(resources(), min_size=1, max_size=6))
    urls = draw(
        st.lists(
            st.sampled_from(["urn:uuid:e1", "urn:uuid:p1", "http://h/fhir/Patient/p1", None]),
            min_size=len(entries),
            max_size=len(entries),
        )
    )
    out = []
    for res, url in zip(entries, urls, strict=True):
        entry: dict[str, Any] = {"resource": res}
        if url:
            entry["fullUrl"] = url
        out.append(entry)
    junk = draw(st.lists(json_values, max_size=2))  # entries that are not entries at all
    return {"resourceType": "Bundle", "type": "transaction", "entry": out + junk}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bundles())
def test_deidentify_never_raises_and_keeps_references_inside(bundle: dict[str, Any]) -> None:
    result = deidentify(bundle, PLAN, id_key=KEY_A, pseudonyms=fake_pseudonyms(bundle), provenance=PROVENANCE)
    out = result.bundle
    full_urls = {e["fullUrl"] for e in out["entry"]}
    assert set(references(out)) <= full_urls
    for entry in out["entry"]:
        assert entry["resource"]["resourceType"] in TYPES + ["Provenance"]
    scan(out)  # must not raise either


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_deidentify_tolerates_any_bundle_shape(value: Any) -> None:
    doc = {"resourceType": "Bundle", "entry": value}
    deidentify(doc, PLAN, id_key=KEY_A, pseudonyms={}, provenance=PROVENANCE)


PROFILE_KEYS = st.sampled_from(
    [
        "id",
        "name",
        "purpose",
        "legal_basis",
        "pseudonym_types",
        "allow_bsn_pseudonym",
        "endpoint",
        "generalise",
        "free_text",
        "practitioner",
        "references",
        "resources",
        "basis",
        "allows",
        "birthDate",
        "Patient",
        "Observation",
        "method",
        "kind",
        "to",
        "keep",
        "profile_switch",
        "datatypes",
        "paths",
        "extensions",
        "version",
        "HumanName",
        "Patient.name",
        "http://x.example/e",
    ]
)
yaml_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(PROFILE_KEYS, inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(yaml_like)
def test_validators_never_raise(data: Any) -> None:
    from gateway.deid import check_profile, check_rules

    assert isinstance(check_profile(data), list)
    assert isinstance(check_rules(data), list)


def _full_walk(doc: Any, sensitive: Any) -> list[Any]:
    from gateway.deid.leakscan import _Scanner, folded

    scanner = _Scanner(sensitive)
    scanner.value(folded(doc, None)[0], "", {}, ["Bundle"])  # the walk reads folded text, as scan() does
    return scanner.findings


pieces = st.sampled_from(
    [
        "111222333",
        "Johanna",
        "van Putten",
        "1012 NX",
        "1012NX",
        "0031688228822",
        "x",
        " ",
        "\n",
        "\t",
        "\x07",
        '"',
        "\\",
        "é",
        "ß",
        "_",
        "-",
        "9",
        "SNOMED",
        "Jansens",
        "jan",
        "Peter",
        "1112.22.333",  # a BSN written out, and the pieces of such notations and of phone numbers
        "111 222 333",
        "06-8822 8822",
        "+31 6 ",
        "88228822",
        ".",
        "(0)",
        "1934-04-28",  # the nl-core patient's birth date, and other notations of it
        "28-04-1934",
        "april",
        "bsn",  # glued to a BSN
        "abc",
        "Pomp",  # names and postcodes run into other words: "PompJohanna", "Johannastraat", "pc1012NX"
        "straat",
        "PETER",
        "İ",  # lower-cases to two characters
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(pieces, max_size=6).map("".join), min_size=1, max_size=4))
def test_whole_document_glance_never_hides_a_finding(texts: list[str]) -> None:
    from gateway.deid import scan, sensitive_values
    from tests.test_deid_support import dutch_bundle

    sensitive = sensitive_values(dutch_bundle())
    doc = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Observation", "note": [{"text": t} for t in texts]}}],
    }
    # the same findings, not only the same verdict: when the glance sends a document to the walk, the walk
    # looks only for the glued values the glance saw in it
    assert scan(doc, sensitive) == _full_walk(doc, sensitive)
    assert scan(doc) == _full_walk(doc, None)
