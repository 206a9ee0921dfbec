"""Leak scan: BSN 11-proef, whole-token matching, thresholds against false positives, no values shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from gateway.deid import scan, sensitive_values
from gateway.deid.commands import app
from gateway.deid.leakscan import bsn_valid
from tests.test_deid_support import DUTCH, KEY_A, PROVENANCE, dutch_bundle, fake_pseudonyms, load, plan_for

PATIENT = load(DUTCH / "nl-core-Patient-alt-1.json")
CONTACT = load(DUTCH / "nl-core-ContactPerson-alt-1.json")


def source() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "http://example.org/fhir/Patient/nl-core-Patient-alt-1", "resource": PATIENT},
            {"resource": CONTACT},
        ],
    }


def out_with(**obs: Any) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {"resourceType": "Observation", "status": "final", **obs}}],
    }


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("111222333", True),
        ("999911120", True),
        ("999908881", True),
        ("123456789", False),
        ("111222334", False),
        ("000000000", False),
    ],
)
def test_bsn_11_proef(digits: str, valid: bool) -> None:
    assert bsn_valid(digits) is valid


def test_bsn_anywhere_in_strings_is_found_by_path_not_value() -> None:
    findings = scan(out_with(note=[{"text": "Pat. met BSN 111222333 gebeld"}]))
    assert [(f.path, f.kind) for f in findings] == [("Bundle.entry[0].resource.note[0].text", "bsn")]
    assert "111222333" not in repr(findings)


def test_bsn_like_numbers_inside_codes_and_longer_numbers_are_not_flagged() -> None:
    out = out_with(
        code={"coding": [{"system": "http://snomed.info/sct", "code": "111222333"}]},
        valueString="order 1112223334 and id abc111222333x",
    )
    assert scan(out) == []


def test_bsn_as_json_number_is_flagged() -> None:
    assert [f.kind for f in scan(out_with(valueInteger=111222333))] == ["bsn"]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Gesprek met Johanna van Putten", "name"),
        ("bel 0031688228822 na 17u", "telecom"),
        ("mail giesput@myweb.nl", "telecom"),
        ("woont aan 1e Jacob van Campenstr by 15 B bis", "address"),
        ("postcode 1012NX", "postcode"),
        ("postcode 1012 nx", "postcode"),
        ("http://example.org/fhir/Patient/nl-core-Patient-alt-1", "patient-fullUrl"),
    ],
)
def test_values_of_the_input_are_found(text: str, kind: str) -> None:
    findings = scan(out_with(valueString=text), sensitive_values(source()))
    assert kind in {f.kind for f in findings}, findings


@pytest.mark.parametrize(
    "text",
    [
        "M",
        "NL",
        "1",
        "15",
        "van",
        "de heer",
        "Januari",
        "Peterselie",
        "Jansens",
        "1012",
        "value 0031688228822123",
    ],
)
def test_short_values_and_partial_tokens_are_not_findings(text: str) -> None:
    assert scan(out_with(valueString=text), sensitive_values(source())) == []


def test_patient_id_in_a_reference_is_found() -> None:
    out = out_with(subject={"reference": "Patient/nl-core-Patient-alt-1"})
    assert "patient-id" in {f.kind for f in scan(out, sensitive_values(source()))}


def test_deidentified_dutch_bundle_is_clean_but_the_input_is_not() -> None:
    bundle = dutch_bundle()
    sensitive = sensitive_values(bundle)
    assert len(sensitive) > 10
    assert scan(bundle, sensitive)  # the raw input is full of findings
    out = (
        __import__("gateway.deid", fromlist=["deidentify"])
        .deidentify(
            bundle,
            plan_for("example-generic"),
            id_key=KEY_A,
            pseudonyms=fake_pseudonyms(bundle),
            provenance=PROVENANCE,
        )
        .bundle
    )
    assert scan(out, sensitive_values(bundle, practitioner_kept=("identifier",))) == []


def test_scan_never_raises_on_odd_json() -> None:
    for doc in (None, 1, "x", [], {"a": [None, {"b": 111222333}]}, {"resourceType": 5}):
        scan(doc, sensitive_values(doc))


def test_cli_scan_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    clean = tmp_path / "clean.json"
    clean.write_bytes(orjson.dumps(out_with(valueString="niets")))
    leak = tmp_path / "leak.json"
    leak.write_bytes(orjson.dumps(out_with(valueString="BSN 111222333")))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    original = tmp_path / "original.json"
    original.write_bytes(orjson.dumps(source()))
    assert runner.invoke(app, ["scan", str(clean)]).exit_code == 0
    result = runner.invoke(app, ["scan", str(clean), str(leak)])
    assert result.exit_code == 1 and "bsn" in result.output and "111222333" not in result.output
    assert runner.invoke(app, ["scan", str(broken)]).exit_code == 2
    named = tmp_path / "named.json"
    named.write_bytes(orjson.dumps(out_with(valueString="Johanna van Putten")))
    assert runner.invoke(app, ["scan", "--original", str(original), str(named)]).exit_code == 1
    assert runner.invoke(app, ["scan", "--original", str(original), str(clean)]).exit_code == 0


def test_paths_never_carry_odd_keys() -> None:
    findings = scan({"resourceType": "Bundle", "Jansen 111222333": "111222333"})
    assert [f.path for f in findings] == ["Bundle.(key)"]


@pytest.mark.parametrize(
    "text", ["regel 1\n111222333", "tab\t111222333\tx", 'quote"111222333"', "bel\x07111222333"]
)
def test_values_after_json_escapes_are_found(text: str) -> None:
    assert [f.kind for f in scan(out_with(valueString=text))] == ["bsn"]
    named = scan(out_with(valueString=text.replace("111222333", "Johanna")), sensitive_values(source()))
    assert [f.kind for f in named] == ["name"]
