"""Load and validate `mappings/pseudonym-inputs.yaml`: where the pseudonym inputs live in an nl-core Patient.

The mapping is data so that a profile change (a new extension URL, another address type) is a reviewed edit of
one file, not a code change. It is validated strictly at load time: a typo in a key would otherwise silently
switch a rule off and change pseudonyms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway import yamlfile
from gateway.pseudonym.nlps1 import TYPES

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "mappings" / "pseudonym-inputs.yaml"

# The fields the extractor can produce; the YAML chooses which ones each type uses, in which order.
FIELDS = frozenset(
    {"bsn", "name8", "name4", "birthdate", "sex", "initial", "pc6", "pc4", "housenumber", "suffix", "mrn"}
)
# Fields that two different usable values make ambiguous (two BSNs, two official names, two official
# addresses): the type is skipped with the field's ambiguous_reason rather than guessed.
AMBIGUOUS_FIELDS = frozenset(
    {"bsn", "mrn", "name8", "name4", "initial", "pc6", "pc4", "housenumber", "suffix"}
)
SEX_CODES = frozenset({"M", "V", "O"})
# Skip reasons end up in logs and OperationOutcomes: restricting them to slugs guarantees they hold no value.
_REASON = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


class MappingError(ValueError):
    """The mapping file is malformed; the message names the file and the offending key."""


@dataclass(frozen=True, slots=True)
class TypeSpec:
    fields: tuple[str, ...]
    skip_reasons: tuple[str, ...]  # one per field: the reason when that field cannot be produced


@dataclass(frozen=True, slots=True)
class InputMapping:
    bsn_system: str
    name_uses: frozenset[str]
    own_name_url: str
    own_prefix_url: str
    assembly_order_url: str
    family_fallback_when_order_absent: bool
    family_fallback_orders: frozenset[str]
    partner_name_urls: tuple[str, ...]
    given_qualifier_url: str
    given_qualifiers: frozenset[str]
    accept_unqualified_given: bool
    address_type_url: str
    preferred_address_type: str
    fallback_address_use: str
    house_number_url: str
    suffix_url: str
    sex_map: Mapping[str, str]
    sex_absent: str
    mrn_not_configured_reason: str
    ambiguous_reasons: Mapping[str, str]  # field -> skip reason when the Patient holds two different values
    types: Mapping[str, TypeSpec]


def load_input_mapping(path: Path | str | None = None) -> InputMapping:
    """Read and validate the mapping; default: the repository's `mappings/pseudonym-inputs.yaml`."""
    source = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = yamlfile.load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MappingError(f"{source}: cannot read the pseudonym input mapping ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MappingError(f"{source}: not valid YAML ({_yaml_where(exc)})") from None
    try:
        return parse_input_mapping(data)
    except MappingError as exc:
        raise MappingError(f"{source}: {exc}") from None


def parse_input_mapping(data: object) -> InputMapping:
    """Validate an already-parsed mapping document (for tests and for other config loaders)."""
    top = _section(data, "", {"version", "bsn", "name", "address", "sex", "mrn", "fields", "types"})
    if top["version"] != 1 or isinstance(top["version"], bool):
        raise MappingError("version: only version 1 is supported")
    bsn = _section(top["bsn"], "bsn", {"system"})
    name = _section(
        top["name"],
        "name",
        {
            "uses",
            "own_name_url",
            "own_prefix_url",
            "assembly_order_url",
            "family_fallback_when_order_absent",
            "family_fallback_orders",
            "partner_name_urls",
            "given_qualifier_url",
            "given_qualifiers",
            "accept_unqualified_given",
        },
    )
    address = _section(
        top["address"],
        "address",
        {"type_extension_url", "preferred_type", "fallback_use", "house_number_url", "suffix_url"},
    )
    sex = _section(top["sex"], "sex", {"map", "absent"})
    mrn = _section(top["mrn"], "mrn", {"not_configured_reason"})
    fields = _parse_fields(top["fields"])
    return InputMapping(
        bsn_system=_text(bsn["system"], "bsn.system"),
        name_uses=frozenset(_texts(name["uses"], "name.uses")),
        own_name_url=_text(name["own_name_url"], "name.own_name_url"),
        own_prefix_url=_text(name["own_prefix_url"], "name.own_prefix_url"),
        assembly_order_url=_text(name["assembly_order_url"], "name.assembly_order_url"),
        family_fallback_when_order_absent=_flag(
            name["family_fallback_when_order_absent"], "name.family_fallback_when_order_absent"
        ),
        family_fallback_orders=frozenset(
            _texts(name["family_fallback_orders"], "name.family_fallback_orders")
        ),
        partner_name_urls=tuple(_texts(name["partner_name_urls"], "name.partner_name_urls")),
        given_qualifier_url=_text(name["given_qualifier_url"], "name.given_qualifier_url"),
        given_qualifiers=frozenset(_texts(name["given_qualifiers"], "name.given_qualifiers")),
        accept_unqualified_given=_flag(name["accept_unqualified_given"], "name.accept_unqualified_given"),
        address_type_url=_text(address["type_extension_url"], "address.type_extension_url"),
        preferred_address_type=_text(address["preferred_type"], "address.preferred_type"),
        fallback_address_use=_text(address["fallback_use"], "address.fallback_use"),
        house_number_url=_text(address["house_number_url"], "address.house_number_url"),
        suffix_url=_text(address["suffix_url"], "address.suffix_url"),
        sex_map=_parse_sex_map(sex["map"]),
        sex_absent=_sex_code(sex["absent"], "sex.absent"),
        mrn_not_configured_reason=_reason(mrn["not_configured_reason"], "mrn.not_configured_reason"),
        ambiguous_reasons=MappingProxyType({f: fields[f]["ambiguous_reason"] for f in AMBIGUOUS_FIELDS}),
        types=_parse_types(top["types"], fields),
    )


def _parse_fields(data: object) -> dict[str, dict[str, str]]:
    if not isinstance(data, dict):
        raise MappingError("fields: expected a mapping of field name to its skip reasons")
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise MappingError(
            f"fields: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}"
        )
    missing = sorted(FIELDS - set(data))
    if missing:
        raise MappingError(f"fields: missing field(s) {', '.join(missing)}")
    parsed: dict[str, dict[str, str]] = {}
    for field_name, entry in data.items():
        where = f"fields.{field_name}"
        if field_name in AMBIGUOUS_FIELDS:
            allowed = required = {"skip_reason", "ambiguous_reason"}
        else:
            allowed = required = {"skip_reason"}
        section = _section(entry, where, allowed, required=required)
        parsed[field_name] = {key: _reason(value, f"{where}.{key}") for key, value in section.items()}
    return parsed


def _parse_types(data: object, fields: dict[str, dict[str, str]]) -> Mapping[str, TypeSpec]:
    if not isinstance(data, dict) or not data:
        raise MappingError("types: expected a non-empty mapping of pseudonym type to its fields")
    specs: dict[str, TypeSpec] = {}
    for type_name, entry in data.items():
        if type_name not in TYPES:
            raise MappingError(f"types: unknown pseudonym type {type_name!s}; known: {', '.join(TYPES)}")
        where = f"types.{type_name}"
        section = _section(entry, where, {"fields", "skip_reasons"}, required={"fields"})
        type_fields = tuple(_texts(section["fields"], f"{where}.fields"))
        if not type_fields:
            raise MappingError(f"{where}.fields: a type needs at least one field")
        for field_name in type_fields:
            if field_name not in FIELDS:
                raise MappingError(f"{where}.fields: unknown field {field_name}")
        if len(set(type_fields)) != len(type_fields):
            raise MappingError(f"{where}.fields: a field is listed twice")
        overrides = section.get("skip_reasons", {})
        if not isinstance(overrides, dict):
            raise MappingError(f"{where}.skip_reasons: expected a mapping of field to skip reason")
        for field_name, reason in overrides.items():
            if field_name not in type_fields:
                raise MappingError(f"{where}.skip_reasons: {field_name!s} is not one of this type's fields")
            _reason(reason, f"{where}.skip_reasons.{field_name}")
        reasons = tuple(overrides.get(f, fields[f]["skip_reason"]) for f in type_fields)
        specs[type_name] = TypeSpec(type_fields, reasons)
    return MappingProxyType(specs)


def _parse_sex_map(data: object) -> Mapping[str, str]:
    if not isinstance(data, dict) or not data:
        raise MappingError("sex.map: expected a mapping of Patient.gender code to M, V or O")
    return MappingProxyType(
        {_text(k, "sex.map (key)"): _sex_code(v, f"sex.map.{k}") for k, v in data.items()}
    )


def _section(data: object, where: str, allowed: set[str], required: set[str] | None = None) -> dict[str, Any]:
    label = where or "top level"
    if not isinstance(data, dict):
        raise MappingError(f"{label}: expected a mapping")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise MappingError(
            f"{label}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    missing = sorted((allowed if required is None else required) - set(data))
    if missing:
        raise MappingError(f"{label}: missing key(s) {', '.join(missing)}")
    return data


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MappingError(f"{where}: expected a non-empty string")
    return value


def _texts(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise MappingError(f"{where}: expected a list of strings")
    return [_text(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise MappingError(f"{where}: expected true or false")
    return value


def _reason(value: object, where: str) -> str:
    if not isinstance(value, str) or not _REASON.fullmatch(value):
        raise MappingError(f"{where}: expected a skip reason in lower-case-with-hyphens")
    return value


def _sex_code(value: object, where: str) -> str:
    if value not in SEX_CODES:
        raise MappingError(f"{where}: expected one of {', '.join(sorted(SEX_CODES))}")
    return str(value)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "syntax error"
