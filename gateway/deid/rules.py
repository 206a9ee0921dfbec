"""De-identification rules (``mappings/deid-rules.yaml``): loader and validator, separate from the engine.

The rule file is data with a commented legend; this module only checks and freezes it. The engine compiles
rules + a profile into a plan once (``engine.compile_plan``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway import yamlfile
from gateway.deid.r4 import DATE_TYPES, R4Types, r4

METHODS = {"remove", "keep", "generalise", "pseudonymise-reference", "replace-with-pseudonyms"}
GENERALISE_KINDS = {"date", "birthDate", "address"}
# Profile options a rule may refer to (``profile_switch`` / ``to: profile:...``); see profile.py
SWITCHES = {
    "free_text.note",
    "free_text.attachment",
    "free_text.reference_display",
    "free_text.concept_text",
    "practitioner.name",
    "practitioner.identifier",
    "practitioner.telecom",
    "generalise.dates",
    "generalise.birthDate",
    "generalise.postcode",
}
RULE_KEYS = {"method", "kind", "to", "keep", "profile_switch", "why"}
EXTENSION_KEYS = {"method", "values", "parts", "why"}
TOP_KEYS = {"version", "datatypes", "paths", "extensions", "modifier_extensions"}
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "mappings" / "deid-rules.yaml"


@dataclass(frozen=True)
class Rule:
    method: str
    kind: str | None = None
    to: str | None = None
    keep: tuple[str, ...] = ()
    profile_switch: str | None = None


@dataclass(frozen=True)
class ExtensionShape:
    """What a kept extension may carry: its value types (`valueCode`...) and its parts (sub-extensions by
    relative url, each with its value types). Anything else in it is dropped: a `valueString` or an unknown
    part can hold any free text (a neighbour's name)."""

    values: frozenset[str] = frozenset()
    parts: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Rules:
    datatypes: Mapping[str, Rule]
    paths: Mapping[str, Rule]
    extensions: Mapping[str, str]  # url -> keep | remove
    modifier_extensions: frozenset[str]
    # url of a kept extension -> what it carries
    shapes: Mapping[str, ExtensionShape] = field(default_factory=lambda: MappingProxyType({}))


class RulesError(ValueError):
    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"rules {source}: " + "; ".join(problems))
        self.problems = problems


def _text(value: Any) -> str | None:
    """Strings only: YAML may hold lists or mappings where a name is expected (unhashable, never valid)."""
    return value if isinstance(value, str) else None


def _check_rule(where: str, rule: Any, owner_type: str | None, out: list[str]) -> None:
    if not isinstance(rule, Mapping):
        out.append(f"{where}: must be a mapping with 'method'")
        return
    for key in rule:
        if key not in RULE_KEYS:
            out.append(f"{where}.{key}: unknown option")
    method = _text(rule.get("method"))
    if method not in METHODS:
        out.append(f"{where}.method: must be one of {sorted(METHODS)}")
        return
    switch = rule.get("profile_switch")
    switch = switch if switch is None else _text(switch) or "?"
    if switch is not None and switch not in SWITCHES:
        out.append(f"{where}.profile_switch: unknown profile option")
    if method == "pseudonymise-reference" and owner_type != "Reference":
        out.append(f"{where}: pseudonymise-reference applies to Reference elements only")
    if method == "replace-with-pseudonyms" and where != "paths.Patient.identifier":
        out.append(f"{where}: replace-with-pseudonyms applies to Patient.identifier only")
    if method == "generalise":
        _check_generalise(where, rule, owner_type, out)


def _check_generalise(where: str, rule: Mapping[str, Any], owner_type: str | None, out: list[str]) -> None:
    kind = _text(rule.get("kind"))
    if kind not in GENERALISE_KINDS:
        out.append(f"{where}.kind: must be one of {sorted(GENERALISE_KINDS)}")
        return
    to = rule.get("to")
    if not isinstance(to, str) or (to.startswith("profile:") and to[8:] not in SWITCHES):
        out.append(f"{where}.to: a value or profile:<option>")
    expected = {"date": DATE_TYPES, "birthDate": {"date"}, "address": {"Address"}}[kind]
    if owner_type is not None and owner_type not in expected:
        out.append(f"{where}: generalise kind '{kind}' does not apply to {owner_type}")
    keep = rule.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        out.append(f"{where}.keep: must be a list of element names")


def _path_type(types: R4Types, path: str) -> str | None:
    """Datatype at a dotted path (``Observation.component.code`` / ``Annotation.authorString``)."""
    parts = path.split(".")
    current = parts[0]
    if current not in types.elements:
        return None
    for part in parts[1:]:
        et = types.elements.get(current, {}).get(part)
        if et is None:
            return None
        current = et.type
    return current


def _check_urls(section: str, value: Any, allowed_methods: set[str], out: list[str]) -> None:
    if not isinstance(value, Mapping):
        out.append(f"{section}: must be a mapping of extension url -> rule")
        return
    for url, rule in value.items():
        if not isinstance(url, str) or "://" not in url and not url.startswith("urn:"):
            out.append(f"{section}: keys must be absolute extension urls")
        if not isinstance(rule, Mapping) or _text(rule.get("method")) not in allowed_methods:
            out.append(f"{section}.{url}: method must be one of {sorted(allowed_methods)}")
            continue
        for key in rule:
            if key not in EXTENSION_KEYS:
                out.append(f"{section}.{url}.{key}: unknown option")
        if rule["method"] == "keep":
            _check_shape(f"{section}.{url}", rule, out)


def _check_shape(where: str, rule: Mapping[str, Any], out: list[str]) -> None:
    """A kept extension names what it may carry: `values` and/or `parts` (relative url -> values)."""
    parts = rule.get("parts", {})
    if "values" not in rule and "parts" not in rule:
        out.append(f"{where}: a kept extension lists its `values` (value types) and/or `parts`")
    _check_values(f"{where}.values", rule.get("values", []), out)
    if not isinstance(parts, Mapping):
        out.append(f"{where}.parts: must be a mapping of relative url -> value types")
        return
    for url, values in parts.items():
        if not isinstance(url, str) or "/" in url or ":" in url:
            out.append(f"{where}.parts: keys must be relative urls (`value`, `period`)")
        _check_values(f"{where}.parts.{url}", values, out)


def _check_values(where: str, values: Any, out: list[str]) -> None:
    names = r4().elements["Extension"]
    if not isinstance(values, list) or any(
        not isinstance(v, str) or not v.startswith("value") or v not in names for v in values
    ):
        out.append(f"{where}: must be a list of Extension value elements (valueCode, valueCoding...)")


def check_rules(data: Any) -> list[str]:
    """Every problem with a parsed rules document; empty when valid."""
    if not isinstance(data, Mapping):
        return ["rules: must be a YAML mapping"]
    out: list[str] = []
    types = r4()
    for key in data:
        if key not in TOP_KEYS:
            out.append(f"{key}: unknown key")
    if data.get("version") != 1:
        out.append("version: must be 1")
    datatypes = data.get("datatypes", {})
    if not isinstance(datatypes, Mapping):
        out.append("datatypes: must be a mapping")
        datatypes = {}
    for name, rule in datatypes.items():
        if name not in types.elements and name not in types.primitives:
            out.append(f"datatypes.{name}: not a FHIR R4 datatype")
            continue
        _check_rule(f"datatypes.{name}", rule, name, out)
    paths = data.get("paths", {})
    if not isinstance(paths, Mapping):
        out.append("paths: must be a mapping")
        paths = {}
    for path, rule in paths.items():
        ptype = _path_type(types, str(path))
        if ptype is None:
            out.append(f"paths.{path}: not an element path in FHIR R4")
            continue
        _check_rule(f"paths.{path}", rule, ptype, out)
    _check_urls("extensions", data.get("extensions", {}), {"keep", "remove"}, out)
    _check_urls("modifier_extensions", data.get("modifier_extensions", {}), {"keep"}, out)
    return out


def _rule(raw: Mapping[str, Any]) -> Rule:
    return Rule(
        method=raw["method"],
        kind=raw.get("kind"),
        to=raw.get("to"),
        keep=tuple(raw.get("keep", ())),
        profile_switch=raw.get("profile_switch"),
    )


def rules_from_data(data: Mapping[str, Any], source: str = "<data>") -> Rules:
    problems = check_rules(data)
    if problems:
        raise RulesError(source, problems)
    return Rules(
        datatypes=MappingProxyType({k: _rule(v) for k, v in (data.get("datatypes") or {}).items()}),
        paths=MappingProxyType({k: _rule(v) for k, v in (data.get("paths") or {}).items()}),
        extensions=MappingProxyType({k: v["method"] for k, v in (data.get("extensions") or {}).items()}),
        modifier_extensions=frozenset((data.get("modifier_extensions") or {}).keys()),
        shapes=MappingProxyType(
            {
                url: _shape(rule)
                for section in ("extensions", "modifier_extensions")
                for url, rule in (data.get(section) or {}).items()
                if rule["method"] == "keep"
            }
        ),
    )


def _shape(rule: Mapping[str, Any]) -> ExtensionShape:
    parts = rule.get("parts") or {}
    return ExtensionShape(
        frozenset(rule.get("values") or ()),
        MappingProxyType({url: frozenset(values) for url, values in parts.items()}),
    )


def load_rules(path: str | Path = DEFAULT_RULES) -> Rules:
    """Read and validate a rules file; raises ``RulesError`` listing every problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yamlfile.load(fh)
    except yaml.YAMLError as exc:
        raise RulesError(Path(path).name, [yamlfile.problem(exc)]) from exc
    return rules_from_data(data, Path(path).name)
