"""Reproduce the NLPS1 test vectors (domain spec §4.4) end to end, starting from each case's FHIR Patient.

Checks, per case and type: extracted fields, canonical string, pre-pseudonym, final and identifier value, and
the skip reasons; then the rotation rows (v1 → v2 via translate and via fresh computation under v2) and the
second-registry rows. A gateway whose mapping, normalisation or keys drift from the ecosystem's fails here
before it delivers a single unlinkable pseudonym.

Mismatches name the case, the type and what differs, never a computed plain value (only skip reasons, which
are fixed texts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.pseudonym import nlps1
from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import InputMapping, load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonym.types import Extraction, PseudonymInput

DEFAULT_OTHER_REGISTRY = "registry-other"
ROTATION = "rotation"
OTHER_REGISTRY = "other_registry"
KEYS = "keys"
_COMPARED = ("fields", "canonical", "pre_b64u", "final_b64u", "identifier_value")


class VectorsError(ValueError):
    """The vectors file cannot be used (unreadable, not JSON, a required key missing)."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    case: str  # case label, or "rotation" / "other_registry" / "keys"
    type: str  # NLPS1 type, or "*" for the whole case
    field: str  # which value differs: fields, canonical, pre_b64u, ..., skip reason, v2 via translate, ...
    detail: str = "differs"  # fixed text (or fixed-text skip reasons), never a plain value

    def __str__(self) -> str:
        return f"{self.case} / {self.type}: {self.field} {self.detail}"


@dataclass(slots=True)
class SelftestResult:
    rows: list[str] = field(default_factory=list)  # case labels, then rotation, other_registry
    checked: dict[str, list[str]] = field(default_factory=dict)  # row → types checked in it
    mismatches: list[Mismatch] = field(default_factory=list)

    def failed(self, row: str, ptype: str) -> bool:
        return any(m.case == row and m.type in (ptype, "*") for m in self.mismatches)


@dataclass(frozen=True, slots=True)
class _Keys:
    stage: SourceStage
    ttp_master: bytes
    registry: str
    other_registry: str
    provider: str
    mrn_system: str | None

    def domain(self, version: int, registry: str | None = None) -> nlps1.DomainKey:
        return nlps1.DomainKey.derive(self.ttp_master, registry or self.registry, version)


def run_selftest(vectors_path: Path | str, mapping: InputMapping | None = None) -> list[Mismatch]:
    """Every difference between this gateway and the vectors file; empty means byte-exact agreement."""
    return run_selftest_detailed(vectors_path, mapping).mismatches


def run_selftest_detailed(vectors_path: Path | str, mapping: InputMapping | None = None) -> SelftestResult:
    vectors = _load(Path(vectors_path))
    keys = _keys(vectors)
    mapping = mapping or load_input_mapping()
    result = SelftestResult()
    _check_derived_keys(vectors["keys"], keys, result)
    cases = _list_of_objects(vectors, "cases")
    extractions: dict[str, Extraction] = {}
    for index, case in enumerate(cases):
        label = str(case.get("label") or f"case {index + 1}")
        extraction = extract_inputs(case.get("patient"), nlps1.TYPES, mapping, keys.mrn_system)
        extractions[label] = extraction
        _check_case(label, case, extraction, keys, result)
    _check_rotation(_list_of_objects(vectors, "rotation", required=False), cases, extractions, keys, result)
    first = next(iter(extractions.values()), None)
    _check_other_registry(_list_of_objects(vectors, OTHER_REGISTRY, required=False), first, keys, result)
    return result


# --- cases --------------------------------------------------------------------------------------------------


def _check_case(
    label: str, case: Mapping[str, Any], extraction: Extraction, keys: _Keys, result: SelftestResult
) -> None:
    expected = {str(p.get("type")): p for p in _objects(case.get("pseudonyms"))}
    expected_skips = case.get("skipped") if isinstance(case.get("skipped"), dict) else {}
    produced = {item.type: item for item in extraction.inputs}
    computed = _computed(extraction, keys, keys.registry, label, result)
    types = _ordered({*expected, *expected_skips, *produced, *extraction.skipped})
    result.rows.append(label)
    result.checked[label] = types
    for ptype in types:
        if ptype in expected:
            _check_pseudonym(
                label, ptype, expected[ptype], produced.get(ptype), computed.get(ptype), extraction, result
            )
        elif ptype in expected_skips:
            got = extraction.skipped.get(ptype)
            if got != expected_skips[ptype]:
                detail = f"expected {expected_skips[ptype]}, got {got or 'a pseudonym'}"
                result.mismatches.append(Mismatch(label, ptype, "skip reason", detail))
        elif ptype in produced:
            result.mismatches.append(Mismatch(label, ptype, "pseudonym", "produced, the vectors expect none"))


def _check_pseudonym(
    label: str,
    ptype: str,
    want: Mapping[str, Any],
    item: PseudonymInput | None,
    computed: dict[str, str] | None,
    extraction: Extraction,
    result: SelftestResult,
) -> None:
    if item is None or computed is None:
        reason = extraction.skipped.get(ptype, "no reason")
        result.mismatches.append(Mismatch(label, ptype, "pseudonym", f"not produced (skipped: {reason})"))
        return
    actual = {"fields": list(item.fields), "canonical": item.canonical, **computed}
    for name in _COMPARED:
        if name in want and want[name] != actual[name]:
            result.mismatches.append(Mismatch(label, ptype, name))


def _computed(
    extraction: Extraction, keys: _Keys, registry: str, label: str, result: SelftestResult, version: int = 1
) -> dict[str, dict[str, str]]:
    """type → pre_b64u / final_b64u / identifier_value, computed from the extraction under `registry`."""
    try:
        pres = keys.stage.pre_pseudonyms(extraction, registry)
        domain = keys.domain(version, registry)
        out: dict[str, dict[str, str]] = {}
        for pre in pres:
            final = domain.final(pre.type, pre.value, keys.provider)
            out[pre.type] = {
                "pre_b64u": nlps1.b64u(pre.value),
                "final_b64u": nlps1.b64u(final),
                "identifier_value": nlps1.format_identifier(domain.version, final),
            }
        return out
    except nlps1.PseudonymError as exc:  # messages of PseudonymError never hold values
        result.mismatches.append(Mismatch(label, "*", "computation", f"failed: {exc}"))
        return {}


# --- rotation and second registry ---------------------------------------------------------------------------


def _check_rotation(
    rows: list[dict[str, Any]],
    cases: list[dict[str, Any]],
    extractions: dict[str, Extraction],
    keys: _Keys,
    result: SelftestResult,
) -> None:
    if not rows:
        return
    result.rows.append(ROTATION)
    result.checked[ROTATION] = _ordered({str(r.get("type")) for r in rows})
    v1, v2 = keys.domain(1), keys.domain(2)
    for row in rows:
        ptype, old, new = str(row.get("type")), row.get("v1"), row.get("v2")
        if not isinstance(old, str) or not isinstance(new, str):
            result.mismatches.append(Mismatch(ROTATION, ptype, "row", "lacks v1/v2"))
            continue
        try:
            if nlps1.translate(old, ptype, v1, v2, keys.provider) != new:
                result.mismatches.append(Mismatch(ROTATION, ptype, "v2 via translate"))
        except nlps1.PseudonymError as exc:
            result.mismatches.append(Mismatch(ROTATION, ptype, "v2 via translate", f"failed: {exc}"))
        # Fresh computation under v2 from the FHIR patient of the case whose v1 value this row rotates.
        label = _case_with_identifier(cases, ptype, old)
        if label is None:
            result.mismatches.append(Mismatch(ROTATION, ptype, "v1", "matches no case's identifier_value"))
            continue
        fresh = _computed(extractions[label], keys, keys.registry, ROTATION, result, version=2).get(ptype)
        if fresh is None or fresh["identifier_value"] != new:
            result.mismatches.append(Mismatch(ROTATION, ptype, "v2 computed fresh under v2"))


def _case_with_identifier(cases: list[dict[str, Any]], ptype: str, value: str) -> str | None:
    for index, case in enumerate(cases):
        for p in _objects(case.get("pseudonyms")):
            if p.get("type") == ptype and p.get("identifier_value") == value:
                return str(case.get("label") or f"case {index + 1}")
    return None


def _check_other_registry(
    rows: list[dict[str, Any]], extraction: Extraction | None, keys: _Keys, result: SelftestResult
) -> None:
    """The other registry's rows are for the first case (the file names no case for them)."""
    if not rows:
        return
    result.rows.append(OTHER_REGISTRY)
    result.checked[OTHER_REGISTRY] = _ordered({str(r.get("type")) for r in rows})
    computed = _computed(extraction or Extraction(), keys, keys.other_registry, OTHER_REGISTRY, result)
    for row in rows:
        ptype = str(row.get("type"))
        got = computed.get(ptype)
        if got is None or got["identifier_value"] != row.get("identifier_value"):
            result.mismatches.append(Mismatch(OTHER_REGISTRY, ptype, "identifier_value"))


def _check_derived_keys(raw: Mapping[str, Any], keys: _Keys, result: SelftestResult) -> None:
    """Optional *_hex entries: derived keys (catches an HKDF info-string drift before any case does)."""
    checks = {
        "domain_key_v1_hex": lambda: nlps1.domain_key(keys.ttp_master, keys.registry, 1),
        "domain_key_v2_hex": lambda: nlps1.domain_key(keys.ttp_master, keys.registry, 2),
        "mrn_key_v1_hex": lambda: nlps1.mrn_key(_hex(raw, "provider_mrn_master_hex"), keys.registry, 1),
    }
    for name, derive in checks.items():
        if name in raw and derive().hex() != raw[name]:
            result.mismatches.append(Mismatch(KEYS, "*", name))


# --- loading ------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VectorsError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VectorsError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise VectorsError(f"{path}: expected an object with 'keys' and 'cases'")
    if data.get("scheme", nlps1.SCHEME) != nlps1.SCHEME:
        raise VectorsError(f"{path}: not an {nlps1.SCHEME} vectors file")
    return data


def _keys(vectors: dict[str, Any]) -> _Keys:
    raw = vectors["keys"]
    provider = _text(raw, "provider")
    mrn_master = _hex(raw, "provider_mrn_master_hex") if "provider_mrn_master_hex" in raw else None
    try:
        stage = SourceStage({1: _hex(raw, "source_key_v1_hex")}, 1, mrn_master, provider)
    except nlps1.PseudonymError as exc:
        raise VectorsError(f"keys: {exc}") from None
    mrn_system = raw.get("mrn_system")
    other = raw.get("other_registry")
    return _Keys(
        stage=stage,
        ttp_master=_hex(raw, "ttp_master_hex"),
        registry=_text(raw, "registry"),
        other_registry=other if isinstance(other, str) and other else DEFAULT_OTHER_REGISTRY,
        provider=provider,
        mrn_system=mrn_system if isinstance(mrn_system, str) else None,
    )


def _hex(raw: Mapping[str, Any], name: str) -> bytes:
    try:
        return bytes.fromhex(raw[name])
    except (KeyError, TypeError, ValueError):
        raise VectorsError(f"keys.{name}: missing or not hex") from None


def _text(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise VectorsError(f"keys.{name}: missing or not a string")
    return value


def _list_of_objects(vectors: Mapping[str, Any], name: str, required: bool = True) -> list[dict[str, Any]]:
    value = vectors.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise VectorsError(f"{name}: expected a list")
    return _objects(value)


def _objects(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _ordered(types: set[str]) -> list[str]:
    """NLPS1 types in their canonical order, anything unknown after them."""
    known = [t for t in nlps1.TYPES if t in types]
    return known + sorted(types - set(known))
