"""SourceStage: key versions, MRN key cache, configuration errors."""

import json
from pathlib import Path

import pytest

from gateway.pseudonym import nlps1
from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonym.types import Extraction, PrePseudonym, PseudonymInput

VECTORS = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())
KEYS = VECTORS["keys"]
SRC1 = bytes.fromhex(KEYS["source_key_v1_hex"])
SRC2 = bytes(range(32))
MRN_MASTER = bytes.fromhex(KEYS["provider_mrn_master_hex"])
PROVIDER = KEYS["provider"]
EXTRACTION = extract_inputs(
    VECTORS["cases"][0]["patient"], nlps1.TYPES, load_input_mapping(), KEYS["mrn_system"]
)
EXPECTED = {p["type"]: p["pre_b64u"] for p in VECTORS["cases"][0]["pseudonyms"]}


def test_pre_pseudonyms_match_the_vectors_and_keep_order():
    stage = SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER)
    pres = stage.pre_pseudonyms(EXTRACTION, KEYS["registry"])
    assert [p.type for p in pres] == [i.type for i in EXTRACTION.inputs]
    assert {p.type: nlps1.b64u(p.value) for p in pres} == EXPECTED
    assert all(isinstance(p, PrePseudonym) and p.key_version == 1 for p in pres)


def test_pre_pseudonym_is_frozen():
    pre = PrePseudonym("B", 1, b"x")
    with pytest.raises(AttributeError):
        pre.value = b"y"  # type: ignore[misc]


def test_current_source_version_and_explicit_older_version():
    stage = SourceStage({1: SRC1, 2: SRC2}, 2, MRN_MASTER, PROVIDER)
    current = {p.type: p for p in stage.pre_pseudonyms(EXTRACTION, KEYS["registry"])}
    assert current["B"].key_version == 2
    assert nlps1.b64u(current["B"].value) != EXPECTED["B"]
    # The MRN key version follows the source version unless given.
    assert current["MRN"].key_version == 2
    older = {p.type: p for p in stage.pre_pseudonyms(EXTRACTION, KEYS["registry"], source_version=1)}
    assert nlps1.b64u(older["B"].value) == EXPECTED["B"]
    assert nlps1.b64u(older["MRN"].value) == EXPECTED["MRN"]


def test_mrn_version_can_be_given_per_call():
    stage = SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER)
    pres = {p.type: p for p in stage.pre_pseudonyms(EXTRACTION, KEYS["registry"], mrn_version=3)}
    assert pres["MRN"].key_version == 3
    assert pres["B"].key_version == 1
    assert stage.mrn_key(KEYS["registry"], 3).reveal(pres["MRN"].value) == "NLPS1|MRN|P0001234"


def test_mrn_keys_are_cached_per_registry_and_version():
    stage = SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER)
    key = stage.mrn_key("registry-example", 1)
    assert stage.mrn_key("registry-example", 1) is key
    assert stage.mrn_key("registry-other", 1) is not key
    assert stage.mrn_key("registry-example", 2) is not key


def test_mrn_pre_is_bound_to_the_registry():
    stage = SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER)
    a = {p.type: p.value for p in stage.pre_pseudonyms(EXTRACTION, "registry-example")}
    b = {p.type: p.value for p in stage.pre_pseudonyms(EXTRACTION, "registry-other")}
    assert a["MRN"] != b["MRN"]
    assert a["B"] == b["B"]  # K_src is ecosystem-wide; the registry separation happens at the TTP


def test_mrn_without_a_provider_key_is_a_configuration_error():
    stage = SourceStage({1: SRC1}, 1, None, PROVIDER)
    assert not stage.has_mrn_key
    assert SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER).has_mrn_key
    without_mrn = Extraction([i for i in EXTRACTION.inputs if i.type != "MRN"])
    assert len(stage.pre_pseudonyms(without_mrn, "r")) == 9
    with pytest.raises(nlps1.PseudonymError) as err:
        stage.pre_pseudonyms(EXTRACTION, "r")
    assert "P0001234" not in str(err.value)


@pytest.mark.parametrize(
    ("keys", "version", "mrn", "provider"),
    [
        ({1: SRC1}, 2, MRN_MASTER, PROVIDER),
        ({1: b"short"}, 1, None, PROVIDER),
        ({1: SRC1}, 1, b"short", PROVIDER),
        ({1: SRC1}, 1, MRN_MASTER, ""),
    ],
)
def test_bad_configuration_raises(keys, version, mrn, provider):
    with pytest.raises(nlps1.PseudonymError):
        SourceStage(keys, version, mrn, provider)


def test_unknown_requested_source_version():
    stage = SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER)
    with pytest.raises(nlps1.PseudonymError):
        stage.pre_pseudonyms(EXTRACTION, "r", source_version=7)


def test_empty_extraction():
    assert SourceStage({1: SRC1}, 1, None, PROVIDER).pre_pseudonyms(Extraction(), "r") == []


def test_same_canonical_same_pre_across_calls_and_instances():
    item = Extraction([PseudonymInput("GG", ("19340428", "V"), "NLPS1|GG|19340428|V")])
    a = SourceStage({1: SRC1}, 1, None, "ura:1").pre_pseudonyms(item, "r")
    b = SourceStage({1: SRC1}, 1, None, "ura:2").pre_pseudonyms(item, "other")
    assert a == b and nlps1.b64u(a[0].value) == EXPECTED["GG"]


def test_patient_with_lone_surrogates_extracts_and_pre_pseudonymises_without_raising():
    # json.loads (unlike orjson) lets lone surrogates through; they must not crash the HMAC's UTF-8 encode.
    raw = (
        '{"identifier": [{"system": "SYSTEM", "value": "P\\ud800"}],'
        ' "name": [{"use": "official", "family": "\\udc00Li", "given": ["\\ud800A"]}],'
        ' "birthDate": "2000-01-01"}'
    )
    patient = json.loads(raw.replace("SYSTEM", KEYS["mrn_system"]))
    extraction = extract_inputs(patient, nlps1.TYPES, load_input_mapping(), KEYS["mrn_system"])
    assert extraction.skipped["MRN"] == "mrn-missing"
    assert {i.type: i.fields for i in extraction.inputs}["NGGV"] == ("LI", "20000101", "O", "A")
    SourceStage({1: SRC1}, 1, MRN_MASTER, PROVIDER).pre_pseudonyms(extraction, "r")
