"""Profile and rules validators, and the CLI commands around them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from gateway.deid import (
    ProfileError,
    RulesError,
    check_profile,
    check_rules,
    load_profile,
    load_profiles,
    load_rules,
)
from gateway.deid.commands import app
from gateway.deid.profile import read_yaml
from tests.test_deid_support import PROFILES

RULES = PROFILES.parent / "mappings" / "deid-rules.yaml"


def generic() -> dict[str, Any]:
    return copy.deepcopy(read_yaml(PROFILES / "example-generic.yaml"))


def test_shipped_profiles_and_rules_are_valid() -> None:
    profiles = load_profiles(PROFILES)
    assert set(profiles) == {"example-generic", "example-cancer-registry", "example-management-info"}
    assert not profiles["example-management-info"].person_level
    assert "B" not in profiles["example-generic"].pseudonym_types
    assert check_rules(read_yaml(RULES)) == []
    load_rules(RULES)


def _problems(mutate: Any) -> list[str]:
    data = generic()
    mutate(data)
    return check_profile(data)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(purpose="marketing"), "purpose"),
        (lambda d: d["legal_basis"].update(allows="everything"), "legal_basis.allows"),
        (lambda d: d.update(purpose="management-information"), "does not fit purpose"),
        (lambda d: d.update(pseudonym_types=["NGGV", "B"]), "type B"),
        (lambda d: d.update(pseudonym_types=["XYZ"]), "unknown type"),
        (lambda d: d.update(pseudonym_types=[]), "at least one pseudonym type"),
        (lambda d: d.update(endpoint="https://registry.example/fhir"), "endpoint"),
        (lambda d: d.update(id="Has Spaces"), "id:"),
        (lambda d: d["generalise"].update(birthDate="decade"), "generalise.birthDate"),
        (lambda d: d["free_text"].update(narrative="keep"), "free_text.narrative"),
        (lambda d: d["practitioner"].update(shoe_size="keep"), "unknown option"),
        (lambda d: d.update(colour="blue"), "colour: unknown key"),
        (lambda d: d["resources"].update(Unicorn=["horn"]), "not a FHIR R4 resource type"),
        (lambda d: d["resources"].update(RelatedPerson=["relationship"]), "never delivered"),
        (lambda d: d["resources"]["Patient"].append("name"), "direct identifier"),
        (lambda d: d["resources"]["Patient"].append("text"), "handled by the engine"),
        (lambda d: d["resources"]["Observation"].append("colour"), "not an element of Observation"),
        (
            lambda d: d["resources"].update(Observation=["code", "status.colour"]),
            "primitive has no sub-elements",
        ),
        # allow-lists that drop elements FHIR R4 requires (min 1), read from the official JSON Schema
        (lambda d: d["resources"]["Condition"].remove("subject"), "drops 'subject'"),
        (lambda d: d["resources"]["Observation"].remove("code"), "drops 'code'"),
        (lambda d: d["resources"].update(Immunization=["status", "patient"]), "drops 'vaccineCode'"),
        (lambda d: d["resources"].update(Encounter=["status"]), "drops 'class'"),
        (lambda d: d["resources"].update(Observation=["code", "component.valueQuantity"]), "drops 'code'"),
        # a required choice element (the JSON Schema cannot say so; R4Types.required_choices)
        (lambda d: d["resources"]["MedicationStatement"].remove("medication[x]"), "drops 'medication[x]'"),
    ],
)
def test_check_profile_rejects(mutate: Any, expected: str) -> None:
    problems = _problems(mutate)
    assert any(expected in p for p in problems), problems


def test_bsn_pseudonym_allowed_only_when_explicit() -> None:
    assert not _problems(lambda d: d.update(pseudonym_types=["B", "GG"], allow_bsn_pseudonym=True))


def test_aggregated_only_refuses_pseudonyms() -> None:
    data = read_yaml(PROFILES / "example-management-info.yaml")
    assert check_profile(data) == []
    data["pseudonym_types"] = ["GG"]
    assert any("aggregated-only" in p for p in check_profile(data))


def test_check_profile_on_garbage() -> None:
    assert check_profile(None) == ["profile: must be a YAML mapping"]
    assert check_profile({"resources": "all"})  # many problems, no exception


def test_load_profile_raises_with_all_problems(tmp_path: Path) -> None:
    data = generic()
    data["purpose"] = "marketing"
    data["resources"]["Condition"].remove("subject")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError) as exc:
        load_profile(path)
    assert len(exc.value.problems) >= 2
    (tmp_path / "broken.yaml").write_text("id: [unclosed")
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "broken.yaml")


def test_duplicate_profile_ids_are_refused(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text((PROFILES / "example-generic.yaml").read_text())
    with pytest.raises(ProfileError):
        load_profiles(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["datatypes"].update(HumanName={"method": "scramble"}), "method"),
        (lambda r: r["datatypes"].update(Unicorn={"method": "remove"}), "not a FHIR R4 datatype"),
        (lambda r: r["datatypes"].update(CodeableConcept={"method": "pseudonymise-reference"}), "Reference"),
        (
            lambda r: r["paths"].update({"Observation.identifier": {"method": "replace-with-pseudonyms"}}),
            "Patient.identifier only",
        ),
        (lambda r: r["paths"].update({"Observation.colour": {"method": "keep"}}), "not an element path"),
        (
            lambda r: r["paths"].update(
                {"Patient.gender": {"method": "generalise", "kind": "address", "to": "pc4"}}
            ),
            "does not apply",
        ),
        (
            lambda r: r["paths"].update({"Patient.name": {"method": "remove", "profile_switch": "x.y"}}),
            "profile_switch",
        ),
        (lambda r: r["extensions"].update({"not-a-url": {"method": "keep"}}), "absolute extension urls"),
        (
            lambda r: r["extensions"].update({"http://x.example/e": {"method": "generalise"}}),
            "method must be",
        ),
        (lambda r: r.update(version=2), "version"),
    ],
)
def test_check_rules_rejects(mutate: Any, expected: str) -> None:
    data = copy.deepcopy(read_yaml(RULES))
    mutate(data)
    problems = check_rules(data)
    assert any(expected in p for p in problems), problems


def test_load_rules_raises(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\ndatatypes: {HumanName: {method: keep-it}}\n")
    with pytest.raises(RulesError):
        load_rules(path)


def test_cli_profiles_check(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["profiles-check", str(PROFILES), "--rules", str(RULES)])
    assert ok.exit_code == 0, ok.output
    data = generic()
    data["resources"]["Condition"].remove("subject")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    bad = runner.invoke(app, ["profiles-check", str(tmp_path), "--rules", str(RULES)])
    assert bad.exit_code == 1 and "drops 'subject'" in bad.output


def test_commands_callable_as_functions_as_the_cli_does(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from gateway.deid import commands

    commands.profiles_check(PROFILES)  # one directory, positionally, as gateway/cli.py calls it: no Exit(1)
    commands.profiles_check(None)  # default: the shipped profiles
    assert "3 profile(s) and the rules are valid" in capsys.readouterr().out
    with pytest.raises(typer.Exit) as exc:
        commands.scan([RULES])  # not JSON: unreadable
    assert exc.value.exit_code == 2


def test_a_reference_to_a_type_the_profile_does_not_deliver_is_a_warning(tmp_path: Path) -> None:
    from gateway.deid.profile import profile_warnings

    raw = read_yaml(PROFILES / "example-generic.yaml")
    assert profile_warnings(raw) == []  # the shipped profiles refer only to what they deliver
    raw["resources"]["CarePlan"] = [*raw["resources"]["CarePlan"], "careTeam"]
    raw["resources"]["Condition"] = [*raw["resources"]["Condition"], "evidence"]  # a BackboneElement: fine
    assert profile_warnings(raw) == [
        "resources.CarePlan.careTeam: refers to CareTeam, which is not delivered"
    ]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["profiles-check", str(tmp_path / "p.yaml")])
    assert result.exit_code == 0 and "warning: resources.CarePlan.careTeam" in result.output


def test_a_profile_lists_only_extensions_the_rules_keep(tmp_path: Path) -> None:
    data = generic()
    data["extensions"] = [
        "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "http://hl7.org/fhir/StructureDefinition/humanname-own-name",  # the rules remove it
        "http://example.org/never-heard-of",
    ]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["profiles-check", str(tmp_path), "--rules", str(RULES)])
    assert result.exit_code == 1
    assert "humanname-own-name: not kept by the de-identification rules" in result.output
    assert "never-heard-of: not kept by the de-identification rules" in result.output
    assert "data-absent-reason" not in result.output
    from gateway.deid import compile_plan

    with pytest.raises(ProfileError, match="never-heard-of"):  # and the gateway does not start with it
        compile_plan(load_profile(tmp_path / "p.yaml"), load_rules(RULES))
    data["extensions"] = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
    assert "extensions: must be a list of extension urls" in check_profile(data)


def test_a_malformed_extension_list_is_a_problem_not_a_crash_nor_every_extension(tmp_path: Path) -> None:
    """A re-probe: `extensions: [[url]]` crashed `profiles check` with a traceback, and `extensions:` with
    every item commented out (YAML null) gave the registry every extension the rules keep."""
    for value, problem in (([["http://x"]], "must be a list of extension urls"),
                           (None, "extensions: must be a list")):
        data = generic()
        data["extensions"] = value
        assert any(problem in p for p in check_profile(data)), value
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(app, ["profiles-check", str(tmp_path / "p.yaml"), "--rules", str(RULES)])
        assert result.exit_code == 1 and problem in result.output, (result.output, result.exception)
