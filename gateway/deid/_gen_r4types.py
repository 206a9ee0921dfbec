"""Regenerate ``r4types.json`` from the official FHIR R4 JSON Schema.

Run: ``python -m gateway.deid._gen_r4types /path/to/fhir.schema.json``. The output is a compact type table
(element name -> datatype, array flag; required elements; required choice elements) so the engine, the
validator and the profile validator know each element's datatype without loading the 2.7 MB schema or
interpreting FHIRPath at run time.

The JSON Schema cannot say that a choice element is required (``MedicationStatement.medication[x]``, 1..1):
its ``required`` lists plain elements only. Those come from the fhir.resources R4B models
(``one_of_many_required``), matched to the schema's definitions by walking both from each resource and
datatype, since the models name backbones differently (``CarePlan_Detail`` is ``CarePlanActivityDetail``).
The variant names are the R4 schema's own (R4B added ``valueCodeableReference`` to a few).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("r4types.json")
_PRIMS = {
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "markdown",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
}


def _prop_type(name: str, spec: dict[str, Any]) -> tuple[str, bool]:
    if spec.get("type") == "array":
        inner, _ = _prop_type(name, spec.get("items", {}))
        return inner, True
    ref = spec.get("$ref")
    if ref:
        return ref.rsplit("/", 1)[-1], False
    # choice-type primitives (valueDateTime, deceasedBoolean...) are inlined without $ref: the suffix of
    # the element name names the primitive type; enums (bound codes) carry no $ref either and are codes
    # the longest suffix from a capital that names a primitive: doseNumberString is a string (the stem has
    # capitals too), valueDateTime a dateTime (not a time)
    for i, ch in enumerate(name):
        if ch.isupper() and i > 0:
            t = ch.lower() + name[i + 1 :]
            if t in _PRIMS:
                return t, False
    return "code", False


def build(schema: dict[str, Any]) -> dict[str, Any]:
    types: dict[str, Any] = {}
    primitives: list[str] = []
    for name, spec in sorted(schema["definitions"].items()):
        props = spec.get("properties")
        if props is None:
            primitives.append(name)
            continue
        table = {}
        for pname, pspec in props.items():
            if pname == "resourceType":
                continue
            t, arr = _prop_type(pname, pspec)
            table[pname] = [t, 1 if arr else 0]
        types[name] = {"p": table, "r": [r for r in spec.get("required", []) if r != "resourceType"]}
    for name, (stems, required, required_primitives) in model_facts(schema["definitions"]).items():
        if stems:
            types[name]["x"] = stems
        if required:
            types[name]["c"] = required
        if required_primitives:
            types[name]["rp"] = [p for p in required_primitives if p not in types[name]["r"]]
    resources = sorted(r["$ref"].rsplit("/", 1)[-1] for r in schema["definitions"]["ResourceList"]["oneOf"])
    return {"fhirVersion": "4.0.1", "primitives": primitives, "resources": resources, "types": types}


def model_facts(
    definitions: dict[str, Any],
) -> dict[str, tuple[dict[str, list[str]], list[str], list[str]]]:
    """Definition -> (choice stem -> its R4 variants, the stems that are required, the required primitive
    elements), from the R4B models: ``{"medication": ["medicationCodeableConcept", "medicationReference"]},
    ["medication"], ["status"]``. The schema's ``required`` leaves out required primitives such as
    ``Observation.status`` (1..1), which FHIR lets stand as ``_status`` (extensions only) too."""
    from fhir.resources.R4B import get_fhir_model_class  # a generator-time dependency only

    pending: list[tuple[str, Any]] = []
    for name, spec in definitions.items():
        if "properties" in spec and "_" not in name:
            try:
                pending.append((name, get_fhir_model_class(name)))
            except (KeyError, ValueError, AttributeError):
                continue  # an R4 type that R4B no longer has
    out: dict[str, tuple[dict[str, list[str]], list[str], list[str]]] = {}
    seen: set[str] = set()
    while pending:
        name, model = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        props = definitions[name]["properties"]
        extras = [field.json_schema_extra or {} for field in model.model_fields.values()]
        stems = {
            stem: sorted(p for p in props if _is_variant(p, stem))
            for stem in {e["one_of_many"] for e in extras if e.get("one_of_many")}
        }
        stems = {stem: variants for stem, variants in sorted(stems.items()) if variants}
        required = sorted({e["one_of_many"] for e in extras if e.get("one_of_many_required")} & set(stems))
        primitives = sorted(
            alias
            for field_name, field in model.model_fields.items()
            if (field.json_schema_extra or {}).get("element_required")
            and (alias := field.alias or field_name) in props
        )
        if stems or primitives:
            out[name] = (stems, required, primitives)
        pending.extend(_backbones(definitions, props, model))
    return dict(sorted(out.items()))


def _is_variant(prop: str, stem: str) -> bool:
    return prop.startswith(stem) and prop[len(stem) : len(stem) + 1].isupper()


def _backbones(definitions: dict[str, Any], props: dict[str, Any], model: Any) -> list[tuple[str, Any]]:
    """(schema definition, model class) of each backbone element of one definition."""
    from fhir.resources.R4B import get_fhir_model_class

    found = []
    for pname, pspec in props.items():
        ref = (pspec.get("items") or pspec).get("$ref", "")
        target = ref.rsplit("/", 1)[-1]
        field = model.model_fields.get(pname)
        if "_" not in target or target not in definitions or field is None:
            continue
        m = re.search(r"(\w+)Type\b", str(field.annotation))
        if m:
            try:
                found.append((target, get_fhir_model_class(m.group(1))))
            except (KeyError, ValueError, AttributeError):
                continue
    return found


def main() -> None:
    schema = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    OUT.write_text(json.dumps(build(schema), separators=(",", ":"), sort_keys=True), encoding="utf-8")


if __name__ == "__main__":
    main()
