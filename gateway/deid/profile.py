"""Registry delivery profiles: one YAML file per registry, validated here (schema in ``profiles/README.md``).

A profile says *what* a registry may receive (purpose, legal basis, pseudonym types, resource types and an
allow-list of elements, generalisations, free text, practitioner data). *How* each kind of element is
de-identified lives in ``mappings/deid-rules.yaml`` (see ``rules.py``); the engine combines both once in
``compile_plan``. Problems name the profile key at fault, never a patient value (profiles hold none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway import yamlfile
from gateway.deid.r4 import R4Types, r4

PURPOSES = {
    # purpose -> the legal bases (what the basis allows) that fit it
    "quality-registry": {"pseudonymised", "aggregated-only"},
    "management-information": {"aggregated-only"},
    "scientific-research": {"with-consent", "aggregated-only"},
}
ALLOWS = {"pseudonymised", "aggregated-only", "with-consent"}
PSEUDONYM_TYPES = {"B", "NGGV", "sNGGV", "NGG", "sNGG", "C", "RGG", "GG", "A", "MRN"}
GENERALISE = {
    "birthDate": {"year", "year-month", "keep", "drop"},
    "postcode": {"pc4", "none"},
    "dates": {"keep", "shift"},
}
FREE_TEXT = {
    "note": {"drop", "keep"},
    "narrative": {"drop"},  # narrative repeats names/BSN (domain 5.5); regenerating it is not implemented
    "reference_display": {"drop", "keep"},
    "concept_text": {"drop", "keep"},  # CodeableConcept.text: often typed by a clinician, may name people
    "attachment": {"drop", "keep-metadata"},
}
PRACTITIONER = {"name": {"drop", "keep"}, "identifier": {"drop", "keep"}, "telecom": {"drop", "keep"}}
REFERENCES = {"unresolved": {"drop"}, "outside_bundle": {"drop", "opaque-id"}}

DEFAULTS: dict[str, dict[str, Any]] = {
    "generalise": {"birthDate": "year", "postcode": "pc4", "dates": "keep", "date_shift_max_days": 180},
    "free_text": {
        "note": "drop",
        "narrative": "drop",
        "reference_display": "drop",
        "attachment": "drop",
        "concept_text": "drop",
    },
    "practitioner": {"name": "drop", "identifier": "drop", "telecom": "drop"},
    "references": {"unresolved": "drop", "outside_bundle": "drop"},
}
TOP_KEYS = {
    "id",
    "name",
    "purpose",
    "legal_basis",
    "pseudonym_types",
    "allow_bsn_pseudonym",
    "endpoint",
    "generalise",
    "free_text",
    "practitioner",
    "references",
    "resources",
    "extensions",
    "description",
}
# Never deliverable whatever a profile says: direct identifiers of the patient (domain 5.6) and relatives.
FORBIDDEN_TYPES = {"RelatedPerson", "Person", "Bundle", "Provenance"}
FORBIDDEN_ELEMENTS = {
    "Patient": {"name", "telecom", "photo", "contact", "link", "communication"},
}
# Elements every resource may not list: narrative, contained copies (persons), handled by the engine itself.
ENGINE_ELEMENTS = {"id", "meta", "text", "contained", "implicitRules", "extension", "modifierExtension"}

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_ENDPOINT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_URL_RE = re.compile(r"^(https?|urn):\S+$")


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    purpose: str
    legal_basis: str
    allows: str
    pseudonym_types: tuple[str, ...]
    allow_bsn_pseudonym: bool
    endpoint: str
    generalise: Mapping[str, Any]
    free_text: Mapping[str, str]
    practitioner: Mapping[str, str]
    references: Mapping[str, str]
    resources: Mapping[str, tuple[str, ...]]
    # the extension urls this registry receives (of those the rules keep); None: every one the rules keep
    extensions: tuple[str, ...] | None = None
    description: str = ""
    source: str = field(default="", compare=False)

    @property
    def person_level(self) -> bool:
        """False for aggregated-only profiles: the engine then delivers no person-level resource."""
        return self.allows != "aggregated-only"

    def leak_gate_options(self) -> dict[str, Any]:
        """What ``leakscan.sensitive_values`` must know of this profile: the professionals' data it delivers
        (not leaks), and whether a full birth date is one (the profile generalises it)."""
        return {
            "practitioner_kept": tuple(k for k, v in self.practitioner.items() if v == "keep"),
            "birth_dates": self.generalise.get("birthDate") != "keep",
        }

    def switch(self, dotted: str) -> str | None:
        """A profile option by its dotted name, e.g. ``generalise.birthDate`` (rules refer to these)."""
        section, _, key = dotted.partition(".")
        value = getattr(self, section, None)
        if isinstance(value, Mapping):
            got = value.get(key)
            return None if got is None else str(got)
        return None


class ProfileError(ValueError):
    """A profile failed validation; ``problems`` lists each finding."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"profile {source}: " + "; ".join(problems))
        self.problems = problems


def _text(value: Any) -> str | None:
    """Strings only: YAML may hold lists or mappings where a name is expected (unhashable, never valid)."""
    return value if isinstance(value, str) else None


def _check_enum_section(
    data: Mapping[str, Any], section: str, spec: dict[str, set[str]], out: list[str]
) -> None:
    value = data.get(section, {})
    if not isinstance(value, Mapping):
        out.append(f"{section}: must be a mapping")
        return
    for key, val in value.items():
        if key == "date_shift_max_days" and section == "generalise":
            if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= 3650:
                out.append("generalise.date_shift_max_days: must be an integer 1..3650")
            continue
        allowed = spec.get(str(key))
        if allowed is None:
            out.append(f"{section}.{key}: unknown option")
        elif not isinstance(val, str) or val not in allowed:
            out.append(f"{section}.{key}: must be one of {sorted(allowed)}")


def _check_identity(data: Mapping[str, Any], out: list[str]) -> None:
    pid = data.get("id")
    if not isinstance(pid, str) or not _ID_RE.match(pid):
        out.append("id: required, lower-case letters, digits and '-', at most 64")
    if not isinstance(data.get("name"), str) or not data.get("name"):
        out.append("name: required text")
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, str) or not _ENDPOINT_RE.match(endpoint):
        out.append("endpoint: required, the *name* of an endpoint in the gateway configuration (not a URL)")


def _check_purpose(data: Mapping[str, Any], out: list[str]) -> None:
    purpose = _text(data.get("purpose"))
    if purpose not in PURPOSES:
        out.append(f"purpose: must be one of {sorted(PURPOSES)}")
    basis = data.get("legal_basis")
    if not isinstance(basis, Mapping):
        out.append("legal_basis: required mapping with 'basis' and 'allows'")
        return
    if not isinstance(basis.get("basis"), str) or not basis.get("basis"):
        out.append("legal_basis.basis: required text naming the legal basis")
    allows = _text(basis.get("allows"))
    if allows not in ALLOWS:
        out.append(f"legal_basis.allows: must be one of {sorted(ALLOWS)}")
    elif purpose in PURPOSES and allows not in PURPOSES[purpose]:
        out.append(f"legal_basis.allows: '{allows}' does not fit purpose '{purpose}'")


def _check_pseudonyms(data: Mapping[str, Any], out: list[str]) -> None:
    types = data.get("pseudonym_types", [])
    bsn_ok = data.get("allow_bsn_pseudonym", False)
    if not isinstance(bsn_ok, bool):
        out.append("allow_bsn_pseudonym: must be true or false")
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        out.append("pseudonym_types: must be a list of pseudonym type names")
        return
    for t in types:
        if t not in PSEUDONYM_TYPES:
            out.append(f"pseudonym_types: unknown type '{t}'")
    if "B" in types and bsn_ok is not True:
        out.append("pseudonym_types: type B (from the BSN) is refused unless allow_bsn_pseudonym: true")
    if len(set(types)) != len(types):
        out.append("pseudonym_types: duplicates")
    allows = (
        data.get("legal_basis", {}).get("allows") if isinstance(data.get("legal_basis"), Mapping) else None
    )
    if allows == "aggregated-only" and types:
        out.append(
            "pseudonym_types: an aggregated-only profile receives no person-level data, so no pseudonyms"
        )
    if allows in ("pseudonymised", "with-consent") and not types:
        out.append("pseudonym_types: a person-level profile needs at least one pseudonym type")


def _path_tree(paths: list[str]) -> dict[str, Any]:
    """``["code", "component.code"]`` -> ``{"code": None, "component": {"code": None}}`` (None = whole)."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        parts = path.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                node[part] = None
            elif node.get(part, {}) is None:
                break  # an ancestor is already kept whole
            else:
                node = node.setdefault(part, {})
    return tree


def expand_tree(types: R4Types, definition: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve ``value[x]`` into its variants; unknown names are left out (the validator reports them)."""
    out: dict[str, Any] = {}
    for name, sub in tree.items():
        for real in types.expand(definition, name):
            if sub is None:
                out[real] = None
            else:
                et = types.elements[definition][real]
                out[real] = expand_tree(types, et.type, sub) if et.type in types.elements else None
    return out


def _check_tree(types: R4Types, definition: str, tree: Mapping[str, Any], label: str, out: list[str]) -> None:
    for name, sub in tree.items():
        real = types.expand(definition, name)
        if not real:
            out.append(f"resources.{label}.{name}: not an element of {definition} in FHIR R4")
            continue
        if sub is None:
            continue
        for r in real:
            et = types.elements[definition][r]
            if et.type not in types.elements:
                out.append(f"resources.{label}.{name}: a primitive has no sub-elements")
                break
            _check_tree(types, et.type, sub, f"{label}.{name}", out)
    _check_required(types, definition, tree, label, out)


def _check_required(
    types: R4Types, definition: str, tree: Mapping[str, Any], label: str, out: list[str]
) -> None:
    # Only where the profile restricts a definition: a kept-whole element keeps its required parts anyway.
    listed = {real for name in tree for real in types.expand(definition, name)}
    plain = (*types.required.get(definition, ()), *types.required_primitives.get(definition, ()))
    dropped = [req for req in plain if req not in listed] + [
        f"{stem}[x]"
        for stem in types.required_choices.get(definition, ())
        if not listed.intersection(types.variants(definition, stem))
    ]
    for req in dropped:
        out.append(f"resources.{label}: drops '{req}', which FHIR R4 requires (min 1) for {definition}")


def _check_resources(data: Mapping[str, Any], out: list[str]) -> None:
    types = r4()
    resources = data.get("resources")
    if not isinstance(resources, Mapping) or not resources:
        out.append("resources: required mapping of resource type -> list of element paths")
        return
    for rtype, paths in resources.items():
        if rtype not in types.resources:
            out.append(f"resources.{rtype}: not a FHIR R4 resource type")
            continue
        if rtype in FORBIDDEN_TYPES:
            out.append(f"resources.{rtype}: never delivered (persons other than the patient, or engine-made)")
            continue
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            out.append(f"resources.{rtype}: must be a list of element paths")
            continue
        for p in paths:
            head = p.split(".")[0]
            if head in ENGINE_ELEMENTS:
                out.append(f"resources.{rtype}.{p}: handled by the engine, may not be listed")
            if head in FORBIDDEN_ELEMENTS.get(rtype, ()):
                out.append(f"resources.{rtype}.{p}: a direct identifier (domain 5.6), never delivered")
        _check_tree(types, rtype, _path_tree(paths), rtype, out)


def check_profile(data: Any) -> list[str]:
    """Every problem with a parsed profile document; empty when it is valid."""
    if not isinstance(data, Mapping):
        return ["profile: must be a YAML mapping"]
    out: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            out.append(f"{key}: unknown key")
    _check_identity(data, out)
    _check_purpose(data, out)
    _check_pseudonyms(data, out)
    _check_enum_section(data, "generalise", GENERALISE, out)
    _check_enum_section(data, "free_text", FREE_TEXT, out)
    _check_enum_section(data, "practitioner", PRACTITIONER, out)
    _check_enum_section(data, "references", REFERENCES, out)
    _check_resources(data, out)
    _check_extensions(data, out)
    return out


def _check_extensions(data: Mapping[str, Any], out: list[str]) -> None:
    if "extensions" not in data:
        return
    urls = data["extensions"]
    if urls is None:  # every item commented out: not "every extension the rules keep" (a re-probe's)
        out.append("extensions: must be a list of extension urls; [] for none, or leave the key out for all")
    elif not isinstance(urls, list) or not all(isinstance(u, str) and _URL_RE.match(u) for u in urls):
        out.append("extensions: must be a list of extension urls")
    elif len(set(urls)) != len(urls):
        out.append("extensions: duplicates")


def extension_problems(profile_urls: Any, kept: Mapping[str, str]) -> list[str]:
    """The urls a profile lists that the rules (`kept`: url -> keep | remove) do not keep: a profile narrows
    what the rules let through, it never widens it (each kept extension has its values checked there)."""
    if not isinstance(profile_urls, list):
        return []
    # items that are no url are `check_profile`'s to report (a nested list crashed the lookup here)
    return [f"extensions.{u}: not kept by the de-identification rules" for u in profile_urls
            if isinstance(u, str) and kept.get(u) != "keep"]


def profile_warnings(data: Any) -> list[str]:
    """Things that are valid but probably not meant: an allowed element named after a resource type that
    the profile does not deliver (`Encounter.episodeOfCare` without `EpisodeOfCare`) refers to nothing the
    registry gets, so the engine always drops it. Found by name (the R4 JSON Schema types no references)."""
    resources = data.get("resources") if isinstance(data, Mapping) else None
    if not isinstance(resources, Mapping):
        return []
    known = r4().resources
    out = []
    for rtype, paths in resources.items():
        for path in paths if isinstance(paths, list) else ():
            name = str(path).rsplit(".", 1)[-1]
            target = name[:1].upper() + name[1:]
            if target not in known or target in resources or target in FORBIDDEN_TYPES:
                continue
            if _element_type(rtype, str(path)) == "Reference":
                out.append(f"resources.{rtype}.{path}: refers to {target}, which is not delivered")
    return out


def _element_type(rtype: str, path: str) -> str | None:
    """The datatype of a dotted element path (`CarePlan.activity.detail.goal` → Reference), if known."""
    types = r4()
    definition, found = rtype, None
    for part in path.split("."):
        element = types.elements.get(definition, {}).get(part)
        if element is None:
            return None
        found = definition = element.type
    return found


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    merged = dict(DEFAULTS[name])
    merged.update(data.get(name) or {})
    return MappingProxyType(merged)


def profile_from_data(data: Mapping[str, Any], source: str = "<data>") -> Profile:
    problems = check_profile(data)
    if problems:
        raise ProfileError(source, problems)
    basis = data["legal_basis"]
    return Profile(
        id=data["id"],
        name=data["name"],
        purpose=data["purpose"],
        legal_basis=basis["basis"],
        allows=basis["allows"],
        pseudonym_types=tuple(data.get("pseudonym_types", [])),
        allow_bsn_pseudonym=bool(data.get("allow_bsn_pseudonym", False)),
        endpoint=data["endpoint"],
        generalise=_section(data, "generalise"),
        free_text=_section(data, "free_text"),
        practitioner=_section(data, "practitioner"),
        references=_section(data, "references"),
        resources=MappingProxyType({t: tuple(p) for t, p in data["resources"].items()}),
        extensions=tuple(data["extensions"]) if "extensions" in data else None,
        description=str(data.get("description", "")),
        source=source,
    )


def read_yaml(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yamlfile.load(fh)


def load_profile(path: str | Path) -> Profile:
    """Read and validate one profile file; raises ``ProfileError`` listing every problem."""
    try:
        data = read_yaml(path)
    except yaml.YAMLError as exc:
        raise ProfileError(Path(path).name, [yamlfile.problem(exc)]) from exc
    return profile_from_data(data, Path(path).name)


def load_profiles(directory: str | Path) -> dict[str, Profile]:
    """All ``*.yaml`` profiles of a directory by id; a duplicate id is an error."""
    profiles: dict[str, Profile] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        prof = load_profile(path)
        if prof.id in profiles:
            raise ProfileError(path.name, [f"id: '{prof.id}' already defined by another file"])
        profiles[prof.id] = prof
    return profiles
