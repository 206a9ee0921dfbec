"""The pseudonym input mapping file and its validator."""

import copy
from pathlib import Path

import pytest
import yaml

from gateway.pseudonym import nlps1
from gateway.pseudonym.mapping import DEFAULT_PATH, MappingError, load_input_mapping, parse_input_mapping

RAW = yaml.safe_load(DEFAULT_PATH.read_text())


def test_default_mapping_loads_and_matches_the_spec():
    m = load_input_mapping()
    assert Path(__file__).resolve().parents[1] / "mappings" / "pseudonym-inputs.yaml" == DEFAULT_PATH
    assert m.bsn_system == "http://fhir.nl/fhir/NamingSystem/bsn"
    assert set(m.types) == set(nlps1.TYPES)
    assert m.types["NGGV"].fields == ("name8", "birthdate", "sex", "initial")
    assert m.types["SNGGV"].fields == ("name4", "birthdate", "sex", "initial")
    assert m.types["NGG"].fields == ("name8", "birthdate", "sex")
    assert m.types["SNGG"].fields == ("name4", "birthdate", "sex")
    assert m.types["C"].fields == ("pc6", "birthdate", "sex")
    assert m.types["RGG"].fields == ("pc4", "birthdate", "sex")
    assert m.types["GG"].fields == ("birthdate", "sex")
    assert m.types["A"].fields == ("pc6", "housenumber", "suffix")
    assert m.types["B"].fields == ("bsn",)
    assert m.types["MRN"].fields == ("mrn",)
    assert dict(m.sex_map) == {"male": "M", "female": "V", "other": "O", "unknown": "O"}
    assert m.sex_absent == "O"
    assert m.given_qualifiers == {"BR", "IN"}
    assert m.family_fallback_orders == {"NL1"} and m.family_fallback_when_order_absent
    assert m.preferred_address_type == "HP" and m.fallback_address_use == "home"
    # The reasons the vectors use.
    assert m.types["B"].skip_reasons == ("bsn-missing-or-fails-elfproef",)
    assert m.types["C"].skip_reasons[:2] == ("no-dutch-postcode", "birth-date-not-full")
    assert m.types["A"].skip_reasons[:2] == ("no-dutch-postcode-or-house-number",) * 2


def test_the_file_has_a_legend():
    head = DEFAULT_PATH.read_text().split("\nversion:")[0]
    for key in ("own_name_url", "given_qualifiers", "preferred_type", "skip_reason", "types.<TYPE>.fields"):
        assert key in head


def test_mapping_is_immutable():
    m = load_input_mapping()
    with pytest.raises((TypeError, AttributeError)):
        m.types["B"] = m.types["GG"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        m.bsn_system = "x"  # type: ignore[misc]


def _broken(change):
    data = copy.deepcopy(RAW)
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.__setitem__("colour", "blue"), "top level: unknown key(s) colour"),
        (lambda d: d.pop("sex"), "top level: missing key(s) sex"),
        (lambda d: d.__setitem__("version", 2), "version"),
        (lambda d: d.__setitem__("version", True), "version"),
        (lambda d: d["name"].__setitem__("uses", "official"), "name.uses: expected a list of strings"),
        (lambda d: d["name"].__setitem__("own_nam_url", "x"), "name: unknown key(s) own_nam_url"),
        (lambda d: d["name"].__setitem__("accept_unqualified_given", "yes"), "name.accept_unqualified_given"),
        (lambda d: d["address"].__setitem__("preferred_type", ""), "address.preferred_type"),
        (lambda d: d["sex"]["map"].__setitem__("male", "X"), "sex.map.male"),
        (lambda d: d["sex"].__setitem__("absent", None), "sex.absent"),
        (
            lambda d: d["fields"].__setitem__("nickname", {"skip_reason": "x"}),
            "fields: unknown field(s) nickname",
        ),
        (lambda d: d["fields"].pop("pc4"), "fields: missing field(s) pc4"),
        (lambda d: d["fields"]["pc4"].__setitem__("skip_reason", "No Postcode!"), "fields.pc4.skip_reason"),
        (lambda d: d["fields"]["sex"].__setitem__("ambiguous_reason", "x"), "fields.sex: unknown key(s)"),
        (lambda d: d["fields"]["pc4"].pop("ambiguous_reason"), "fields.pc4: missing"),
        (lambda d: d["types"].__setitem__("NGGX", {"fields": ["bsn"]}), "unknown pseudonym type NGGX"),
        (lambda d: d["types"]["GG"].__setitem__("fields", ["birthdate", "gender"]), "unknown field gender"),
        (lambda d: d["types"]["GG"].__setitem__("fields", []), "at least one field"),
        (lambda d: d["types"]["GG"].__setitem__("fields", ["sex", "sex"]), "listed twice"),
        (
            lambda d: d["types"]["GG"].__setitem__("skip_reasons", {"pc6": "x"}),
            "not one of this type's fields",
        ),
        (lambda d: d["types"]["GG"].__setitem__("extra", 1), "types.GG: unknown key(s) extra"),
        (lambda d: d.__setitem__("types", {}), "types"),
        (lambda d: d.__setitem__("types", [1]), "types"),
    ],
)
def test_invalid_mappings_are_rejected_with_the_key_named(change, message):
    with pytest.raises(MappingError) as err:
        parse_input_mapping(_broken(change))
    assert message in str(err.value)


@pytest.mark.parametrize("document", [None, [], "text", 3])
def test_non_mapping_documents(document):
    with pytest.raises(MappingError):
        parse_input_mapping(document)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(MappingError) as err:
        load_input_mapping(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: [unclosed\n")
    with pytest.raises(MappingError) as err:
        load_input_mapping(bad)
    assert "bad.yaml" in str(err.value) and "line" in str(err.value)
    bad.write_text(yaml.safe_dump(_broken(lambda d: d.__setitem__("x", 1))))
    with pytest.raises(MappingError) as err:
        load_input_mapping(str(bad))
    assert "bad.yaml: top level: unknown key(s) x" in str(err.value)


def test_a_subset_of_types_is_allowed_and_other_types_are_rejected_at_use():
    from gateway.pseudonym.extract import extract_inputs

    mapping = parse_input_mapping(_broken(lambda d: d.__setitem__("types", {"GG": d["types"]["GG"]})))
    assert set(mapping.types) == {"GG"}
    assert extract_inputs({"birthDate": "2000-01-01"}, ["GG"], mapping, None).inputs[0].fields == (
        "20000101",
        "O",
    )
    with pytest.raises(nlps1.PseudonymError):
        extract_inputs({}, ["B"], mapping, None)


def test_a_per_type_override_changes_only_that_type():
    mapping = parse_input_mapping(
        _broken(lambda d: d["types"]["GG"].__setitem__("skip_reasons", {"birthdate": "gg-needs-a-full-date"}))
    )
    assert mapping.types["GG"].skip_reasons == ("gg-needs-a-full-date", "sex-not-recognised")
    assert mapping.types["NGG"].skip_reasons[1] == "birth-date-not-full"


def test_every_known_field_has_a_producer():
    from gateway.pseudonym.extract import PatientFields
    from gateway.pseudonym.mapping import FIELDS

    assert {name for name in FIELDS if callable(getattr(PatientFields, "field_" + name, None))} == FIELDS
