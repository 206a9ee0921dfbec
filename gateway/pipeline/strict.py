"""Strict mode: every resource, posted and delivered, also through its fhir.resources R4B model.

Off by default (`strict: true` per registry, `deidentify --strict`, `bulk --strict`). The R4 JSON Schema check
(tightened, gateway/pipeline/validate.py: calendar dates, required primitives and choice elements included)
runs on every input anyway; the models are a second opinion written independently of it. They cost six to
seven times the whole chain (benchmarks/pipeline.py prints the row), and they are R4B and stricter than R4
in places: a resource that uses an element R4B renamed is refused, and so is a required element given only
as a primitive's extensions (`_occurrenceDateTime` with a data-absent-reason), which R4 allows. So this is
a mode for a registry that asks for it, or for testing a new EHR interface, not the hot path.

The models only validate; nothing is re-serialised through them: what leaves is still the engine's dict.
Issues name the path of the failing element and the kind of error, never a value (pydantic's messages
quote the input, so they are not used).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from gateway.outcome import Issue
from gateway.pipeline.parse import safe_name

MAX_ISSUES = 100

# pydantic error types (a fixed vocabulary) -> (FHIR issue type, our text). The models raise `value_error`
# for a primitive's format on the element, and for a choice element on the object that holds it.
_TEXTS = {
    "missing": ("required", "missing required element"),
    "extra_forbidden": ("structure", "unknown element"),
    "value_error": ("value", "not a valid value of the element's FHIR type"),
}
_CHOICE = ("invariant", "a required choice element is missing, or one is given in more than one type")


def model_issues(resource: dict[str, Any], prefix: str) -> list[Issue]:
    """Issues of one resource (already schema-valid) against its R4B model; [] when it passes."""
    try:
        model = get_fhir_model_class(resource["resourceType"])
    except KeyError:
        return [Issue("not-supported", "no R4B model for this resource type", (prefix,))]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return [_issue(error, prefix) for error in exc.errors()[:MAX_ISSUES]]
    return []


def bundle_model_issues(bundle: dict[str, Any], where: str = "Bundle") -> list[Issue]:
    """Model issues of every entry's resource, each named by its place in the Bundle."""
    issues: list[Issue] = []
    for path, resource in _entry_resources(bundle, where):
        issues += model_issues(resource, path)
        if len(issues) >= MAX_ISSUES:
            break
    return issues[:MAX_ISSUES]


def _entry_resources(bundle: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, entry in enumerate(bundle.get("entry") or ()):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict):
            yield f"{where}.entry[{i}].resource", resource


def _issue(error: Any, prefix: str) -> Issue:
    kind, loc = error["type"], error["loc"]
    if kind == "value_error" and (not loc or isinstance(loc[-1], int)):
        code, text = _CHOICE
    elif kind.endswith(("_parsing", "_pattern_mismatch")):  # datetime_from_date_parsing: 2020-02-30
        code, text = _TEXTS["value_error"]
    elif kind.endswith("_type"):  # list_type, dict_type, model_type: the wrong JSON type
        code, text = "structure", "wrong JSON type for this element"
    else:
        code, text = _TEXTS.get(kind, ("invalid", f"does not conform to the R4B model ({kind})"))
    return Issue(code, text, (_path(prefix, loc),))


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix]
    for step in loc:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif step and not str(step).startswith(("function-", "[")):  # pydantic's own validator names
            parts.append(f".{safe_name(str(step)) or '?'}")
    return "".join(parts)
