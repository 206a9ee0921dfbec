"""Structure (official HL7 R4 JSON Schema, via jsonschema-rs) and the Bundle rules of a registry delivery.

Schema: one compiled validator per resource type, built lazily from `definitions/<Type>` and kept in the
`SchemaValidator` the caller owns (compiling one type costs ~0.1 s; all 146 together would cost ~15 s, and
`validator_map_for` over the whole schema ~90 s). Two deliberate changes to the definitions, both so that the
result is *stricter or equal*, never looser:

- `ResourceList` (the `oneOf` over all 146 resource types used by `contained`, `Bundle.entry.resource`,
  `Bundle.entry.response.outcome` and `Parameters.parameter.resource`) is replaced by "an object with a
  string resourceType", and each nested resource is validated by its own type's validator. Same coverage as
  the `oneOf` (dispatch on resourceType, as the schema's `discriminator` says), but linear cost and errors
  that point at the right place instead of 146 failed branches.
- `integer`, `positiveInt` and `unsignedInt` (also where inlined, e.g. `valueInteger`) get JSON `integer`
  type and the 32-bit bounds of the FHIR spec: the official schema types them as `number` with a `pattern`,
  which JSON Schema ignores for numbers.
- Complex types and resources get `type: object`: the official schema omits it, so `"class": "IMP"` or an
  array where a Coding belongs would pass (`properties`/`additionalProperties` only constrain objects).
- `date`, `dateTime` and `instant` (also inlined, e.g. `effectiveDateTime`) must be calendar dates ("Dates
  SHALL be valid dates", says the spec; its pattern admits `2026-02-30`): a `format` whose check looks at
  the day only when it is past the 28th.
- Required primitives (`Observation.status`, 1..1): the official `required` leaves them out; each gets an
  `anyOf` of the value or its `_x` extensions (FHIR allows `_status` alone).
- Choice elements: one variant at most, and exactly one where the element is required
  (`MedicationStatement.medication[x]`): per choice element a `oneOf` over "this variant is present" (a
  primitive also as its `_x` extensions), plus "none is present" when it is optional; all in one `allOf`.
  The official schema cannot say either, so an Observation with both `valueString` and `valueBoolean`, or
  a MedicationStatement without any medication, passed. The lists are `R4Types.choices`/`required_choices`.
  A `oneOf` is linear in the variants: forbidding pairs (`dependencies`) cost 12 MB more per process.

Error texts are built here from the error kind and the schema path, never from jsonschema-rs's message
(which quotes the instance value).
"""

from __future__ import annotations

import calendar
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jsonschema_rs
import orjson

from gateway.deid.r4 import R4Types, r4
from gateway.fhirurls import ABSOLUTE, RESTFUL_TAIL, restful_base
from gateway.outcome import FhirError, Issue
from gateway.pipeline.parse import safe_name

MAX_ISSUES = 100
ALLOWED_BUNDLE_TYPES = frozenset({"transaction", "batch", "collection"})
BSN_SYSTEMS = frozenset({"http://fhir.nl/fhir/NamingSystem/bsn", "urn:oid:2.16.840.1.113883.2.4.6.3"})

_NESTED_RESOURCE = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string"}},
}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
# FHIR integer types by the pattern the official schema gives them (as `number`, where JSON Schema ignores
# patterns). They appear as definitions and inlined in choice elements (valueInteger, multipleBirthInteger).
_INTEGER_BY_PATTERN = {
    "^-?([0]|([1-9][0-9]*))$": _INT32,
    "^[1-9][0-9]*$": {**_INT32, "minimum": 1},
    "^[0]|([1-9][0-9]*)$": {**_INT32, "minimum": 0},
}
_DATE_TYPES = frozenset({"date", "dateTime", "instant", "time"})
# the primitive types of R4's choice elements (value[x], effective[x], onset[x]...)
_CHOICE_PRIMITIVES = _DATE_TYPES | {
    "base64Binary", "boolean", "canonical", "code", "decimal", "id", "integer", "markdown", "oid",
    "positiveInt", "string", "unsignedInt", "uri", "url", "uuid",
}
_CONTAINERS = frozenset({"Bundle", "Parameters"})
_REFERENCE_KEYS = frozenset({"id", "extension", "reference", "type", "identifier", "display"})


class SchemaValidator:
    """Per-resource-type validators compiled once from the official R4 JSON Schema (lazily, on first use)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        definitions = dict(schema["definitions"])
        self.resource_types = frozenset(
            ref["$ref"].rsplit("/", 1)[1] for ref in definitions["ResourceList"]["oneOf"]
        )
        definitions["ResourceList"] = _NESTED_RESOURCE
        self._definitions = _tightened(definitions)
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> SchemaValidator:
        return cls(orjson.loads(Path(path).read_bytes()))

    def warm(self, resource_types: list[str] | None = None) -> None:
        """Compile ahead of the first request (all types takes ~15 s; pass the types you expect)."""
        for rtype in resource_types or sorted(self.resource_types):
            self._validator(rtype)

    def _validator(self, rtype: str) -> Any:
        compiled = self._compiled.get(rtype)
        if compiled is None:
            schema = {"$ref": f"#/definitions/{rtype}", "definitions": self._definitions}
            compiled = self._compiled[rtype] = jsonschema_rs.Draft6Validator(
                schema, formats={_CALENDAR: _calendar_date}, validate_formats=True
            )
        return compiled

    def validate_resource(self, resource: Any, path_prefix: str | None = None) -> list[Issue]:
        """Schema issues of `resource` and every resource nested in it; expressions start at `path_prefix`."""
        issues: list[Issue] = []
        self._collect(resource, path_prefix, issues)
        return issues[:MAX_ISSUES]

    def _collect(self, resource: Any, prefix: str | None, issues: list[Issue]) -> None:
        if len(issues) >= MAX_ISSUES:
            return
        if not isinstance(resource, dict):
            issues.append(Issue("structure", "a resource must be a JSON object", _expr(prefix or "Resource")))
            return
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in self.resource_types:
            issues.append(Issue("not-supported", "resourceType is not an R4 resource type", _expr(prefix)))
            return
        prefix = prefix or rtype
        if len(resource) > _MOST_ELEMENTS and self._unknown_elements(resource, rtype, prefix, issues):
            return
        validator = self._compiled.get(rtype) or self._validator(rtype)
        if not validator.is_valid(resource):  # fast path: errors are only materialised for invalid input
            for error in validator.iter_errors(resource):
                issues.extend(_issues_of(error, prefix))
                if len(issues) >= MAX_ISSUES:
                    return
        if "contained" in resource or rtype in _CONTAINERS:  # most resources nest nothing: skip the generator
            for path, nested in _nested_resources(resource, rtype):
                if path.startswith("contained[") and isinstance(nested, dict) and "contained" in nested:
                    # R4 dom-2; a re-probe's relative, contained in a contained Location, was never sought
                    text = "a contained resource must not contain resources (dom-2)"
                    issues.append(Issue("invariant", text, (f"{prefix}.{path}.contained",)))
                self._collect(nested, f"{prefix}.{path}", issues)


    def _unknown_elements(self, resource: dict, rtype: str, prefix: str, issues: list[Issue]) -> bool:
        """More keys than any R4 resource has elements: found here, in Python, which lets other threads
        run. jsonschema-rs holds the GIL for the whole call, and a probe's 600,000 unknown elements held
        the event loop for seconds while another thread validated them."""
        known = self._definitions[rtype].get("properties", {}).keys()
        unknown = [name for name in resource if name not in known]
        issues.extend(_unknown_element(prefix, name) for name in unknown[: MAX_ISSUES - len(issues)])
        return bool(unknown)


# No R4 resource has more elements than this (with their `_x` siblings): more keys cannot all be elements.
_MOST_ELEMENTS = 300


def _tightened(definitions: dict[str, Any]) -> dict[str, Any]:
    """Copies of the definitions with what the official schema leaves out (never looser):
    complex types and resources must be JSON objects (the schema has `properties` but no `type`, so a string
    or an array where a Coding belongs would pass), FHIR integers must be 32-bit JSON integers, dates are
    calendar dates, required primitives are there, and a choice element comes in one variant at most
    (exactly one where it is required)."""
    types = r4()
    dates = {definitions[t]["pattern"] for t in _DATE_TYPES if "pattern" in definitions.get(t, {})}
    result = {}
    for name, definition in definitions.items():
        definition = _calendar(dict(definition), dates)
        if "properties" in definition and "type" not in definition:
            definition["type"] = "object"
            definition["properties"] = {
                k: _calendar(_integer(v), dates) for k, v in definition["properties"].items()
            }
        rules = _element_rules(types, name)
        if rules:
            if "allOf" in definition:  # the official R4 schema has none; ours would replace it
                raise ValueError(f"schema definition {name} has an allOf already")
            definition["allOf"] = rules
        result[name] = _integer(definition)
    return result


_CALENDAR = "fhir-calendar-date"


def _calendar(schema: Any, date_patterns: set[str]) -> Any:
    """A date, dateTime or instant (by the official pattern) must also be a real calendar date."""
    if isinstance(schema, dict) and schema.get("pattern") in date_patterns:
        return {**schema, "format": _CALENDAR}
    return schema


def _calendar_date(value: str) -> bool:
    """The official pattern has checked the shape, a month of 01-12 and a day of 01-31: only a day past the
    28th can be impossible (2026-02-30, 2025-04-31). Partial dates have no day."""
    if value[8:10] <= "28":
        return True
    try:  # the pattern is checked too, and reports a wrong shape ("${DATE}", "23-07-1961") by itself
        year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
        return day <= calendar.monthrange(year, month)[1]
    except ValueError:  # calendar.IllegalMonthError is one
        return True


def _element_rules(types: R4Types, definition: str) -> list[dict[str, Any]]:
    """What the official schema leaves out, in `_rule_names` order (`_rule_error` maps an error back): one
    `oneOf` per choice element, then one `anyOf` per required primitive (`status`, or `_status` only)."""
    rules = _choice_rules(types, definition) if definition in types.choices else []
    for name in types.required_primitives.get(definition, ()):
        rules.append(_present(types, definition, name))
    return rules


def _present(types: R4Types, definition: str, name: str) -> dict[str, Any]:
    """The element is there, as its value or (a primitive) as its `_x` extensions."""
    forms = types.forms(definition, name)
    return {"required": [name]} if len(forms) == 1 else {"anyOf": [{"required": [f]} for f in forms]}


def _rule_names(definition: str) -> list[str]:
    """The element each of `_element_rules`' rules is about: `medication[x]`, ..., `status`, ..."""
    types = r4()
    stems = [f"{stem}[x]" for stem in types.choices.get(definition, ())]
    return stems + list(types.required_primitives.get(definition, ()))


def _choice_rules(types: R4Types, definition: str) -> list[dict[str, Any]]:
    """One `oneOf` per choice element, in `types.choices` order."""
    required = types.required_choices.get(definition, ())
    rules = []
    for stem, variants in types.choices[definition].items():
        present = [_present(types, definition, v) for v in variants]
        if stem not in required:  # or none of them: one enum over the names, smaller than a `not anyOf`
            names = list(types.choice_names(definition, stem))
            present.append({"propertyNames": {"not": {"enum": names}}})
        rules.append({"oneOf": present})
    return rules


def _rule_error(kind_name: str, schema_path: list[str | int], where: str) -> Issue | None:
    """The Issue for an error of our element rules (`.../<Type>/allOf/<n>/oneOf|anyOf`), else None."""
    if len(schema_path) < 4 or schema_path[-1] not in ("oneOf", "anyOf") or schema_path[-3] != "allOf":
        return None
    names = _rule_names(str(schema_path[-4]))
    n = schema_path[-2]
    if not isinstance(n, int) or n >= len(names):
        return None
    element = names[n]
    if kind_name == "OneOfMultipleValid":
        return Issue("structure", f"'{element}' given in more than one type", (f"{where}.{element}",))
    return Issue("required", f"missing required element '{element}'", (f"{where}.{element}",))


def _integer(schema: Any) -> Any:
    if isinstance(schema, dict) and schema.get("type") == "number":
        stricter = _INTEGER_BY_PATTERN.get(schema.get("pattern"))
        if stricter is not None:
            return {**schema, **stricter}
    return schema


def _expr(expression: str | None) -> tuple[str, ...]:
    return (expression,) if expression else ()


def _nested_resources(resource: dict, rtype: str) -> Iterator[tuple[str, Any]]:
    """The places where the R4 schema uses ResourceList; they are validated by their own type."""
    contained = resource.get("contained")
    if isinstance(contained, list):
        for i, item in enumerate(contained):
            yield f"contained[{i}]", item
    if rtype == "Bundle":
        entries = resource.get("entry")
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            if not isinstance(entry, dict):
                continue
            if "resource" in entry:
                yield f"entry[{i}].resource", entry["resource"]
            response = entry.get("response")
            if isinstance(response, dict) and "outcome" in response:
                yield f"entry[{i}].response.outcome", response["outcome"]
    elif rtype == "Parameters":
        yield from _parameter_resources(resource.get("parameter"), "parameter")


def _parameter_resources(parameters: Any, path: str) -> Iterator[tuple[str, Any]]:
    for i, param in enumerate(parameters if isinstance(parameters, list) else ()):
        if isinstance(param, dict):
            if "resource" in param:
                yield f"{path}[{i}].resource", param["resource"]
            yield from _parameter_resources(param.get("part"), f"{path}[{i}].part")


def _path(prefix: str, instance_path: list[str | int]) -> str:
    parts = [prefix]
    for step in instance_path:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(f".{safe_name(step) or '?'}")
    return "".join(parts)


def _schema_type(schema_path: list[str | int]) -> str | None:
    """The FHIR type whose definition raised the error: the step after the last `definitions`."""
    for i in range(len(schema_path) - 2, -1, -1):
        if schema_path[i] == "definitions":
            step = schema_path[i + 1]
            return step if isinstance(step, str) else None
    return None


def _issues_of(error: Any, prefix: str) -> list[Issue]:
    """Map one jsonschema-rs error to Issues with our own texts (the library's message quotes the value)."""
    kind = error.kind
    kind_name = type(kind).__name__
    where = _path(prefix, error.instance_path)
    if kind_name == "AdditionalProperties":
        return [_unknown_element(where, name) for name in kind.unexpected]
    if kind_name == "Required":
        name = safe_name(kind.property)
        text = f"missing required element '{name}'" if name else "missing required element"
        return [Issue("required", text, (f"{where}.{name}" if name else where,))]
    ftype = _schema_type(error.schema_path)
    if kind_name.startswith("OneOf") or kind_name == "AnyOf":
        rule = _rule_error(kind_name, list(error.schema_path), where)
        if rule:
            return [rule]
    if kind_name == "Type":
        expected = " or ".join(sorted(str(t) for t in kind.types))
        return [Issue("structure", f"wrong JSON type, expected {expected}", (where,))]
    if kind_name == "Format":
        return [Issue("value", "not a real calendar date (e.g. 30 February)", (where,))]
    if kind_name == "Pattern":
        return [Issue("value", _pattern_text(_choice_type(error.schema_path) or ftype), (where,))]
    if kind_name == "Enum":
        return [Issue("code-invalid", "code is not one of the values allowed for this element", (where,))]
    if kind_name == "Constant":
        return [
            Issue(
                "value", "value differs from the fixed value (e.g. resourceType of the wrong type)", (where,)
            )
        ]
    if kind_name in ("Minimum", "Maximum", "ExclusiveMinimum", "ExclusiveMaximum"):
        return [Issue("value", f"number out of range for FHIR {ftype or 'number'}", (where,))]
    return [Issue("invalid", f"does not conform to the FHIR R4 schema ({kind_name})", (where,))]


def _unknown_element(where: str, name: Any) -> Issue:
    shown = safe_name(name)
    if shown is None:
        return Issue("structure", "unknown element (name not shown)", (where,))
    text = f"unknown element '{shown}' (not in FHIR R4: misspelt, or STU3/R5 content?)"
    return Issue("structure", text, (f"{where}.{shown}",))


def _choice_type(schema_path: Any) -> str | None:
    """The type of a choice element whose pattern is checked in its resource's definition (the compiled
    choice rules): `effectiveDateTime` is a dateTime (a probe read "not a valid FHIR Observation")."""
    path = list(schema_path)
    if len(path) < 3 or path[-1] != "pattern" or path[-3] != "properties" or not isinstance(path[-2], str):
        return None
    name = path[-2]
    for i, letter in enumerate(name):
        suffix = name[i].lower() + name[i + 1 :]
        if letter.isupper() and suffix in _CHOICE_PRIMITIVES:
            return suffix
    return None


def _pattern_text(ftype: str | None) -> str:
    if ftype in _DATE_TYPES:
        return f"not a valid FHIR {ftype} (wrong format, impossible date, or a template placeholder)"
    if ftype:
        return f"not a valid FHIR {ftype}"
    return "value does not match the required format"


# --- Bundle rules ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientEntry:
    index: int  # position in Bundle.entry
    full_url: str | None
    resource: dict


@dataclass
class BundleIndex:
    """What later stages need: who the patients are and which entry refers to which.

    `references[i]` is the set of entry indices that entry i refers to (from anywhere inside it, contained
    resources included). `external_references` lists (entry index, reference) pairs that point outside the
    Bundle (the de-identification stage must rewrite or drop them; they are input values: never log them);
    `issues` holds warnings only (value-free). The index is read-only once built (the reverse graph is
    cached).
    """

    bundle_type: str
    patients: list[PatientEntry]
    by_full_url: dict[str, int]
    references: list[set[int]]
    external_references: list[tuple[int, str]] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @cached_property
    def referenced_by(self) -> list[set[int]]:
        """The reverse graph: for each entry, the entries that refer to it (computed once)."""
        reverse: list[set[int]] = [set() for _ in self.references]
        for source, targets in enumerate(self.references):
            for target in targets:
                reverse[target].add(source)
        return reverse


def resources_of_patient(index: BundleIndex, patient_entry: PatientEntry | int) -> set[int]:
    """Entry indices that belong to the patient: the Patient itself plus every entry that refers to it,
    directly or through other entries (an Observation → its Encounter → the Patient), cycles included.

    Over-inclusion is the safe direction: the opt-out stage drops all of these for an objecting patient, so
    an entry that refers to two patients belongs to both.
    """
    start = patient_entry.index if isinstance(patient_entry, PatientEntry) else patient_entry
    return resources_of_patients(index, [start])


def resources_of_patients(index: BundleIndex, starts: Iterable[int]) -> set[int]:
    """`resources_of_patient` of several patients (entry indices) at once, in one walk."""
    reverse = index.referenced_by
    seen = set(starts)
    queue = deque(seen)
    while queue:
        for source in reverse[queue.popleft()]:
            if source not in seen:
                seen.add(source)
                queue.append(source)
    return seen


def _check_resource_type(bundle: dict, validator: SchemaValidator) -> None:
    rtype = bundle.get("resourceType")
    if rtype not in validator.resource_types:
        raise FhirError.single(
            400, "not-supported", "resourceType is not an R4 resource type", "resourceType"
        )
    if rtype != "Bundle":
        raise FhirError.single(422, "not-supported", "expected a Bundle", "resourceType")


def _check_bundle_type(bundle: dict, allowed_types: frozenset[str]) -> None:
    bundle_type = bundle.get("type")
    if bundle_type is None:
        # The JSON Schema cannot require primitives (they may come as `_type` extensions only); R4 says 1..1.
        raise FhirError.single(400, "required", "missing required element 'type'", "Bundle.type")
    if bundle_type not in allowed_types:
        allowed = ", ".join(sorted(allowed_types))
        raise FhirError.single(422, "not-supported", f"Bundle.type must be one of: {allowed}", "Bundle.type")


def validate_bundle(
    bundle: dict,
    validator: SchemaValidator,
    *,
    require_patient: bool = True,
    allowed_types: frozenset[str] = ALLOWED_BUNDLE_TYPES,
) -> BundleIndex:
    """Schema-validate a posted Bundle, apply the delivery rules and index patients and references.

    Raises FhirError: 400 with the schema issues, or 422 with every business-rule violation found.
    """
    _check_resource_type(bundle, validator)
    schema_issues = validator.validate_resource(bundle, "Bundle")
    if schema_issues:
        raise FhirError(400, schema_issues)
    _check_bundle_type(bundle, allowed_types)
    bundle_type = bundle["type"]
    entries = bundle.get("entry", [])
    errors: list[Issue] = []
    _check_entries_have_resources(entries, errors)
    by_full_url = _full_url_index(entries, errors)
    _check_unique_ids(entries, by_full_url, errors)
    patients = [
        PatientEntry(i, e.get("fullUrl"), e["resource"])
        for i, e in enumerate(entries)
        if e.get("resource", {}).get("resourceType") == "Patient"
    ]
    if require_patient and not patients:
        errors.append(
            Issue("business-rule", "a registry delivery needs a Patient in the Bundle", ("Bundle.entry",))
        )
    resolver = _Resolver(entries, by_full_url, patients, loose_urns=bundle_type == "collection")
    references = [resolver.entry_references(i, e) for i, e in enumerate(entries)]
    errors.extend(resolver.errors)
    if errors:
        raise FhirError(422, errors[:MAX_ISSUES])
    return BundleIndex(
        bundle_type, patients, by_full_url, references, resolver.external, resolver.warnings[:MAX_ISSUES]
    )


_ENTRY_PARTS = ("request", "response", "search")


def _check_entries_have_resources(entries: list[dict], errors: list[Issue]) -> None:
    """Every entry carries a resource, its request (if any) is a POST or PUT, and no part of the entry
    carries a modifier extension."""
    for i, entry in enumerate(entries):
        if "resource" not in entry:
            text = "entry without a resource (requests such as DELETE are not forwarded)"
            errors.append(Issue("required", text, (f"Bundle.entry[{i}]",)))
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        if "resource" in entry and request is not None and method not in ("POST", "PUT"):
            # delivered, it would be a PUT: a deletion in the EHR an upsert at the registry; a method given
            # only as `_method` extensions may be anything
            text = "only POST and PUT entries are forwarded; a DELETE (or another request) is not"
            errors.append(Issue("not-supported", text, (f"Bundle.entry[{i}].request.method",)))
        # a modifier changes what the entry means, which the gateway cannot know: its resource was
        # delivered as if the modifier were not there
        parts = [(f"Bundle.entry[{i}]", entry)]
        parts += [(f"Bundle.entry[{i}].{name}", entry.get(name)) for name in _ENTRY_PARTS]
        for where, part in parts:
            if isinstance(part, dict) and "modifierExtension" in part:
                text = "a modifier extension on an entry or its request: its meaning is unknown"
                errors.append(Issue("not-supported", text, (f"{where}.modifierExtension",)))


def _full_url_index(entries: list[dict], errors: list[Issue]) -> dict[str, int]:
    by_full_url: dict[str, int] = {}
    for i, entry in enumerate(entries):
        full_url = entry.get("fullUrl")
        if full_url is None:
            continue
        first = by_full_url.setdefault(full_url, i)
        if first != i:
            if _version_id(entries[i]) != _version_id(entries[first]):
                # allowed by R4 (bdl-7), but which version would the registry get? One per Bundle, please.
                text = f"another version of the resource of entry {first}: send one version per Bundle"
            else:
                text = f"duplicate fullUrl (the same as entry {first})"
            errors.append(Issue("duplicate", text, (f"Bundle.entry[{i}].fullUrl",)))
    return by_full_url


def _check_unique_ids(entries: list[dict], by_full_url: dict[str, int], errors: list[Issue]) -> None:
    """Two resources of one Bundle with the same type and id (under different fullUrls): the pseudonymised
    id of each comes from its type and id, so which one the registry gets under which id would depend on
    their order, and a re-post in another order would swap two patients' records at the registry."""
    first_of: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries):
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if type(rtype) is not str or type(rid) is not str:
            continue
        full_url = entry.get("fullUrl")
        if full_url is not None and by_full_url.get(full_url) != i:
            continue  # reported already: the same fullUrl twice
        first = first_of.setdefault((rtype, rid), i)
        if first != i:
            text = (
                f"the same resource type and id as the resource of entry {first}: two resources of one "
                "Bundle cannot share an id (send each resource once, with the id it has in the EHR)"
            )
            errors.append(Issue("duplicate", text, (f"Bundle.entry[{i}].resource.id",)))


def _version_id(entry: dict) -> Any:
    resource = entry.get("resource")
    meta = resource.get("meta") if isinstance(resource, dict) else None
    return meta.get("versionId") if isinstance(meta, dict) else None


# Reference forms. Matching runs over orjson's compact output of each entry: inside a JSON string every quote
# is escaped, so `"reference":"` can only match a real `reference` property; this finds every reference in an
# entry (contained and nested resources included) at C speed, with no Python walk over the resource.
_REFERENCE_VALUE = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')  # unrolled: ~2.5x faster
_URL_VALUE = re.compile(rb'"url":"([^"\\]*)"')
_PATIENT_TYPE = b'"resourceType":"Patient"'
_LOGICAL_HINT = b'"identifier":{'
_CONDITIONAL = re.compile(r"([A-Z][A-Za-z]+)\?(.*)", re.DOTALL)
_UNSEEN: Any = object()
_SUBJECT_PATH = re.compile(r"\.resource\.(?:subject|patient)(?:\[\d+\])?$")


class _Resolver:
    """Resolves reference strings to entry indices (liberally: the result drives what an opt-out drops)."""

    def __init__(
        self,
        entries: list[dict],
        by_full_url: dict[str, int],
        patients: list[PatientEntry],
        *,
        loose_urns: bool = False,
    ) -> None:
        self.entries = entries
        self.by_full_url = by_full_url
        # A transaction or batch must carry what its urn: references name (FHIR); a collection (a Bulk Data
        # export's patient group) may point at a resource the export left out, like a `Type/id` may
        self.loose_urns = loose_urns
        self._warned: set[str] = set()
        self._dangling_seen: dict[tuple[int, str], int] = {}  # (entry, reference) -> occurrences reported
        self._type_identifiers: dict[str, dict[tuple[str | None, str], set[int]]] = {}
        self.restful_urls = any(not url.startswith("urn:") for url in by_full_url)
        self.patient_identifiers = _identifier_index(patients)
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.external: list[tuple[int, str]] = []
        # `Type/id` references that resolved without a RESTful base (bulk exports name the same patient in
        # every line): answered from here next time. Only filled when no entry has a RESTful fullUrl, because
        # then a relative reference means the same in every entry.
        self.relative_hits: dict[str, set[int]] = {}
        self._followable: dict[str, str | None] = {}  # `_unfollowable` of each subject reference seen

    @cached_property
    def by_uuid(self) -> dict[str, int]:
        """`urn:uuid:` fullUrls in lower case (computed only when a reference misses in its own case)."""
        urls = reversed(self.by_full_url.items())  # the first of two that differ in case only wins
        return {url.lower(): i for url, i in urls if url.startswith("urn:uuid:")}

    @cached_property
    def by_type_id(self) -> dict[str, list[int]]:
        return _type_id_index(self.entries)  # built only when a relative reference needs it

    def entry_references(self, i: int, entry: dict) -> set[int]:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            return set()  # already reported as an entry without a resource
        dumped = orjson.dumps(resource)
        if dumped.count(_PATIENT_TYPE) != int(resource.get("resourceType") == "Patient"):
            self._nested_patient(i, resource)
        targets: set[int] = set()
        by_full_url, relative_hits = self.by_full_url, self.relative_hits
        for raw in _REFERENCE_VALUE.findall(dumped):
            ref = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
            hit = by_full_url.get(ref)  # the common case (urn:uuid / fullUrl), without the call
            if hit is not None:
                targets.add(hit)
            elif ref in relative_hits:
                targets |= relative_hits[ref]
            else:
                targets |= self._resolve(i, entry, ref)
        if b'"url":"urn:' in dumped or self.restful_urls:
            # Attachment.url may point at a Binary entry (a document's content): an edge when it names an
            # entry of this Bundle, ignored otherwise (extension URLs, web links).
            for raw in _URL_VALUE.findall(dumped):
                hit = self.by_full_url.get(raw.decode(errors="replace"))
                if hit is not None:
                    targets.add(hit)
        if _LOGICAL_HINT in dumped:
            targets |= self._logical_references(i, resource)
        if "subject" in resource or "patient" in resource:
            self._check_subject(i, resource)
        if "link" in resource and resource.get("resourceType") == "Patient":
            self._check_links(i, resource)
        return targets

    def _check_links(self, i: int, patient: dict) -> None:
        """A Patient.link names another record of the same person: one named by display only cannot be
        followed, and that record's objection could not be checked."""
        links = patient.get("link")
        for n, link in enumerate(links if isinstance(links, list) else ()):
            other = link.get("other") if isinstance(link, dict) else None
            if not isinstance(other, dict):
                continue  # the schema requires it
            if "reference" not in other and not isinstance(other.get("identifier"), dict):
                text = "Patient.link names no record that can be followed (display only): send a reference"
                self.errors.append(Issue("not-found", text, (f"Bundle.entry[{i}].resource.link[{n}].other",)))

    def _check_subject(self, i: int, resource: dict) -> None:
        """The element that says whose data a resource is (`subject`, `patient`) must name its target in a
        way that can be followed: else it could be an objecting patient's, and opt-out could not drop it.
        A reference in an unrecognised format ("patient/p1", "Patient/p1?x", "Patient/ p1"), to a contained
        resource that is not there, or none at all (display only) is refused; one that resolves, a Patient
        that is not in the Bundle (refused already) or another type of resource elsewhere (a Group) is not
        this check's."""
        for key in ("subject", "patient"):
            value = resource.get(key)
            for n, ref in enumerate(value if isinstance(value, list) else [value]):
                if not isinstance(ref, dict):
                    continue
                target = ref.get("reference")
                if type(target) is str and (target in self.by_full_url or target in self.relative_hits):
                    continue  # the common case: it resolved to an entry
                if type(target) is str and not target.startswith("#"):  # the same few patients, over and over
                    text = self._followable.get(target, _UNSEEN)
                    if text is _UNSEEN:
                        text = self._followable[target] = _unfollowable(ref, resource)
                else:
                    text = _unfollowable(ref, resource)
                if text is not None and len(self.errors) < MAX_ISSUES:
                    nth = f"[{n}]" if isinstance(value, list) else ""
                    where = f"Bundle.entry[{i}].resource.{key}{nth}"
                    self.errors.append(Issue("not-found", text, (where,)))

    def _nested_patient(self, i: int, resource: dict) -> None:
        """A Patient other than the entry's own resource appears in it (counted in the compact JSON)."""
        where = f"Bundle.entry[{i}].resource"
        for j, item in enumerate(resource.get("contained") or ()):
            if isinstance(item, dict) and item.get("resourceType") == "Patient":
                where = f"Bundle.entry[{i}].resource.contained[{j}]"
                break
        text = "a Patient inside another resource (contained or nested) cannot be pseudonymised reliably"
        self.errors.append(Issue("business-rule", text, (where,)))

    def _resolve(self, i: int, entry: dict, ref: str) -> set[int]:
        resource = entry["resource"]
        if ref.startswith("#"):
            return set()  # a contained resource: part of this entry already
        hit = self.by_full_url.get(ref)
        if hit is None and ref.startswith("urn:uuid:"):
            hit = self.by_uuid.get(ref.lower())  # a UUID is the same in either case (RFC 4122)
        if hit is not None:
            return {hit}
        if ref.startswith("urn:"):
            if self.loose_urns and not _names_whose(resource, ref):
                self._warn(i, resource, ref, "reference to a resource that is not in the Bundle")
            else:
                self._dangling(i, resource, ref, "reference to a urn: fullUrl that is not in the Bundle")
            return set()
        conditional = _CONDITIONAL.fullmatch(ref)
        if conditional and not ABSOLUTE.match(ref):
            return self._conditional(i, resource, ref, conditional.group(1), conditional.group(2))
        tail = RESTFUL_TAIL.search(ref)
        if tail is None:
            self._warn(i, resource, ref, "reference in an unrecognised format")
            return set()
        rtype, rid = tail.group(1), tail.group(2)
        versionless = ref.split("/_history/", 1)[0]
        if versionless in self.by_full_url:
            return {self.by_full_url[versionless]}
        if ABSOLUTE.match(ref):
            if rtype == "Patient":
                self._dangling(i, resource, ref, "reference to a Patient on another server")
            else:
                self._warn(i, resource, ref, "reference to another server")
            return set()
        base = restful_base(entry.get("fullUrl"))
        if base is None:
            # No RESTful base to resolve against (urn:uuid or absent fullUrl): match Type/id liberally.
            found = self.by_type_id.get(f"{rtype}/{rid}")
            if found:
                if not self.restful_urls and ref == f"{rtype}/{rid}":
                    self.relative_hits[ref] = set(found)
                return set(found)
        elif base + versionless in self.by_full_url:
            # FHIR rule: a relative reference resolves against the base of the referring entry's fullUrl.
            return {self.by_full_url[base + versionless]}
        if rtype == "Patient":
            self._dangling(i, resource, ref, "reference to a Patient that is not in the Bundle")
        else:
            self._warn(i, resource, ref, "reference to a resource that is not in the Bundle")
        return set()

    def _conditional(self, i: int, resource: dict, ref: str, rtype: str, query: str) -> set[int]:
        if rtype != "Patient" and ref in self._warned:
            # The same unresolvable reference again (Synthea repeats a few in every entry): record, skip.
            self.external.append((i, ref))
            return set()
        params = parse_qsl(query, keep_blank_values=True)
        if not params or any(name != "identifier" for name, _ in params):
            if rtype == "Patient":
                text = "conditional Patient reference with search parameters other than identifier"
                self._dangling(i, resource, ref, text)
            else:
                self._warn(i, resource, ref, "conditional reference that cannot be resolved in the Bundle")
            return set()
        index = self.patient_identifiers if rtype == "Patient" else self._identifiers_of_type(rtype)
        targets: set[int] = set()
        for _, token in params:
            system, sep, value = token.rpartition("|")
            targets |= _match_identifier(index, system if sep else None, value)
        if targets:
            return targets
        if rtype == "Patient":
            self._dangling(
                i, resource, ref, "conditional Patient reference that matches no Patient in the Bundle"
            )
        else:
            self._warn(i, resource, ref, "conditional reference to a resource that is not in the Bundle")
        return set()

    def _identifiers_of_type(self, rtype: str) -> dict[tuple[str | None, str], set[int]]:
        """Identifier index per resource type, built once per Bundle (Synthea refers to every Organization
        and Practitioner by a conditional reference: rebuilding it per reference was quadratic)."""
        found = self._type_identifiers.get(rtype)
        if found is None:
            found = self._type_identifiers[rtype] = _identifier_index_of_type(self.entries, rtype)
        return found

    def _logical_references(self, i: int, resource: dict) -> set[int]:
        """References by identifier only (`subject: {identifier: {system, value}}`), found by a slow walk that
        runs only for entries whose compact JSON shows an object-valued `identifier`."""
        targets: set[int] = set()
        for path, ref in _walk_references(resource, f"Bundle.entry[{i}].resource", top=True):
            identifier = ref.get("identifier")
            if "reference" in ref or not isinstance(identifier, dict):
                continue
            system, value = identifier.get("system"), identifier.get("value")
            hits = (
                _match_identifier(self.patient_identifiers, system, value)
                if isinstance(value, str)
                else set()
            )
            targets |= hits
            # says whose data it is, or links another record of the patient: must be followed
            linked = resource.get("resourceType") == "Patient" and ".resource.link[" in path
            whose = _SUBJECT_PATH.search(path) is not None or (linked and ref.get("type") != "RelatedPerson")
            if not hits and (ref.get("type") == "Patient" or system in BSN_SYSTEMS or whose):
                text = "logical reference (by identifier) to a Patient that is not in the Bundle"
                self.errors.append(Issue("not-found", text, (path,)))
        return targets

    def _dangling(self, i: int, resource: dict, ref: str, text: str) -> None:
        if len(self.errors) < MAX_ISSUES:  # the rest would be cut anyway; locating each walks the resource
            nth = self._dangling_seen.get((i, ref), 0)
            self._dangling_seen[(i, ref)] = nth + 1
            where = _reference_path(i, resource, ref, nth)
            if resource.get("resourceType") == "Patient" and ".resource.link[" in where:
                # a merged or linked record of the same person: its objection would go unchecked
                text = "Patient.link names a Patient record not in the Bundle: send it too, or no link"
            self.errors.append(Issue("not-found", text, (where,)))

    def _warn(self, i: int, resource: dict, ref: str, text: str) -> None:
        self.external.append((i, ref))
        # Locating a reference walks the resource, so only the first place of each distinct reference is
        # reported (Synthea names the same few Organizations in every entry), up to MAX_ISSUES.
        if ref in self._warned or len(self.warnings) >= MAX_ISSUES:
            return
        self._warned.add(ref)
        where = _reference_path(i, resource, ref)
        self.warnings.append(Issue("business-rule", text, (where,), severity="warning"))


def _names_whose(resource: dict, ref: str) -> bool:
    """Is `ref` what says whose data the resource is (its subject or patient), or a Patient's link to
    another record of the same person? Such a reference must resolve: an unresolved one could hide an
    objecting patient."""
    keys = ("subject", "patient", *(("link",) if resource.get("resourceType") == "Patient" else ()))
    for key in keys:
        value = resource.get(key)
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, dict) and key == "link":
                item = item.get("other")
            if isinstance(item, dict) and item.get("reference") == ref:
                return True
    return False


def _unfollowable(ref: dict, resource: dict) -> str | None:
    """Why this subject/patient reference cannot be followed to whose data it is, or None."""
    target = ref.get("reference")
    if target is None:
        if isinstance(ref.get("identifier"), dict):
            return None  # a logical reference: resolved (or refused) by identifier
        return "a subject or patient without a reference: whose data this is cannot be known"
    if not isinstance(target, str):
        return None  # the schema reports it
    if target.startswith("#"):
        ids = {c.get("id") for c in resource.get("contained") or () if isinstance(c, dict)}
        return None if target[1:] in ids else "reference to a contained resource that is not there"
    if target.startswith("urn:"):
        return None
    tail = RESTFUL_TAIL.search(target)
    conditional = _CONDITIONAL.fullmatch(target) if tail is None and not ABSOLUTE.match(target) else None
    named = tail or conditional
    if named is None:
        return "subject or patient reference in an unrecognised format"
    # "PATIENT/p1" or "Foo/p1" has the shape but names no resource type: followed nowhere, refused too
    return None if named.group(1) in r4().resources else "subject or patient reference to an unknown type"


def reference_type(reference: str) -> str | None:
    """The resource type a RESTful reference names (`Group/g1`, `http://x/fhir/Group/g1`), else None."""
    tail = RESTFUL_TAIL.search(reference)
    return tail.group(1) if tail else None


def _type_id_index(entries: list[dict]) -> dict[str, list[int]]:
    """`Type/id` → entries, from resource ids and RESTful fullUrls (relative references resolve here)."""
    index: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        keys = set()
        if isinstance(resource.get("id"), str):
            keys.add(f"{resource.get('resourceType')}/{resource['id']}")
        full_url = entry.get("fullUrl") or ""
        tail = None if full_url.startswith("urn:") else RESTFUL_TAIL.search(full_url)
        if tail:
            keys.add(f"{tail.group(1)}/{tail.group(2)}")
        for key in keys:
            index.setdefault(key, []).append(i)
    return index


def _identifiers(resource: dict) -> Iterator[tuple[str | None, str]]:
    found = resource.get("identifier")
    for ident in found if isinstance(found, list) else [found]:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            yield ident.get("system"), ident["value"]


def _identifier_index(patients: list[PatientEntry]) -> dict[tuple[str | None, str], set[int]]:
    index: dict[tuple[str | None, str], set[int]] = {}
    for patient in patients:
        for system, value in _identifiers(patient.resource):
            index.setdefault((system, value), set()).add(patient.index)
    return index


def _identifier_index_of_type(entries: list[dict], rtype: str) -> dict[tuple[str | None, str], set[int]]:
    index: dict[tuple[str | None, str], set[int]] = {}
    for i, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == rtype:
            for system, value in _identifiers(resource):
                index.setdefault((system, value), set()).add(i)
    return index


def _match_identifier(index: dict[tuple[str | None, str], set[int]], system: Any, value: Any) -> set[int]:
    """`system|value`, `|value` (no system) or `value` (any system), as in FHIR token search."""
    if system is None:
        return {i for (_, v), hits in index.items() if v == value for i in hits}
    return set(index.get((system or None, value), ()))


def _walk_references(node: Any, path: str, top: bool = False) -> Iterator[tuple[str, dict]]:
    """Reference-shaped objects below the resource root (iterative; depth is bounded by the parser anyway)."""
    stack: list[tuple[Any, str, bool]] = [(node, path, top)]
    while stack:
        item, where, is_top = stack.pop()
        if isinstance(item, dict):
            if (
                not is_top
                and item.keys() <= _REFERENCE_KEYS
                and ("reference" in item or "identifier" in item)
            ):
                yield where, item
            for key, value in item.items():
                if isinstance(value, (dict, list)):
                    stack.append((value, f"{where}.{safe_name(key) or '?'}", False))
        elif isinstance(item, list):
            stack.extend((value, f"{where}[{j}]", False) for j, value in enumerate(item))


def _reference_path(i: int, resource: dict, ref: str, nth: int = 0) -> str:
    """Error path only: where the `nth` occurrence of the offending reference sits inside the entry (the
    same reference in `patient` and `asserter` is two issues with two paths)."""
    seen = 0
    for path, found in _walk_references(resource, f"Bundle.entry[{i}].resource", top=True):
        if found.get("reference") == ref:
            if seen == nth:
                return f"{path}.reference"
            seen += 1
    return f"Bundle.entry[{i}].resource"
