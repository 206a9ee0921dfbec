"""The vectors selftest: passes on the shared file, fails (exit 1, naming case and type) on altered copies."""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.pseudonym.commands import app
from gateway.pseudonym.selftest import Mismatch, VectorsError, run_selftest, run_selftest_detailed

REPO_VECTORS = Path(__file__).parent / "vectors" / "pseudonym-vectors.json"
SHARED_VECTORS = Path("/work/shared/pseudonym-vectors.json")
VECTORS = json.loads(REPO_VECTORS.read_text())
runner = CliRunner()


def _vectors_file() -> Path:
    return SHARED_VECTORS if SHARED_VECTORS.exists() else REPO_VECTORS


def _altered(tmp_path: Path, change) -> Path:
    data = copy.deepcopy(VECTORS)
    change(data)
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _pseudonym(data, case: int, ptype: str) -> dict:
    return next(p for p in data["cases"][case]["pseudonyms"] if p["type"] == ptype)


def _flip(value: str) -> str:
    """Change one character of a base64url value (stays a well-formed value)."""
    last = value[-2]
    return value[:-2] + ("A" if last != "A" else "B") + value[-1]


def test_selftest_passes_on_the_shared_vectors():
    assert run_selftest(_vectors_file()) == []


def test_selftest_covers_every_case_and_type():
    result = run_selftest_detailed(_vectors_file())
    labels = [c["label"] for c in VECTORS["cases"]]
    assert result.rows == [*labels, "rotation", "other_registry"]
    assert all(len(result.checked[row]) == 10 for row in result.rows)


def test_cli_selftest_passes():
    out = runner.invoke(app, ["selftest", "--vectors", str(_vectors_file())])
    assert out.exit_code == 0, out.output
    assert "FAIL" not in out.output
    for case in VECTORS["cases"]:
        assert case["label"] in out.output
    assert "all vectors reproduced" in out.output


def test_cli_selftest_fails_on_one_altered_value_and_names_case_and_type(tmp_path):
    def change(data):
        p = _pseudonym(data, 1, "NGGV")
        p["pre_b64u"] = _flip(p["pre_b64u"])

    out = runner.invoke(app, ["selftest", "--vectors", str(_altered(tmp_path, change))])
    assert out.exit_code == 1
    assert "FAIL diacritics and hyphen / NGGV: pre_b64u differs" in out.output
    assert out.output.count("FAIL ") == 1 + out.output.count("FAIL │")  # one mismatch line (+ table cells)


ALTERATIONS = {
    "fields": (lambda d: _pseudonym(d, 0, "SNGG")["fields"].__setitem__(0, "PUTE"), [(0, "SNGG", "fields")]),
    "canonical": (
        lambda d: _pseudonym(d, 2, "A").__setitem__("canonical", "NLPS1|A|9999ZZ|1|BIZ"),
        [(2, "A", "canonical")],
    ),
    "final": (
        lambda d: _pseudonym(d, 3, "MRN").__setitem__(
            "final_b64u", _flip(_pseudonym(d, 3, "MRN")["final_b64u"])
        ),
        [(3, "MRN", "final_b64u")],
    ),
    "identifier": (
        lambda d: _pseudonym(d, 1, "B").__setitem__("identifier_value", "v1.AAAA"),
        [(1, "B", "identifier_value")],
    ),
    "skip reason": (
        lambda d: d["cases"][3]["skipped"].__setitem__("C", "no-dutch-postcode-or-house-number"),
        [(3, "C", "skip reason")],
    ),
    "expected skip that is produced": (
        lambda d: (
            d["cases"][2]["skipped"].__setitem__("GG", "birth-date-not-full")
            or d["cases"][2]["pseudonyms"].remove(_pseudonym(d, 2, "GG"))
        ),
        [(2, "GG", "skip reason")],
    ),
}


@pytest.mark.parametrize("name", sorted(ALTERATIONS))
def test_each_kind_of_alteration_is_reported_exactly(tmp_path, name):
    change, expected = ALTERATIONS[name]
    mismatches = run_selftest(_altered(tmp_path, change))
    labels = [c["label"] for c in VECTORS["cases"]]
    assert [(m.case, m.type, m.field) for m in mismatches] == [(labels[i], t, f) for i, t, f in expected]


def test_altered_patient_fails_every_dependent_type_without_printing_values(tmp_path):
    def change(data):
        data["cases"][0]["patient"]["name"][0]["_family"]["extension"][1]["valueString"] = "Pietersen"

    out = runner.invoke(app, ["selftest", "--vectors", str(_altered(tmp_path, change))])
    assert out.exit_code == 1
    for ptype in ("NGGV", "SNGGV", "NGG", "SNGG"):
        assert f"/ {ptype}: fields differs" in out.output
    assert "/ GG:" not in out.output
    for plain in ("PIETERSE", "PIET|", "Pietersen"):
        assert plain not in out.output


def test_rotation_and_other_registry_rows_are_checked(tmp_path):
    def change(data):
        data["rotation"][4]["v2"] = _flip(data["rotation"][4]["v2"])
        data["other_registry"][9]["identifier_value"] = _flip(data["other_registry"][9]["identifier_value"])

    mismatches = run_selftest(_altered(tmp_path, change))
    assert Mismatch("rotation", "SNGG", "v2 via translate") in mismatches
    assert Mismatch("rotation", "SNGG", "v2 computed fresh under v2") in mismatches
    assert Mismatch("other_registry", "MRN", "identifier_value") in mismatches
    assert len(mismatches) == 3


def test_rotation_v1_that_matches_no_case(tmp_path):
    mismatches = run_selftest(_altered(tmp_path, lambda d: d["rotation"][0].__setitem__("v1", "v1.AAAA")))
    assert [(m.case, m.type, m.field) for m in mismatches] == [
        ("rotation", "B", "v2 via translate"),
        ("rotation", "B", "v1"),
    ]


def test_other_registry_name_can_be_given(tmp_path):
    path = _altered(tmp_path, lambda d: d["keys"].__setitem__("other_registry", "registry-third"))
    mismatches = run_selftest(path)
    assert {m.case for m in mismatches} == {"other_registry"} and len(mismatches) == 10


def test_wrong_source_key_fails_everything_but_skips(tmp_path):
    path = _altered(tmp_path, lambda d: d["keys"].__setitem__("source_key_v1_hex", "00" * 32))
    out = runner.invoke(app, ["selftest", "--vectors", str(path)])
    assert out.exit_code == 1
    assert "foreign address, partial birth date, failing BSN / MRN" not in out.output  # MRN uses K_mrn
    assert "diacritics and hyphen / B: pre_b64u differs" in out.output


def test_derived_key_drift_is_reported(tmp_path):
    path = _altered(tmp_path, lambda d: d["keys"].__setitem__("domain_key_v2_hex", "00" * 64))
    assert run_selftest(path) == [Mismatch("keys", "*", "domain_key_v2_hex")]


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"keys": {}}', '{"keys": {"source_key_v1_hex": "zz"}, "cases": []}']
)
def test_unusable_vectors_file_exits_2(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(VectorsError):
        run_selftest(path)
    out = runner.invoke(app, ["selftest", "--vectors", str(path)])
    assert out.exit_code == 2
    assert "selftest:" in out.output


def test_missing_vectors_file_is_a_usage_error(tmp_path):
    out = runner.invoke(app, ["selftest", "--vectors", str(tmp_path / "nope.json")])
    assert out.exit_code == 2
