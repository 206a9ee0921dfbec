"""The leak gate's whole-document check (`_clean_at_a_glance`) may only ever err towards walking: whenever the
exact walk reports a finding, the glance must not call the document clean. Both of its modes are exercised:
substring probes (few sensitive tokens) and the tokenised document (many patients, above `_PROBE_LIMIT`)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.deid.leakscan import (
    _PROBE_LIMIT,
    SensitiveSet,
    _clean_at_a_glance,
    _Scanner,
    folded,
    scan,
    sensitive_values,
)

GIVEN = ["Johanna", "Pieter", "Willemijn", "Ærøskøbing", "Straße"]
FAMILY = ["van Putten", "Jansens", "de Boer-Smit", "Müller", "O'Neil"]


def _patient(n: int) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        if n % 3
        else f"http://ehr.example/Patient/p{n}",
        "resource": {
            "resourceType": "Patient",
            "id": f"pat{n:05d}" if n % 4 else f"p-{n}",
            "identifier": [{"system": "http://ehr.example/mrn", "value": f"MRN{n:06d}"}],
            "name": [{"family": f"{FAMILY[n % 5]}{n}", "given": [GIVEN[n % 5]]}],
            "telecom": [{"system": "phone", "value": f"06-{n:08d}"}],
            "address": [{"line": [f"Dorpsstraat {n}"], "postalCode": f"{1000 + n} {chr(65 + n % 26)}X"}],
        },
    }


def _input(patients: int) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [_patient(n) for n in range(patients)]}


ONE = sensitive_values(_input(1))
MANY = sensitive_values(_input(12))
assert len(ONE.by_first) + 2 <= _PROBE_LIMIT < len(MANY.by_first)
# relative fullUrls (`Patient/q7`): every token at an edge, so none is required whole (a probe's 2,500 of them
# were each searched through the whole document); anchored on a substring now, and still found glued or whole
RELATIVE = sensitive_values(
    {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"Patient/q{n}", "resource": {**_patient(n)["resource"], "id": f"q{n}"}}
            for n in range(12)
        ],
    }
)

pieces = st.sampled_from(
    [
        "111222333",
        "999911120",
        "123456789",
        "Johanna",
        "willemijn",
        "van Putten4",
        "putten4",
        "Jansens1",
        "MÜLLER3",
        "straße",
        "STRASSE",
        "o'neil9",
        "1001 BX",
        "1001BX",
        "1001",
        "bx",
        "06-00000007",
        "0600000007",
        "mrn000005",
        "pat00005",
        "p-8",
        "Patient/",
        "urn:uuid:00000000-0000-4000-8000-000000000005",
        "urn:uuid:00000000-0000-4000-8000-0000000000051",
        "00000000-0000-4000-8000-000000000005",
        "http://ehr.example/Patient/p3",
        "Patient/q5",
        "Patient/q51",
        "xPatient/q5",
        "Dorpsstraat 7",
        "x",
        " ",
        "/",
        "-",
        "\n",
        "\t",
        "\x07",
        '"',
        "\\",
        "é",
        "_",
        "9",
        "a",
    ]
)
KEYS = st.sampled_from(["text", "reference", "id", "url", "fullUrl", "code", "value", "display", "_x"])
strings = st.lists(pieces, max_size=6).map("".join)
leaves = strings | st.integers(min_value=99_999_990, max_value=1_000_000_010)
documents = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def _walk(doc: Any, sensitive: SensitiveSet | None) -> list[Any]:
    scanner = _Scanner(sensitive)
    scanner.value(folded(doc, None)[0], "", {}, ["Bundle"])  # the walk reads folded text, as scan() does
    return scanner.findings


@settings(max_examples=500, deadline=None)
@given(documents, st.sampled_from([None, ONE, MANY, RELATIVE]))
def test_glance_never_hides_a_finding_of_the_walk(leaf: Any, sensitive: SensitiveSet | None) -> None:
    doc = {"resourceType": "Bundle", "entry": [leaf]}
    findings = _walk(doc, sensitive)
    if findings:
        assert not _clean_at_a_glance(folded(doc, None)[0], _Scanner(sensitive))
    assert scan(doc, sensitive) == findings


def test_both_modes_find_every_kind_in_a_multi_patient_bundle() -> None:
    for sensitive, n in ((ONE, 0), (MANY, 5)):
        for text, kind in [
            (f"{GIVEN[n % 5]} was here", "name"),
            (f"see {FAMILY[n % 5]}{n}", "name"),
            (f"MRN{n:06d}", "identifier"),
            (f"{1000 + n} {chr(65 + n % 26)}X", "postcode"),
            ("111222333", "bsn"),
        ]:
            doc = {"resourceType": "Observation", "note": [{"text": text}]}
            assert [f.kind for f in scan(doc, sensitive)] == [kind], (n, kind)
    url = _patient(5)["fullUrl"]
    doc = {"resourceType": "Observation", "subject": {"reference": url}}
    assert {f.kind for f in scan(doc, MANY)} >= {"patient-fullUrl"}
    doc = {"resourceType": "Observation", "subject": {"reference": "Patient/pat00005"}}
    assert {f.kind for f in scan(doc, MANY)} == {"patient-id"}
    doc = {"resourceType": "Observation", "subject": {"reference": "Patient/p-8"}}
    assert {f.kind for f in scan(doc, MANY)} == {"patient-id"}


def test_clean_multi_patient_output_is_clean_at_a_glance() -> None:
    doc = {
        "resourceType": "Bundle",
        "entry": [
            {
                "fullUrl": "urn:uuid:0f8f70a0-af5d-8dc3-9104-1132d75f4c6d",
                "resource": {"resourceType": "Patient"},
            },
            {"resource": {"resourceType": "Observation", "code": {"text": "Heart rate 8867-4"}}},
        ],
    }
    for sensitive in (None, ONE, MANY):
        assert _clean_at_a_glance(doc, _Scanner(sensitive))
        assert scan(doc, sensitive) == []


def _old_identifiers(value: Any, out: SensitiveSet) -> None:
    """The recursion as it was before the dump-and-search shortcut (every key, every item)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "identifier" or key.endswith("Identifier"):
                for ident in sub if isinstance(sub, list) else [sub]:
                    if isinstance(ident, dict):
                        out.add(ident.get("value"), "identifier")
            if isinstance(sub, (dict, list)):
                _old_identifiers(sub, out)
    elif isinstance(value, list):
        for item in value:
            _old_identifiers(item, out)


ID_KEYS = st.sampled_from(
    ["identifier", "basedOnIdentifier", "Identifier", "identifiers", "value", "x", "_id"]
)
id_values = st.sampled_from(["MRN000123", "999911120", "AB-12345", "x", 'Identifier":', 12345678, None])
resources = st.recursive(
    id_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ID_KEYS, inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(resources)
def test_identifier_collection_is_unchanged_by_the_shortcut(value: Any) -> None:
    from gateway.deid.leakscan import _resource_identifiers

    res = {"resourceType": "Observation", "x": value}
    old, new = SensitiveSet(), SensitiveSet()
    _old_identifiers(res, old)
    _resource_identifiers(res, new)
    assert new.by_first == old.by_first


def test_sensitive_values_of_the_dutch_corpus_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.deid import leakscan
    from tests.test_deid_support import dutch_bundle

    bundle = dutch_bundle()
    new = sensitive_values(bundle)
    monkeypatch.setattr(leakscan, "_resource_identifiers", _old_identifiers)
    old = sensitive_values(bundle)
    assert new == old
    assert any(kind == "identifier" for entries in new.by_first.values() for _, kind in entries)


SYSTEMS = st.sampled_from(
    [
        "http://snomed.info/sct",
        "http://loinc.org",
        "http://example.org/codes",
        "http://snomed.info",
        'x","system":"http://snomed.info/sct',
        "http://snomed.info/\\",
        '\\"http://loinc.org',
        7,
        None,
    ]
)
CODES = st.sampled_from(["111222333", "999911120", "111222334", " 111222333", "111222333 ", "x111222333"])
OTHER = st.sampled_from(["display", "version", "userSelected", "code2", "_code"])
codings = st.builds(
    lambda system, code, extra, order: dict(
        sorted(
            {"system": system, "code": code, **extra}.items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else 99,
        )
    ),
    SYSTEMS,
    CODES | st.integers(min_value=111222330, max_value=111222336),
    st.dictionaries(
        OTHER,
        st.sampled_from(
            [
                "111222333",
                'a "quoted" text',
                "x\\y",
                "Heart",
                '{"system":"http://snomed.info/sct","code":"111222333"}',
                '\\","code":"111222333',
            ]
        ),
        max_size=2,
    ),
    st.permutations(["system", "code", "display", "version", "userSelected", "code2", "_code"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(codings, min_size=1, max_size=3), st.sampled_from(["code", "valueCodeableConcept", "x"]))
def test_glance_code_exemption_never_hides_a_bsn(items: list[dict[str, Any]], key: str) -> None:
    doc = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Observation", key: {"coding": items}}}],
    }
    for sensitive in (None, ONE):
        findings = _walk(doc, sensitive)
        if findings:
            assert not _clean_at_a_glance(doc, _Scanner(sensitive))
        assert scan(doc, sensitive) == findings


def test_an_11_proef_snomed_code_no_longer_forces_the_walk() -> None:
    coding = {"system": "http://snomed.info/sct", "code": "111222333", "display": "Something"}
    doc = {"resourceType": "Observation", "code": {"coding": [coding]}}
    assert _clean_at_a_glance(doc, _Scanner(ONE)) and scan(doc, ONE) == []
    doc["note"] = [{"text": 'line 1\nline "2"'}]  # JSON escapes elsewhere in the document
    assert _clean_at_a_glance(doc, _Scanner(ONE)) and scan(doc, ONE) == []
    # the same digits anywhere else are still a BSN
    for other in ({**coding, "system": "http://example.org/local"}, {**coding, "display": "111222333"}):
        doc = {"resourceType": "Observation", "code": {"coding": [other]}}
        assert [f.kind for f in scan(doc, ONE)] == ["bsn"]


@settings(max_examples=600, deadline=None)
@given(strings, KEYS, st.sampled_from([None, ONE, MANY, RELATIVE]))
def test_needs_check_never_skips_a_string_the_exact_check_reports(
    s: str, key: str, sensitive: SensitiveSet | None
) -> None:
    scanner = _Scanner(sensitive)
    scanner.text(s, key, {}, ["Bundle"])  # the exact checks, as the walk runs them on a string it checks
    if scanner.findings:
        assert _Scanner(sensitive).needs_check(s)


def test_a_relative_patient_fullurl_is_found_glued_or_whole() -> None:
    for text in ("Patient/q5", "zie xPatient/q5.", "Patient/q5/_history/1"):
        doc = {"resourceType": "Observation", "note": [{"text": text}]}
        assert scan(doc, RELATIVE), text
        assert not _clean_at_a_glance(doc, _Scanner(RELATIVE)), text
    assert scan({"resourceType": "Observation", "note": [{"text": "Patient/x5"}]}, RELATIVE) == []


def test_many_patients_use_the_token_lookup_not_the_alternation() -> None:
    assert _Scanner(MANY).many and not _Scanner(ONE).many and not _Scanner(None).many
    scanner = _Scanner(MANY)
    assert scanner.needs_check("see urn:uuid:00000000-0000-4000-8000-000000000005 here")
    assert scanner.needs_check("Patient/pat00005") and scanner.needs_check("ref p-8")
    assert not scanner.needs_check("nothing to see") and "quick" not in vars(scanner)


@pytest.mark.parametrize("patients", [1, 12], ids=["probes", "tokens"])
def test_a_walked_document_is_searched_only_for_the_glued_values_it_holds(patients: int) -> None:
    """A birth date at an event date sends the document to the walk (the glance does not know keys), which
    finds nothing there. The walk then looks in each string only for the glued values the document holds:
    none here, one below (this used to be every patient's names and postcodes, in every string)."""
    sensitive = sensitive_values(_input(patients))
    sensitive.add_birth_date("1934-04-28")
    birth = {"resourceType": "Encounter", "period": {"start": "1934-04-28"}}
    scanner = _Scanner(sensitive)
    assert sensitive.glued and not _clean_at_a_glance(birth, scanner)
    assert scanner.glued == () and scan(birth, sensitive) == []
    glued = {**birth, "note": [{"text": "seen by dr PompJohanna"}]}
    scanner = _Scanner(sensitive)
    assert not _clean_at_a_glance(glued, scanner)
    assert scanner.glued == (("johanna", "name"),)
    assert [f.kind for f in scan(glued, sensitive)] == ["name"]


def _dated(patients: int) -> SensitiveSet:
    bundle = _input(patients)
    for n, entry in enumerate(bundle["entry"]):
        entry["resource"]["birthDate"] = f"19{34 + n}-04-{10 + n}"
    return sensitive_values(bundle)


DATED_ONE, DATED_MANY = _dated(1), _dated(12)
date_pieces = st.sampled_from(
    ["1934-04-10", "10-04-1934", "10 april 1934", "1934", "april", "10", "1945-04-21", "21/4/45", "x", " "]
)
DATE_KEYS = st.sampled_from(
    ["effectiveDateTime", "start", "valueDateTime", "text", "birthDate", "recordedDate", "display"]
)
dated_leaves = st.lists(date_pieces, max_size=4).map("".join)
dated_values = st.recursive(
    dated_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(DATE_KEYS, inner, max_size=3),
    max_leaves=8,
)
dated_resources = st.builds(
    lambda rtype, body: {"resourceType": rtype, **body},
    st.sampled_from(["Observation", "Patient", "Encounter"]),
    st.dictionaries(DATE_KEYS, dated_values, max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.fixed_dictionaries({"resource": dated_resources}), min_size=1, max_size=5),
    st.dictionaries(st.sampled_from(["text", "timestamp"]), dated_leaves, max_size=1),
    st.sampled_from([DATED_ONE, DATED_MANY]),
)
def test_a_birth_date_walks_only_its_entries_and_finds_what_the_whole_walk_finds(
    entries: list[Any], own: dict[str, Any], sensitive: SensitiveSet
) -> None:
    """A birth date is the only suspicion in most walked groups (a clinical date equal to some patient's
    birth date): only the entries, or the Bundle's own elements, whose text holds one are walked. What is
    reported, and where, must be exactly what the walk of the whole Bundle reports."""
    doc = {"resourceType": "Bundle", "type": "collection", **own, "entry": entries}
    assert scan(doc, sensitive) == _walk(doc, sensitive)


def test_a_birth_date_at_an_event_date_is_not_reported_and_one_in_a_note_is_by_its_entry() -> None:
    event = {"resource": {"resourceType": "Observation", "effectiveDateTime": "1934-04-10"}}
    note = {"resource": {"resourceType": "Observation", "note": [{"text": "born 10-04-1934"}]}}
    doc = {"resourceType": "Bundle", "type": "collection", "entry": [event, note, event]}
    scanner = _Scanner(DATED_MANY)
    assert not _clean_at_a_glance(folded(doc, None)[0], scanner) and scanner.only_birth_dates
    assert [(f.path, f.kind) for f in scan(doc, DATED_MANY)] == [
        ("Bundle.entry[1].resource.note[0].text", "birth-date")
    ]
    only_events = {**doc, "entry": [event, event]}
    assert scan(only_events, DATED_MANY) == [] == _walk(only_events, DATED_MANY)


def test_an_entry_list_outside_a_bundle_is_walked_whole() -> None:
    """A re-probe: a hand-made Patient with an `entry` list had only its entries walked, outside the Patient,
    where a date is an event's; the whole walk reports the birth date."""
    doc = {"resourceType": "Patient", "entry": [{"effectiveDateTime": "1934-04-10"}]}
    assert [f.kind for f in scan(doc, DATED_ONE)] == ["birth-date"] == [f.kind for f in _walk(doc, DATED_ONE)]
