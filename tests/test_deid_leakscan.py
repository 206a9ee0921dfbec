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
from tests.test_deid_support import (
    CORPUS,
    DUTCH,
    KEY_A,
    PROVENANCE,
    dutch_bundle,
    fake_pseudonyms,
    load,
    plan_for,
)

PATIENT = load(DUTCH / "nl-core-Patient-alt-1.json")
CONTACT = load(DUTCH / "nl-core-ContactPerson-alt-1.json")
CORPUS_SYNTHEA = CORPUS / "synthea" / "smart-generated-sample-data-r4"


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


@pytest.mark.parametrize(
    ("extension", "text", "kind"),
    [
        ({"url": "patient-mothersMaidenName", "valueString": "Kwikkelstein"}, "Moeder: Kwikkelstein", "name"),
        (
            {"url": "patient-birthPlace", "valueAddress": {"line": ["Kroonkruidstraat 77"]}},
            "geboren Kroonkruidstraat 77",
            "address",
        ),
    ],
)
def test_a_patients_mothers_maiden_name_and_birth_place_are_sought(
    extension: dict, text: str, kind: str
) -> None:
    """A probe: the mother's maiden name (on every Synthea patient) is removed with the Patient's extension,
    but a local code's display "Moeder: Kwikkelstein" went out: the gate did not look for it."""
    extension = {**extension, "url": "http://hl7.org/fhir/StructureDefinition/" + extension["url"]}
    patient = {**PATIENT, "extension": [*PATIENT.get("extension", []), extension]}
    original = {**source(), "entry": [{"fullUrl": "http://ehr.example/Patient/p1", "resource": patient}]}
    code = {"coding": [{"system": "http://ehr.example/codes", "code": "x", "display": text}]}
    assert kind in {f.kind for f in scan(out_with(code=code), sensitive_values(original))}


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
    # NDJSON with one bad line: the others are still scanned (a probe: the whole file was "unreadable")
    mixed = tmp_path / "mixed.ndjson"
    lines = [orjson.dumps(out_with(valueString="BSN 111222333")), b"{broken", orjson.dumps(out_with())]
    mixed.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["scan", str(mixed)])
    assert result.exit_code == 2 and "line 2: unreadable" in result.output and "bsn" in result.output


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


# ── what a privacy probe got past the gate (2026-11-24), now found ──────────────────────────────────────────


@pytest.mark.parametrize(
    "obs",
    [
        {"valueQuantity": {"value": 111222333.0}},  # a BSN sent as a decimal
        {"code": {"coding": [{"system": "http://example.org/local", "display": "BSN 1112.22.333"}]}},
        {"valueString": "bsn 111 222 333"},
        {"valueString": "bsn: 111-222-333."},
        {"valueString": "bsn111222333"},  # glued to a word (a second probe)
        {"code": {"coding": [{"system": "http://example.org/local", "code": "NL111222333"}]}},
        {"valueString": "bsn 111/222/333"},  # and, from a third probe, slashes, underscores, pairs
        {"valueString": "111_222_333"},
        {"valueString": "11 12 22 333"},
    ],
)
def test_a_bsn_as_a_decimal_or_written_with_separators_is_found(obs: dict[str, Any]) -> None:
    assert "bsn" in {f.kind for f in scan(out_with(**obs))}
    assert "bsn" in {f.kind for f in scan(out_with(**obs), sensitive_values(source()))}


@pytest.mark.parametrize(
    "text",
    [
        "1112.22.334",
        "111 222 3334",
        "2026-11-24 10.15.000",
        "1.112.22.333",
        "111.222.333.4",
        "urn:uuid:6363bb1c-0fb1-8194-91f5-abc111222333",  # hex letters before the digits: an opaque id
        "bsn111222333x",
    ],
)
def test_numbers_that_only_look_like_a_written_bsn_are_not(text: str) -> None:
    assert scan(out_with(valueString=text)) == []


@pytest.mark.parametrize("text", ["06-8822 8822", "+31 6 88228822", "+31 (0)6 88 22 88 22", "0688.228.822"])
def test_the_patients_phone_number_in_another_notation_is_found(text: str) -> None:
    out = out_with(device={"display": "x"}, valueString=f"terugbellen op {text}")
    assert "telecom" in {f.kind for f in scan(out, sensitive_values(source()))}


def test_other_numbers_near_the_patients_phone_digits_are_not_taken_for_it() -> None:
    out = out_with(valueString="lot 688228822-7, 2026-01-03", effectiveDateTime="2026-01-03T10:00:00+01:00")
    assert scan(out, sensitive_values(source())) == []


@pytest.mark.parametrize(
    ("obs", "found"),
    [
        ({"valueDateTime": "1934-04-28"}, True),  # an Observation whose value is the birth date
        ({"valueString": "geboren 1934-04-28"}, True),
        ({"component": [{"valueQuantity": {"value": 1, "unit": "1934-04-28"}}]}, True),
        ({"effectiveDateTime": "1934-04-28"}, False),  # an event on the day of birth (a newborn)
        ({"issued": "1934-04-28T10:00:00Z", "effectivePeriod": {"start": "1934-04-28"}}, False),
    ],
)
def test_the_full_birth_date_outside_event_dates_is_found_when_the_profile_generalises_it(
    obs: dict[str, Any], found: bool
) -> None:
    kinds = {f.kind for f in scan(out_with(**obs), sensitive_values(source()))}
    assert ("birth-date" in kinds) is found
    assert "birth-date" not in {
        f.kind for f in scan(out_with(**obs), sensitive_values(source(), birth_dates=False))
    }


HOME = {"line": ["Canarystraat 42"], "city": "Kanariestad", "postalCode": "9999 ZZ"}


def _with_public(rtype: str, address: dict[str, Any]) -> dict[str, Any]:
    bundle = source()
    bundle["entry"][0]["resource"] = {**PATIENT, "address": [HOME]}
    bundle["entry"].append({"resource": {"resourceType": rtype, "name": "x", "address": address}})
    return bundle


def _delivering(rtype: str, address: dict[str, Any]) -> dict[str, Any]:
    out = out_with(valueString="x")
    out["entry"].append({"resource": {"resourceType": rtype, "address": address}})
    return out


@pytest.mark.parametrize("rtype", ["Location", "Organization"])
def test_the_patients_street_address_on_a_location_or_organization_is_still_a_leak(rtype: str) -> None:
    """A home visit: the Encounter's Location is the patient's home; delivering its address is a leak."""
    bundle = _with_public(rtype, dict(HOME))
    assert "address" in {f.kind for f in scan(_delivering(rtype, dict(HOME)), sensitive_values(bundle))}


def test_a_hospital_in_the_patients_area_is_not_a_leak() -> None:
    hospital = {"line": ["Ziekenhuisplein 1"], "postalCode": "9999 AB", "city": HOME["city"]}
    bundle = _with_public("Organization", hospital)
    assert scan(_delivering("Organization", hospital), sensitive_values(bundle)) == []


@pytest.mark.parametrize(
    "place",
    [
        {"line": ["Ziekenhuisplein 1"], "postalCode": "9999-zz"},  # the full postcode: at the patient's home
        {"line": ["Canarystr. 42"], "city": "kanariestad"},  # no postcode: the house number in that city
        {"use": "home", "line": ["Elders 7"], "postalCode": "1234 AB"},  # someone's home, a person's data
        {"line": ["Canarystr. 42"], "postalCode": "9999"},  # the number, with four digits of the postcode
        {"line": ["Canarystr. 42"], "postalCode": "9999 ZY"},  # ... with a mistyped postcode
        {"line": ["Canarystr. 42"], "city": "Kanariest."},  # ... with a street that begins alike
        {"text": "Canarystraat 42, elders"},  # an address as text only
    ],
    ids=["postcode", "number-in-city", "use-home", "pc4", "typo", "street", "text"],
)
def test_a_place_at_a_patients_home_publishes_nothing(place: dict[str, Any]) -> None:
    """Found by a fresh-eyes probe: a home visit's Location written differently from the Patient's address
    ("Tweede Jan Steenstraat 15" for "2e Jan Steenstraat 15", "1015-CJ") counted as a public place, and its
    postcode and phone came off the watch list. Such a place is now the patient's home, for the engine
    (generalised as Patient.address) and the gate (nothing of it is public)."""
    bundle = _with_public("Location", {**place, "telecom": [{"system": "phone", "value": "0612345678"}]})
    bundle["entry"][0]["resource"]["telecom"] = [{"system": "phone", "value": "06-12345678"}]
    out = _delivering("Location", {"postalCode": HOME["postalCode"]})
    out["entry"][-1]["resource"]["telecom"] = [{"system": "phone", "value": "0612345678"}]
    assert {f.kind for f in scan(out, sensitive_values(bundle))} == {"postcode", "telecom"}


def test_an_organizations_contact_person_is_not_public() -> None:
    """An Organization's contact is a person: their name and phone (here the patient's own) stay sensitive."""
    bundle = _with_public("Organization", {"line": ["Ziekenhuisplein 1"], "postalCode": "1000 AA"})
    org = bundle["entry"][-1]["resource"]
    phone = {"system": "phone", "value": "0612345678"}
    org["contact"] = [{"name": {"family": "Berkhout"}, "telecom": [phone]}]
    bundle["entry"][0]["resource"]["telecom"] = [{"system": "phone", "value": "0612345678"}]
    out = out_with(valueString="x")
    out["entry"].append({"resource": {"resourceType": "Location", "name": "Kamer tel 0612345678"}})
    assert "telecom" in {f.kind for f in scan(out, sensitive_values(bundle))}


@pytest.mark.parametrize(
    ("family", "written"),
    [
        ("van der Berkhout", "Woning fam. Berkhout"),
        ("de Boer-Smit", "mevr. Smit"),
        ("Jansen-van Dijk", "Dijk"),
    ],
)
def test_a_surname_is_sought_without_its_voorvoegsels_and_per_part(family: str, written: str) -> None:
    bundle = source()
    bundle["entry"][0]["resource"] = {**PATIENT, "name": [{"family": family, "given": ["Hendrikus"]}]}
    assert "name" in {f.kind for f in scan(out_with(valueString=written), sensitive_values(bundle))}


def test_a_birth_date_inside_a_value_period_is_a_value_not_an_event() -> None:
    """valuePeriod.start is not when something happened (LOINC 21112-8 "Birth date" as a Period)."""
    birth = PATIENT.get("birthDate")
    assert birth
    sensitive = sensitive_values(source())
    kinds = {f.kind for f in scan(out_with(valuePeriod={"start": birth, "end": birth}), sensitive)}
    assert "birth-date" in kinds
    assert scan(out_with(effectivePeriod={"start": birth}, valueString="x"), sensitive) == []


def test_fhir_gateway_scan_finds_a_raw_export_without_the_original_and_passes_our_output(
    tmp_path: Path,
) -> None:
    """`fhir-gateway scan` (the top-level command) with no --original used to find BSNs only: a raw Synthea
    bundle full of names, phone numbers and addresses came out 'clean'."""
    from gateway.cli import app as gateway_app

    raw = tmp_path / "export.json"  # the corpus file's own name holds the patient's name
    raw.write_bytes((CORPUS_SYNTHEA / "Buster_Hoeger_ad2e3fc5-2b5d-4cb9-8d03-9ea0f4ac8423.json").read_bytes())
    runner = CliRunner()
    result = runner.invoke(gateway_app, ["scan", str(raw)])
    assert result.exit_code == 1, result.output
    kinds = {line.rsplit(": ", 1)[-1] for line in result.output.splitlines() if ": " in line}
    assert {"name", "telecom", "address", "identifier"} <= kinds
    assert "Hoeger" not in result.output
    bundle = load(raw)
    out = tmp_path / "out.json"
    deid = __import__("gateway.deid", fromlist=["deidentify"]).deidentify(
        bundle,
        plan_for("example-generic"),
        id_key=KEY_A,
        pseudonyms=fake_pseudonyms(bundle),
        provenance=PROVENANCE,
    )
    out.write_bytes(orjson.dumps(deid.bundle))
    checked = runner.invoke(gateway_app, ["scan", "--original", str(raw), str(out)])
    assert checked.exit_code == 0, checked.output
    # a profile that keeps professionals' identifiers: without --registry they would be reported
    nl_core = tmp_path / "nl-core.json"
    dutch = dutch_bundle()
    practitioner = {"reference": "Practitioner/nl-core-HealthProfessional-Practitioner-alt-1"}
    for entry in dutch["entry"]:  # the examples' Practitioner is otherwise referred to by nothing delivered
        if entry["resource"]["resourceType"] == "Observation":
            entry["resource"]["performer"] = [practitioner]
    nl_core.write_bytes(orjson.dumps(dutch))
    deid = __import__("gateway.deid", fromlist=["deidentify"]).deidentify(
        dutch,
        plan_for("example-generic"),
        id_key=KEY_A,
        pseudonyms=fake_pseudonyms(dutch),
        provenance=PROVENANCE,
    )
    out.write_bytes(orjson.dumps(deid.bundle))
    args = ["scan", "--original", str(nl_core), str(out)]
    assert runner.invoke(gateway_app, args).exit_code == 1
    assert runner.invoke(gateway_app, [*args, "--registry", "example-generic"]).exit_code == 0


@pytest.mark.parametrize(
    "text",
    [
        "geb. 28-04-1934",
        "geb 28-4-1934",
        "28.04.1934",
        "28/04/1934",
        "April 28, 1934",
        "geb. 28 april 1934",
        "28 apr 1934",
        "19340428",
    ],
)
def test_the_birth_date_as_people_write_it_is_found(text: str) -> None:
    """A second probe: only 1934-04-28 itself was found; Dutch records write 28-04-1934."""
    assert "birth-date" in {f.kind for f in scan(out_with(valueString=text), sensitive_values(source()))}


def test_inside_the_patient_the_birth_date_is_a_leak_in_any_element() -> None:
    """A nationality 'since birth' (an extension's period.start) carried the full date past the gate."""
    patient = {
        "resourceType": "Patient",
        "birthDate": "1934-04",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-nationality",
                "extension": [{"url": "period", "valuePeriod": {"start": "1934-04-28"}}],
            }
        ],
    }
    out = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient}]}
    assert "birth-date" in {f.kind for f in scan(out, sensitive_values(source()))}
    assert scan(out_with(effectivePeriod={"start": "1934-04-28"}), sensitive_values(source())) == []


@pytest.mark.parametrize("text", ["PeterJansen", "vanPutten", "PeterJanJansen"])
def test_a_name_run_together_is_found(text: str) -> None:
    """A second probe got names and patient numbers through by leaving out the spaces."""
    assert "name" in {f.kind for f in scan(out_with(valueString=text), sensitive_values(source()))}


def test_a_patient_number_run_together_is_found() -> None:
    bundle = source()
    bundle["entry"][0]["resource"] = {
        **PATIENT,
        "identifier": [{"system": "urn:x", "value": "MRN-CANARY-77"}],
    }
    assert "identifier" in {
        f.kind for f in scan(out_with(valueString="MRNCANARY77"), sensitive_values(bundle))
    }


def test_a_pseudonym_or_opaque_id_that_happens_to_hold_a_name_is_not_a_finding() -> None:
    """A bulk run of 10,000 patients refused one: a random token of a TTP pseudonym ('v1.x-Jan-y') equalled
    a given name. Pseudonyms and our opaque ids are ciphertext and keyed hashes, not input values."""
    pseudonym = {
        "type": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}
            ]
        },
        "system": "urn:nlps1:example-generic:GG",
        "value": "v1.q83Jx-Peter-AbC9_Zz",
    }
    out = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0beadbee-1234-8abc-9def-00000000abbe",
                "resource": {
                    "resourceType": "Patient",
                    "id": "0beadbee-1234-8abc-9def-00000000abbe",
                    "identifier": [pseudonym],
                },
            },
        ],
    }
    assert scan(out, sensitive_values(source())) == []
    out["entry"][0]["resource"]["identifier"][0]["type"]["coding"][0]["code"] = "MR"  # not ours: a leak
    assert "name" in {f.kind for f in scan(out, sensitive_values(source()))}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("PompJansen", "name"),  # run on at a change of case: the probe's "PompZyxwortel"
        ("dm2Johanna", "name"),
        ("JohannaPomp", "name"),
        ("pc1012NX", "postcode"),  # a postcode run into anything
        ("1012nxb", "postcode"),
    ],
)
def test_a_name_or_postcode_run_into_another_word_is_found(text: str, kind: str) -> None:
    sensitive = sensitive_values(source())
    found = scan(out_with(valueString=text), sensitive)
    assert [f.kind for f in found] == [kind]
    assert found[0].path.endswith(".valueString")


@pytest.mark.parametrize("text", ["Johannastraat", "Jansens", "JANSENPOMP", "Petersburg"])
def test_a_word_that_only_contains_a_name_is_not_a_finding(text: str) -> None:
    """A street named after someone, another surname, capitals throughout: no change of case marks a name."""
    assert scan(out_with(valueString=text), sensitive_values(source())) == []


def test_a_name_that_is_a_word_of_fhir_is_not_sought_inside_words() -> None:
    """A patient named "Value" must not make every `valueQuantity`-like text a leak; "Value" alone is one."""
    bundle = source()
    bundle["entry"][0]["resource"] = {**PATIENT, "name": [{"family": "Value", "given": ["Quantity"]}]}
    sensitive = sensitive_values(bundle)
    assert {value for value, _ in sensitive.glued}.isdisjoint({"value", "quantity"})
    assert scan(out_with(valueString="SampledValueQuantity"), sensitive) == []
    assert [f.kind for f in scan(out_with(valueString="Value"), sensitive)] == ["name"]


@pytest.mark.parametrize(
    ("written", "kind"),
    [
        ("BSN ９９９９１１１２０", "bsn"),  # fullwidth digits
        ("BSN ٩٩٩٩١١١٢٠", "bsn"),  # Arabic-Indic digits
        ("BSN 9999\u200b11120", "bsn"),  # a zero-width space
        ("dhr. Berk\u00adhout", "name"),  # a soft hyphen
        ("dhr. B\u0435rkhout", "name"),  # a Cyrillic e
        ("dhr. Berkho\u0308ut", "name"),  # a combining diaeresis
        ("dhr. \uff22\uff45\uff52\uff4b\uff48\uff4f\uff55\uff54", "name"),  # fullwidth letters
    ],
)
def test_a_value_written_in_other_characters_that_read_the_same_is_found(written: str, kind: str) -> None:
    """A fresh-eyes probe got these past the gate in a kept Coding.display: the gate compares folded text
    (gateway/deid/fold.py), the input's values and the output alike."""
    bundle = source()
    bundle["entry"][0]["resource"] = {**PATIENT, "name": [{"family": "Berkhout", "given": ["Hendrikus"]}]}
    coding = {"system": "http://example.org/local", "code": "x", "display": written}
    out = out_with(code={"coding": [coding]})
    assert kind in {f.kind for f in scan(out, sensitive_values(bundle))}
    if kind == "bsn":
        assert "bsn" in {f.kind for f in scan(out)}  # at the registry too, with nothing to compare


def test_folding_keeps_json_structure_and_ascii_untouched() -> None:
    from gateway.deid.fold import fold, fold_document

    assert fold("Zoë Jansen-Smit") == "Zoe Jansen-Smit" and fold("plain") == "plain"
    assert fold("a\uff02b\uff3cc") == "a b c"  # what would fold to a JSON delimiter is a space
    doc = {"resourceType": "Observation", "note": [{"text": "a\uff02b\uff3cc ９"}]}
    folded, raw = fold_document(orjson.dumps(doc))
    assert folded["note"][0]["text"] == "a b c 9" and orjson.loads(raw) == folded
    assert fold_document(b'{"a":"ascii"}') is None
    # keys that fold alike would hide one another (a review found a BSN gone this way): not passed
    note = {"text": "bsn 999911120", "\uff54\uff45\uff58\uff54": "ok"}
    twin = {"resourceType": "Observation", "note": [note]}
    assert [f.kind for f in scan(twin)] == ["folded-keys"]


# ── a second privacy probe (2026-11-24): what got past the gate, and what it wrongly stopped ───────────────

SNOMED = "http://snomed.info/sct"


def _patient_bundle(**changes: Any) -> dict[str, Any]:
    bundle = source()
    bundle["entry"][0]["resource"] = {**PATIENT, **changes}
    return bundle


@pytest.mark.parametrize(
    "written",
    [
        "tel 06\u20138822\u20138822",  # en dashes
        "tel 06\u22128822 8822",  # a minus sign
        "BSN 111,222,333",
        "BSN 111:222:333",
        "BSN 1112.22 333",  # mixed separators
        "geboren 28th April 1934",
        "geboren 28e april 1934",
        "geboren 28.IV.1934",
        "geb. 280434",  # a two-digit year, as one token
        "geb. 28/04/34",  # ... and day first with separators
        "geb. 28-4-'34",
        "geb. 28 apr. 34",
    ],
)
def test_values_written_with_other_separators_ordinals_or_roman_months_are_found(written: str) -> None:
    assert scan(out_with(valueString=written), sensitive_values(source()))


@pytest.mark.parametrize(
    "written", ["geboren 28th April 34", "geboren 28e april '34", "geb28-04-34", "28-04-34e", "28ste apr. 34"]
)
def test_a_two_digit_year_birth_date_whose_day_is_no_token_of_its_own_is_found_in_a_big_bundle(
    written: str,
) -> None:
    """A review: with more than a few patients the glance looks values up in the document's token set, and
    took a two-digit-year date to be absent unless its day and year were tokens of their own ("28th" is
    one token): the gate passed it, though the walk finds it."""
    bundle = source()
    for n in range(30):  # others, so that the glance tokenises the document
        other = {"resourceType": "Patient", "id": f"o{n}", "name": [{"family": f"Qqfam{n}x"}]}
        bundle["entry"].append({"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}", "resource": other})
    sensitive = sensitive_values(bundle)
    assert len(sensitive.by_first) > 24  # the tokenised glance (_PROBE_LIMIT)
    assert {f.kind for f in scan(out_with(valueString=written), sensitive)} == {"birth-date"}


@pytest.mark.parametrize("written", ["lab 28 04 341", "datum 28/04/2034", "128-04-34", "nr 28-04-35"])
def test_numbers_near_a_two_digit_year_birth_date_are_not_it(written: str) -> None:
    assert scan(out_with(valueString=written), sensitive_values(source())) == []


@pytest.mark.parametrize(
    ("mrn", "written"),
    [("7654321", "nr 765-4321"), ("7654321", "nr 7.654.321"), ("MRN-CANARY-4711", "ref CANARY/4711")],
)
def test_an_identifier_grouped_otherwise_or_without_its_prefix_is_found(mrn: str, written: str) -> None:
    identifier = {"system": "http://ehr.example.nl/mrn", "value": mrn}
    sensitive = sensitive_values(_patient_bundle(identifier=[identifier]))
    assert {f.kind for f in scan(out_with(valueString=written), sensitive)} == {"identifier"}


def test_a_digit_identifier_is_found_without_its_leading_zeros_also_as_a_number() -> None:
    mrn = {"system": "http://ehr.example.nl/mrn", "value": "0012345678"}
    sensitive = sensitive_values(_patient_bundle(identifier=[mrn]))
    assert {f.kind for f in scan(out_with(valueString="nr 12345678"), sensitive)} == {"identifier"}
    assert {f.kind for f in scan(out_with(valueInteger=12345678), sensitive)} == {"identifier"}


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ({"family": "d'Ancona"}, "dhr. Ancona"),
        ({"family": "Jansen\u2013Bakker"}, "mevr. Bakker"),
        ({"text": "Hendrikus Smulders"}, "dhr. Smulders"),
        ({"family": "Smulders", "given": ["Hendrikus Johannes"]}, "Johannes"),
    ],
)
def test_parts_of_names_people_write_alone_are_found(name: dict[str, Any], written: str) -> None:
    sensitive = sensitive_values(_patient_bundle(name=[name]))
    assert "name" in {f.kind for f in scan(out_with(valueString=written), sensitive)}


def test_an_identifier_labelled_pseudonymised_outside_a_patient_is_checked() -> None:
    from gateway.deid.leakscan import PSEUDED_SYSTEM

    pseudonym_type = {"coding": [{"system": PSEUDED_SYSTEM, "code": "PSEUDED"}]}
    org = {"resourceType": "Organization", "identifier": [{"type": pseudonym_type, "value": "111222333 x"}]}
    out = out_with(valueString="x")
    out["entry"].append({"resource": org})
    assert "bsn" in {f.kind for f in scan(out, sensitive_values(source()))}


def test_what_the_second_probe_found_wrongly_blocked_is_delivered() -> None:
    # a name part that is a word of a delivered place's name or city
    bundle = _patient_bundle(name=[{"family": "van Delft", "given": ["Iris"]}])
    hospital = {"resourceType": "Organization", "name": "UMC Delft", "address": [{"city": "Delft"}]}
    bundle["entry"].append({"resource": hospital})
    out = out_with(valueString="x")
    out["entry"].append({"resource": hospital})
    # a terminology's display is its term
    iris = {"system": SNOMED, "code": "1", "display": "Iris structure"}
    out["entry"][0]["resource"]["bodySite"] = {"coding": [iris]}
    # an organisation's RSIN passes the 11-proef
    out["entry"].append(
        {"resource": {"resourceType": "Organization", "identifier": [
            {"system": "http://fhir.nl/fhir/NamingSystem/rsin", "value": "815376005"}]}}
    )
    assert scan(out, sensitive_values(bundle)) == []
    # the whole name, and the same words in free text, are still found
    sensitive = sensitive_values(bundle)
    assert {f.kind for f in scan(out_with(valueString="mevr. van Delft"), sensitive)} == {"name"}
    assert {f.kind for f in scan(out_with(valueString="Iris"), sensitive)} == {"name"}
    # a place's name is not geography: a home visit's Location named after the family is a leak
    home = {"resourceType": "Location", "name": "Woning fam. van Delft"}  # the whole name: sensitive
    bundle["entry"].append({"resource": home})
    out["entry"].append({"resource": home})
    assert {f.kind for f in scan(out, sensitive_values(bundle))} == {"name"}


def test_a_name_with_sharp_s_run_into_another_word_is_found() -> None:
    """A review: the name was sought case-folded ("grossmann") in lower-cased text ("großmann")."""
    sensitive = sensitive_values(_patient_bundle(name=[{"family": "Großmann"}]))
    assert {f.kind for f in scan(out_with(valueString="PompGroßmann"), sensitive)} == {"name"}
    assert {f.kind for f in scan(out_with(valueString="PompGrossmann"), sensitive)} == {"name"}



def test_a_whole_name_in_a_terminology_display_is_found() -> None:
    """A re-probe: a display under LOINC or ISO 3166 was never searched for names, so "Maria Visser" typed
    into one reached the registry. A term's word that is a name part alone still passes."""
    bundle = _patient_bundle(name=[{"family": "van Delft", "given": ["Iris"]}])
    sensitive = sensitive_values(bundle)

    def with_display(display: str) -> dict:
        out = out_with(valueString="x")
        coding = {"system": SNOMED, "code": "1", "display": display}
        out["entry"][0]["resource"]["code"] = {"coding": [coding]}
        return out

    for display in ("Iris van Delft", "bij van Delft thuis gemeten"):
        assert {f.kind for f in scan(with_display(display), sensitive)} == {"name"}, display
    assert scan(with_display("Iris structure"), sensitive) == []


def test_a_name_by_its_nl_core_own_name_in_a_terminology_display_is_found_not_an_eponym() -> None:
    """A probe: "Klaasje Jansen" for an nl-core "van Jansen-Pietersen" whose own name is Jansen, typed into a
    LOINC display, reached the registry (only "Klaasje van Jansen-Pietersen" was sought there). Written
    surname first it is not sought there: eponyms are written so ("Hand-Schüller-Christian disease" for a
    patient Christian Schüller was a re-probe's false finding)."""
    ext = "http://hl7.org/fhir/StructureDefinition/humanname-"
    parts = [("own-prefix", "van"), ("own-name", "Jansen"), ("partner-name", "Pietersen")]
    nl_core = {
        "family": "van Jansen-Pietersen",
        "_family": {"extension": [{"url": ext + url, "valueString": value} for url, value in parts]},
    }

    def with_display(display: str) -> dict:
        out = out_with(valueString="x")
        coding = {"system": SNOMED, "code": "1", "display": display}
        out["entry"][0]["resource"]["code"] = {"coding": [coding]}
        return out

    sensitive = sensitive_values(_patient_bundle(name=[{**nl_core, "given": ["Klaasje"]}]))
    for display in ("Klaasje Jansen", "KLAASJE jansen", "Klaasje Pietersen", "Klaasje van Jansen"):
        assert {f.kind for f in scan(with_display(display), sensitive)} == {"name"}, display
    # A surname alone is sought there too, since a privacy probe found "Kwakkelsteen" delivered in a SNOMED
    # display; an eponym that is the patient's own surname then stops the Bundle (removing the display
    # instead told the registry the name was a word of the term: a re-probe). A given name alone is not.
    assert {f.kind for f in scan(with_display("Jansen test"), sensitive)} == {"name"}
    assert {f.kind for f in scan(with_display("JansenSyndrome"), sensitive)} == {"name"}
    assert scan(with_display("Klaasje test"), sensitive) == []
    eponym = sensitive_values(_patient_bundle(name=[{"family": "Schüller", "given": ["Christian"]}]))
    assert {f.kind for f in scan(with_display("Hand-Schüller-Christian disease"), eponym)} == {"name"}
    charcot = sensitive_values(_patient_bundle(name=[{"family": "Jansen-Charcot", "given": ["Marie"]}]))
    assert {f.kind for f in scan(with_display("Charcot-Marie-Tooth disease"), charcot)} == {"name"}
    # the voorvoegsels of a surname are not a name: "van der" in a display stops nothing; nor does a short
    # surname that is a word of Dutch terms ("de Groot": "groot"), from TERM_SURNAME_MIN letters on
    van_der = sensitive_values(_patient_bundle(name=[{"family": "van der Groot", "given": ["Kees"]}]))
    assert scan(with_display("Structure of van der Hoeve"), van_der) == []
    assert scan(with_display("groot hematoom"), van_der) == []


def _relative() -> dict[str, Any]:
    return {
        "resourceType": "RelatedPerson",
        "id": "rp",
        "patient": {"reference": "Patient/nl-core-Patient-alt-1"},
        "name": [{"family": "Vermeulenhof", "given": ["Gerrit"]}],
        "telecom": [{"system": "phone", "value": "0302345678"}],
        "address": [{"line": ["Dorpsweg 7"], "city": "De Bilt", "postalCode": "3731 CD"}],
    }


def test_the_values_of_a_contained_person_are_sought() -> None:
    """A probe: an Encounter's contained RelatedPerson was never sought (only a Bundle's own `contained`
    was read), so a Location named after the relative, at their street address, reached the registry."""
    bundle = source()
    visit = {"resourceType": "Encounter", "status": "finished", "contained": [_relative()]}
    bundle["entry"].append({"resource": visit})
    out = out_with(valueString="x")
    at_relative = {"name": "Woning Gerrit Vermeulenhof", "address": {"line": ["Dorpsweg 7"]}}
    out["entry"].append({"resource": {"resourceType": "Location", **at_relative}})
    assert {f.kind for f in scan(out, sensitive_values(bundle))} == {"name", "address"}
    bundle["entry"].pop()  # the finding came from the contained person's values, not from anywhere else
    assert scan(out, sensitive_values(bundle)) == []


def test_an_organizations_contact_persons_name_is_sought() -> None:
    """A probe: an Organization's contact is a person; their name in a delivered Location went through."""
    bundle = source()
    contact = {"name": {"family": "Zwanenburgh", "given": ["Hendrika"]}}
    bundle["entry"].append({"resource": {"resourceType": "Organization", "name": "x", "contact": [contact]}})
    out = out_with(valueString="x")
    out["entry"].append({"resource": {"resourceType": "Location", "name": "Kamer Hendrika Zwanenburgh"}})
    assert {f.kind for f in scan(out, sensitive_values(bundle))} == {"name"}


# ── a differential review of the glance against the walk (2026-11-25) ─────────────────────────────────────

_UUID_URL = "urn:uuid:6f1d2c3b-0a4e-4f5d-9c8b-7a6e5d4c3b2a"
_PHONE = {"telecom": [{"system": "phone", "value": "0688228822"}]}
_PHONE2 = {"telecom": [{"system": "phone", "value": "0612345678"}]}
_MRN7 = {"identifier": [{"system": "urn:mrn", "value": "7654321"}]}


def _one_patient(many: bool, **patient: Any) -> dict[str, Any]:
    """A Bundle of one Patient (and with ``many``, 30 others: the glance then tokenises the document)."""
    entries = [{"fullUrl": _UUID_URL, "resource": {"resourceType": "Patient", "id": "p1", **patient}}]
    for n in range(30 if many else 0):
        other = {"resourceType": "Patient", "id": f"o{n}", "name": [{"family": f"Qqfam{n}x"}]}
        entries.append({"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}", "resource": other})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _device_named(text: str, system: str | None = None) -> dict[str, Any]:
    device: dict[str, Any] = {"resourceType": "Device", "deviceName": [{"name": text, "type": "other"}]}
    if system is not None:
        device["type"] = {"coding": [{"system": system, "code": "1", "display": text}]}
        del device["deviceName"]
    return {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": device}]}


@pytest.mark.parametrize("many", [False, True], ids=["few", "many"])
@pytest.mark.parametrize(
    ("patient", "text", "system", "kind"),
    [
        # whole tokens however far apart, as the walk joins them
        ({"birthDate": "1934-04-28"}, "28 april" + " " * 40 + "1934", None, "birth-date"),
        ({"birthDate": "1934-04-28"}, "1934" + " " * 25 + "04-28", None, "birth-date"),
        ({"birthDate": "1934-04-28"}, "28t1" + "x" * 40 + " april 1934", None, "birth-date"),
        ({"address": [{"postalCode": "8011 AB"}]}, "8011" + " " * 520 + "AB", None, "postcode"),
        # a two-digit-year date that starts inside a match glued to a digit
        ({"birthDate": "1901-01-01"}, "501\t01 01 01", None, "birth-date"),
        ({"birthDate": "1901-01-01"}, "501 01 01 01", None, "birth-date"),
        # a phone beside other numbers; a six-digit identifier grouped; a postcode glued in a term's display
        (_PHONE, "Bed 3 06-88228822", None, "telecom"),
        (_PHONE, "tel 06-88228822 / 020-1234567", None, "telecom"),
        (_PHONE, "06 8822 8822 10x", None, "telecom"),
        (_MRN7, "MRN 765 4321 12-03-2024", None, "identifier"),
        (_PHONE2, "bed 3 0 6 1 2 3 4 5 6 7 8", None, "telecom"),
        ({}, f"ref {_UUID_URL[9:].upper()}", None, "patient-fullUrl"),
        # the uuid of the patient's urn:uuid fullUrl without its prefix
        ({}, f"ref {_UUID_URL[9:]}", None, "patient-fullUrl"),
    ],
)
def test_what_the_glance_or_the_walk_passed_is_found(
    many: bool, patient: dict, text: str, system: str | None, kind: str
) -> None:
    """A differential review: the glance said clean where the walk found these (long gaps, an overlapping
    two-digit-year date), or both passed what docs/deid.md says is sought."""
    sensitive = sensitive_values(_one_patient(many, **patient))
    assert kind in {f.kind for f in scan(_device_named(text, system), sensitive)}


def test_a_non_ascii_patient_fullurl_is_found_in_a_string_with_other_non_ascii_text() -> None:
    """A review: the walk's pre-filter sought literals in the case-folded string only, where "ß" is "ss"."""
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:x:Straße", "resource": {"resourceType": "Patient", "id": "p1"}}]}
    findings = scan(_device_named("see urn:x:Straße é"), sensitive_values(bundle))
    assert "patient-fullUrl" in {f.kind for f in findings}


@pytest.mark.parametrize(
    ("patient", "text", "system"),
    [
        ({"identifier": [{"system": "urn:order", "value": "150400"}]}, "Trombo (ref 150-400 x10^9/l)", None),
        ({"identifier": [{"system": "urn:mrn", "value": "250000"}]}, "trombocyten 250.000 /ul", None),
        ({"identifier": [{"system": "urn:mrn", "value": "202310"}]}, "v2023.10", None),
        ({"address": [{"postalCode": "1000 MG"}]}, "Paracetamol 2x1000mg tablet", SNOMED),
    ],
)
def test_what_a_re_probe_found_wrongly_refused_is_delivered(
    patient: dict, text: str, system: str | None
) -> None:
    """A re-probe of the review's fixes: a six-digit number grouped once is how ranges and thousands are
    written, and a postcode run into a term's word may be the term's ("1000mg" as a whole word still is)."""
    assert scan(_device_named(text, system), sensitive_values(_one_patient(False, **patient))) == []


def test_a_birth_date_or_a_prefixed_record_numbers_digits_as_a_json_number_are_found() -> None:
    """A privacy probe: `valueQuantity.value: 19610714` for a patient born 1961-07-14, and 7788123 for the
    record number MRN7788123, were delivered (as text both were found, as JSON numbers not)."""
    mrn = {"system": "http://ehr.example.org/mrn", "value": "MRN7788123"}
    bundle = _patient_bundle(birthDate="1961-07-14", identifier=[mrn])
    sensitive = sensitive_values(bundle)
    as_numbers = [(19610714, "birth-date"), (14071961, "birth-date"), (7788123, "identifier")]
    # and as decimals (a re-probe: 19610714.0 and 7.788123e6 were delivered)
    for number, kind in [*as_numbers, (19610714.0, "birth-date"), (7.788123e6, "identifier")]:
        found = scan(out_with(valueQuantity={"value": number}), sensitive)
        assert [f.kind for f in found] == [kind], number
        assert found[0].path == "Bundle.entry[0].resource.valueQuantity.value"
    assert [f.kind for f in scan(out_with(valueString="dossier 7788123"), sensitive)] == ["identifier"]
    assert scan(out_with(valueQuantity={"value": 7788124}), sensitive) == []  # another number
    # a record number of few significant digits (MRN00000000) is not sought as digits: a first version
    # refused every Patient of a synthetic export, whose MRN pseudonym's assigner is the URA 00000000
    sensitive = sensitive_values(_patient_bundle(identifier=[{**mrn, "value": "MRN00000000"}]))
    assert scan(out_with(valueString="URA 00000000"), sensitive) == []


def test_a_patients_surname_in_a_terminology_display_however_written_others_surnames_not() -> None:
    """Re-probes: a surname's second word ("Kwakkelsteen Oosterhout", "O'Callaghan") never reached the
    walk (the whole-document check looked for a name's first word), "StraßburgerSyndrome" was missed (the
    glued search reads lower-cased text, "straßburger"). A relative's or a professional's surname alone is
    not sought there: eponyms (Stevens-Johnson, Merkel cell, Hodgkin) of the people around a patient."""

    def with_display(display: str) -> dict:
        out = out_with(valueString="x")
        coding = {"system": SNOMED, "code": "1", "display": display}
        out["entry"][0]["resource"]["code"] = {"coding": [coding]}
        return out

    for family, display in [("Kwakkelsteen Oosterhout", "Oosterhout tumour"),
                            ("O'Callaghan", "Callaghan syndrome"),
                            ("Straßburger", "StraßburgerSyndrome"), ("Straßburger", "Strassburger tumour")]:
        sensitive = sensitive_values(_patient_bundle(name=[{"family": family, "given": ["Maria"]}]))
        assert {f.kind for f in scan(with_display(display), sensitive)} == {"name"}, display
    bundle = _patient_bundle(name=[{"family": "Kwakkelsteen", "given": ["Maria"]}])
    bundle["entry"].append({"resource": {"resourceType": "RelatedPerson", "name": [{"family": "Hodgkin"}]}})
    assert scan(with_display("Hodgkin lymphoma"), sensitive_values(bundle)) == []


def test_a_phone_number_as_a_json_number_is_found() -> None:
    """A re-probe: +31 6 12345678 as `valueInteger: 612345678` (its 0 lost) or 31612345678.0 was delivered."""
    sensitive = sensitive_values(_patient_bundle(telecom=[{"system": "phone", "value": "+31 6 12345678"}]))
    for number in (612345678, 31612345678.0, 612345678.0):
        assert [f.kind for f in scan(out_with(valueInteger=number), sensitive)] == ["telecom"], number
    assert scan(out_with(valueInteger=612345679), sensitive) == []
