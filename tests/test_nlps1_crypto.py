"""NLPS1 primitives against the byte-exact vectors (the extraction is tested in test_pseudonym_vectors)."""

import json
from pathlib import Path

import pytest

from gateway.pseudonym import nlps1

VECTORS = json.loads((Path(__file__).parent / "vectors" / "pseudonym-vectors.json").read_text())
KEYS = VECTORS["keys"]
PROVIDER = KEYS["provider"]


def _domain(version: int, registry: str = KEYS["registry"]) -> nlps1.DomainKey:
    return nlps1.DomainKey.derive(bytes.fromhex(KEYS["ttp_master_hex"]), registry, version)


def test_derived_keys_match_vectors():
    master = bytes.fromhex(KEYS["ttp_master_hex"])
    assert nlps1.domain_key(master, KEYS["registry"], 1).hex() == KEYS["domain_key_v1_hex"]
    assert nlps1.domain_key(master, KEYS["registry"], 2).hex() == KEYS["domain_key_v2_hex"]
    mrn = nlps1.mrn_key(bytes.fromhex(KEYS["provider_mrn_master_hex"]), KEYS["registry"], 1)
    assert mrn.hex() == KEYS["mrn_key_v1_hex"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["label"])
def test_source_and_final_from_canonical(case):
    source = nlps1.SourceKey(bytes.fromhex(KEYS["source_key_v1_hex"]), 1)
    mrn = nlps1.ProviderMrnKey(bytes.fromhex(KEYS["provider_mrn_master_hex"]), PROVIDER, KEYS["registry"], 1)
    dom = _domain(1)
    for p in case["pseudonyms"]:
        pre = mrn.pre(p["canonical"]) if p["type"] == "MRN" else source.pre(p["canonical"])
        assert nlps1.b64u(pre) == p["pre_b64u"], p["type"]
        assert dom.identifier(p["type"], pre, PROVIDER) == p["identifier_value"], p["type"]


def test_rotation_translates_v1_to_v2():
    v1, v2 = _domain(1), _domain(2)
    for row in VECTORS["rotation"]:
        assert nlps1.translate(row["v1"], row["type"], v1, v2, PROVIDER) == row["v2"]


def test_mrn_opens_only_for_the_bound_provider():
    row = next(r for r in VECTORS["rotation"] if r["type"] == "MRN")
    _, final = nlps1.parse_identifier(row["v1"])
    pre = _domain(1).open("MRN", final, PROVIDER)
    mrn = nlps1.ProviderMrnKey(bytes.fromhex(KEYS["provider_mrn_master_hex"]), PROVIDER, KEYS["registry"], 1)
    assert mrn.reveal(pre) == "NLPS1|MRN|P0001234"
    with pytest.raises(nlps1.PseudonymError) as err:
        _domain(1).open("MRN", final, "ura:99999999")
    assert "P0001234" not in str(err.value)
