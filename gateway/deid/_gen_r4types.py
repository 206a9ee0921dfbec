"""Regenerate ``r4types.json`` from the official FHIR R4 JSON Schema.

Run: ``python -m gateway.deid._gen_r4types /path/to/fhir.schema.json``. The output is a compact type table
(element name -> datatype, array flag; required elements) so the engine and the profile validator know each
element's datatype without loading the 2.7 MB schema or interpreting FHIRPath at run time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("r4types.json")
_CHOICE_SUFFIX = re.compile(r"[a-z]([A-Z][A-Za-z0-9]*)$")
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
    m = _CHOICE_SUFFIX.search(name)
    if m:
        t = m.group(1)[0].lower() + m.group(1)[1:]
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
    resources = sorted(r["$ref"].rsplit("/", 1)[-1] for r in schema["definitions"]["ResourceList"]["oneOf"])
    return {"fhirVersion": "4.0.1", "primitives": primitives, "resources": resources, "types": types}


def main() -> None:
    schema = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    OUT.write_text(json.dumps(build(schema), separators=(",", ":"), sort_keys=True), encoding="utf-8")


if __name__ == "__main__":
    main()
