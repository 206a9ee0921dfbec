"""De-identification engine: ``compile_plan(profile, rules)`` once, then ``deidentify(bundle, plan, ...)``.

One pass over plain dicts (orjson-parsed), building the output; the input is never modified or deep-copied.

Ids: every delivered resource gets an opaque id = HMAC-SHA-256 under the registry's ``id_key`` of
``registry | resourceType | original`` (original = ``Type/id`` when the resource has an id, else its fullUrl),
formatted as a UUID (RFC 9562 version 8, "custom"). The same id serves as ``Resource.id``, the fullUrl
``urn:uuid:<id>`` and the transaction request ``PUT <Type>/<id>``: stable per registry (re-delivery updates),
unlinkable between registries (different keys), and a valid FHIR id (36 characters). References inside the
bundle become ``urn:uuid:<id>``, which resolves in transaction and collection bundles alike.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from gateway.deid import processors as p
from gateway.deid.homes import at_home, person_homes
from gateway.deid.profile import Profile, ProfileError, _path_tree, expand_tree, extension_problems
from gateway.deid.r4 import R4Types, r4
from gateway.deid.rules import ExtensionShape, Rule, Rules
from gateway.fhirurls import restful_base
from gateway.linkage import SHARED_TYPES, linked_to_patients
from gateway.memory import paused_gc

PSEUDED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "PSEUDED",
    "display": "pseudonymized",
}
_STRUCTURAL_RESOURCE = ("resourceType", "id", "meta")  # rebuilt by the engine
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


@dataclass(frozen=True)
class ProvenanceInfo:
    """What the Provenance records. ``recorded`` comes from the caller so that output is reproducible."""

    gateway_version: str
    recorded: str  # FHIR instant of the delivery run
    ttp_name: str
    gateway_name: str = "fhir-delivery-gateway"


@dataclass(frozen=True)
class Plan:
    profile: Profile
    nodes: Mapping[str, p.Node]  # resource type -> compiled node
    required: Mapping[str, tuple[tuple[str, ...], ...]]  # resource type -> `R4Types.must_have`
    extension_nodes: Mapping[str, p.Node]  # allowed extension url -> node
    modifier_ok: frozenset[str]
    keep_display: bool
    shift_dates: bool
    shift_max_days: int

    @property
    def registry(self) -> str:
        return self.profile.id

    @property
    def practitioner_kept(self) -> tuple[str, ...]:
        """Professionals' data the profile delivers (for ``leakscan.sensitive_values``)."""
        return self.profile.leak_gate_options()["practitioner_kept"]


@dataclass
class DeidReport:
    """Counts only: no input value (not even an element name taken from input) appears here."""

    resources_in: int = 0
    resources_kept: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> resource type -> count
    elements_removed: dict[str, int] = field(default_factory=dict)  # element label -> count
    references_dropped: int = 0
    refused: str | None = None  # set when the profile forbids person-level delivery
    # entry position in the input → why it was dropped (bulk counts a shared resource's copies once)
    dropped_at: dict[int, str] = field(default_factory=dict)

    def drop(self, reason: str, rtype: str, position: int | None = None) -> None:
        per = self.dropped.setdefault(reason, {})
        per[rtype] = per.get(rtype, 0) + 1
        if position is not None:
            self.dropped_at[position] = reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "resourcesIn": self.resources_in,
            "resourcesKept": self.resources_kept,
            "dropped": self.dropped,
            "elementsRemoved": dict(sorted(self.elements_removed.items())),
            "referencesDropped": self.references_dropped,
            "refused": self.refused,
        }


@dataclass(frozen=True)
class DeidResult:
    bundle: dict[str, Any]
    report: DeidReport
    # the input entry each output entry came from (None: the Provenance the gateway adds), so that a finding
    # in the output can be named by the entry the sender wrote
    sources: list[int | None] = field(default_factory=list)


# ── compile ──────────────────────────────────────────────────────────────────────────────────────────────


class _Compiler:
    """Turns profile allow-list + rules into nodes, once. Datatype nodes are shared (cached per datatype)."""

    def __init__(self, profile: Profile, rules: Rules, types: R4Types):
        self.profile, self.rules, self.types = profile, rules, types
        self.cache: dict[str, p.Node] = {}
        self.shift = profile.switch("generalise.dates") == "shift"

    def method(self, rule: Rule) -> str:
        if rule.profile_switch and self.profile.switch(rule.profile_switch) in ("keep", "keep-metadata"):
            return "keep"
        return rule.method

    def param(self, rule: Rule) -> str | None:
        if rule.to and rule.to.startswith("profile:"):
            return self.profile.switch(rule.to[len("profile:") :])
        return rule.to

    def node(self, definition: str, tree: Mapping[str, Any] | None, label: str) -> p.Node:
        if tree is None and definition in self.cache:
            return self.cache[definition]
        fields: dict[str, tuple] = {}
        node: p.Node = (fields, label, set(), self.types.must_have(definition))
        if tree is None:
            self.cache[definition] = node  # before filling: datatypes are recursive (Extension, Identifier)
        props = self.types.elements[definition]
        for name, et in props.items():
            if name.startswith("_"):
                continue
            path = f"{label}.{name}"
            if tree is not None and name not in tree and name not in ("extension", "modifierExtension"):
                fields[name] = (p.REMOVE, None, None, None, path)
                continue
            fields[name] = self.field(
                definition, label, name, et.type, None if tree is None else tree.get(name)
            )
        for name in props:
            if name.startswith("_"):
                base = fields.get(name[1:])
                if base is not None and base[0] != p.REMOVE:
                    fields[name] = (
                        p.CALL,
                        self.node("Element", None, "Element"),
                        p.primitive_element,
                        None,
                        f"{label}.{name}",
                    )
                else:
                    fields[name] = (p.REMOVE, None, None, None, f"{label}.{name}")
        return p.finish(node)

    def extension_node(self, shape: ExtensionShape, label: str = "Extension") -> p.Node:
        """A kept extension's node: its url, the value types its shape names, its parts; nothing else."""
        elements = self.types.elements["Extension"]
        tree = {n: None for n in elements if not n.startswith(("value", "_value")) or n in shape.values}
        node = self.node("Extension", tree, label)
        parts = {url: self.extension_node(ExtensionShape(kinds), label) for url, kinds in shape.parts.items()}
        node[0]["extension"] = (p.CALL, None, p.extensions, parts, f"{label}.extension")
        return node

    def field(self, definition: str, owner: str, name: str, type_name: str, sub: Any) -> tuple:
        path = f"{owner}.{name}"
        if name == "extension":
            return (p.CALL, None, p.extensions, None, path)  # a kept extension's parts: `extension_node`
        if name == "modifierExtension":
            return (p.CALL, None, p.modifier_extensions, None, path)
        if name == "id":
            return (p.REMOVE, None, None, None, path)  # element ids are internal and may carry anything
        # a narrowed element's node is labelled by its place ("Observation.note"): the rules of its datatype's
        # elements ("Annotation.authorString") hold there too (a probe's profile listing note.authorString
        # and code.text delivered both)
        rule = (
            self.rules.paths.get(path)
            or self.rules.paths.get(f"{definition}.{name}")
            or self.rules.datatypes.get(type_name)
        )
        method = self.method(rule) if rule else "keep"
        if method == "remove" or type_name == "ResourceList":
            return (p.REMOVE, None, None, None, path)
        if method == "pseudonymise-reference":
            return (p.CALL, None, p.pseudonymise_reference, None, path)
        if method == "replace-with-pseudonyms":
            return (p.CALL, None, p.replace_with_pseudonyms, None, path)
        if method == "generalise" and rule is not None:
            return self.generalise(rule, path, type_name)
        if type_name not in self.types.elements:
            return (p.KEEP, None, None, None, path)
        restricted = sub is not None
        sublabel = path if restricted or self.types.is_backbone(type_name) else type_name
        if restricted:
            return (p.COMPLEX, self.node(type_name, sub, sublabel), None, None, path)
        if self.types.is_backbone(type_name):
            # backbone definitions occur at one place only, so their cache key is unique
            return (p.COMPLEX, self.node(type_name, None, sublabel), None, None, path)
        return (p.COMPLEX, self.node(type_name, None, type_name), None, None, path)

    def generalise(self, rule: Rule, path: str, type_name: str) -> tuple:
        to = self.param(rule)
        if rule.kind == "date":
            if to == "shift":
                # a Period's partial start or end moves with its first or last day (start <= end stays)
                partial = "first" if path.endswith(".start") else "last" if path.endswith(".end") else None
                return (p.CALL, None, p.generalise_date, partial, path)
            return (p.KEEP, None, None, None, path)
        if rule.kind == "birthDate":
            if to == "drop":
                return (p.REMOVE, None, None, None, path)
            return (p.CALL, None, p.generalise_birthdate, (to, self.shift), path)
        return (p.COMPLEX, self.address_node(rule, to), None, None, path)

    def address_node(self, rule: Rule, postcode: str | None) -> p.Node:
        key = f"Address#generalised#{postcode}"
        if key in self.cache:
            return self.cache[key]
        fields: dict[str, tuple] = {}
        node: p.Node = (fields, "Address", set(), self.types.must_have("Address"))
        self.cache[key] = node
        for name, et in self.types.elements["Address"].items():
            path = f"Address.{name}"
            if name == "postalCode" and postcode == "pc4":
                fields[name] = (p.CALL, None, p.generalise_postcode, None, path)
            elif name in rule.keep:
                if name.startswith("_"):
                    fields[name] = (
                        p.CALL,
                        self.node("Element", None, "Element"),
                        p.primitive_element,
                        None,
                        path,
                    )
                else:
                    fields[name] = self.field("Address", "Address", name, et.type, None)
            else:
                fields[name] = (p.REMOVE, None, None, None, path)
        return p.finish(node)

    def resource_node(self, rtype: str, paths: tuple[str, ...]) -> p.Node:
        tree = expand_tree(self.types, rtype, _path_tree(list(paths)))
        fields, label, _, _ = self.node(rtype, tree, rtype)
        fields = dict(fields)
        for name in _STRUCTURAL_RESOURCE:
            fields[name] = (p.REMOVE, None, None, None, None)  # rebuilt by the engine, not counted
        # a resource's required elements are checked by the engine, which drops the resource with a reason
        return p.finish((fields, label, set(), ()))


def compile_plan(profile: Profile, rules: Rules) -> Plan:
    """Combine a validated profile and rules into the nodes the walk uses. Call once per profile."""
    types = r4()
    listed = profile.extensions
    if listed is not None and (problems := extension_problems(list(listed), rules.extensions)):
        raise ProfileError(profile.source or profile.id, problems)
    comp = _Compiler(profile, rules, types)
    nodes = {rtype: comp.resource_node(rtype, paths) for rtype, paths in profile.resources.items()}
    # a profile's list narrows the rules' extensions; the modifier extensions the rules accept stay walked
    received = rules.shapes.keys() if listed is None else {*listed, *rules.modifier_extensions}
    return Plan(
        profile=profile,
        nodes=MappingProxyType(nodes),
        required=MappingProxyType({rtype: types.must_have(rtype) for rtype in nodes}),
        # allowed modifier extensions are walked like kept extensions once the resource is accepted
        extension_nodes=MappingProxyType(
            {u: comp.extension_node(s) for u, s in rules.shapes.items() if u in received}
        ),
        modifier_ok=rules.modifier_extensions,
        keep_display=profile.switch("free_text.reference_display") == "keep",
        shift_dates=comp.shift,
        shift_max_days=int(profile.generalise.get("date_shift_max_days", 180)),
    )


# `Type/id`, optionally with a version: a literal relative reference (FHIR id syntax)
_RELATIVE_REFERENCE = re.compile(
    r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9.\-]{1,64})(?:/_history/[A-Za-z0-9.\-]{1,64})?"
)


# ── ids and references ─────────────────────────────────────────────────────────────────────────────────────


class _Ids:
    """Keyed opaque ids: HMAC-SHA-256(id_key, registry | type | original)."""

    def __init__(self, id_key: bytes, registry: str):
        # HMAC (RFC 2104) with the key's inner and outer SHA-256 states computed once per call of deidentify:
        # copying a hashlib state is C-level, so an id costs ~0.7 us instead of ~1.6 us for hmac.digest.
        key = (hashlib.sha256(id_key).digest() if len(id_key) > 64 else id_key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._prefix = registry + "\x1f"

    def digest(self, *parts: str) -> bytes:
        inner = self._inner.copy()
        inner.update((self._prefix + "\x1f".join(parts)).encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def uuid(self, *parts: str) -> str:
        h = self.digest(*parts)[:16].hex()
        # version nibble 8 (custom, hash-derived) and the RFC variant bits, set on the hex string directly
        return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"

    def offset(self, patient_key: str, max_days: int) -> int:
        n = int.from_bytes(self.digest("date-shift", patient_key)[:4], "big") % (2 * max_days)
        return n - max_days if n < max_days else n - max_days + 1  # never 0: a zero shift keeps real dates


@dataclass(slots=True)
class _Candidate:
    rtype: str
    resource: dict[str, Any]
    new_id: str
    pseudonyms: list[dict[str, Any]]
    index: int  # of its entry in the input
    shift_key: str | None = None  # a Patient's date-shift key (see `_offsets`)
    base: str | None = None  # its entry's RESTful base (`WalkContext.base`)


class _Resolver:
    """Maps every way the input can point at a delivered resource to its new ``urn:uuid``."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}
        self.by_identifier: dict[tuple[str, str | None, str], str | None] = {}
        self.cache: dict[str, str | None] = {}
        # the identifier index is only needed for conditional references (rare): built on first use
        self.pending: list[tuple[str, dict[str, Any], str]] = []
        self.indexed = False
        # references to resources outside the Bundle (`Type/id`) → `Type/<opaque id>`, when the profile says
        # `references.outside_bundle: opaque-id`; empty otherwise
        self.outside: dict[str, str] = {}

    def add(self, rtype: str, resource: dict[str, Any], keys: list[str], urn: str) -> None:
        for k in keys:
            self.by_key[k] = urn
        self.pending.append((rtype, resource, urn))

    def _index(self) -> None:
        for rtype, resource, urn in self.pending:
            self._index_identifiers(rtype, resource, urn)
        self.indexed = True

    def _index_identifiers(self, rtype: str, resource: dict[str, Any], urn: str) -> None:
        idents = resource.get("identifier")
        if type(idents) is not list:
            return
        for ident in idents:
            if type(ident) is not dict or type(ident.get("value")) is not str:
                continue
            system = ident.get("system") if type(ident.get("system")) is str else ""
            for key in ((rtype, system, ident["value"]), (rtype, None, ident["value"])):
                # an identifier shared by two resources resolves to neither (never guess)
                self.by_identifier[key] = urn if self.by_identifier.get(key, urn) == urn else None

    def __call__(self, ref: str) -> str | None:
        hit = self.cache.get(ref, "")
        if hit != "":
            return hit
        result = self._resolve(ref)
        self.cache[ref] = result
        return result

    def _resolve(self, ref: str) -> str | None:
        hit = self.by_key.get(ref)
        if hit is not None or ref.startswith("#"):
            return hit  # contained resources are never delivered: '#id' resolves to nothing
        if "?" in ref:
            return self._conditional(ref)
        base = ref.split("/_history/", 1)[0].rstrip("/")
        hit = self.by_key.get(base)
        if hit is None and "://" not in base:
            # a relative one by its Type/id; an absolute URL that is no entry's fullUrl is another server's
            # (as validation reads it): a probe's `http://other.org/fhir/Observation/o2` became the local o2
            parts = base.rsplit("/", 2)
            if len(parts) >= 2:
                hit = self.by_key.get(f"{parts[-2]}/{parts[-1]}")
        return hit if hit is not None else self.outside.get(ref)

    def _conditional(self, ref: str) -> str | None:
        # Only `Type?identifier=[system|]value` can be resolved; the raw identifier never leaves.
        if not self.indexed:
            self._index()
        rtype, _, query = ref.partition("?")
        params = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "identifier":
            return None
        value = params[0][1]
        if "|" in value:
            system, _, val = value.partition("|")
            return self.by_identifier.get((rtype, system, val))
        return self.by_identifier.get((rtype, None, value))


# ── deidentify ───────────────────────────────────────────────────────────────────────────────────────────


def _entry_keys(entry: dict[str, Any], rtype: str, resource: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    full = entry.get("fullUrl")
    if type(full) is str and full:
        keys.append(full)
        if not full.startswith("urn:"):  # an absolute URL also answers to its Type/id tail
            tail = full.split("/_history/", 1)[0].rsplit("/", 2)
            if len(tail) == 3 and tail[1] == rtype:
                keys.append(f"{rtype}/{tail[2]}")
    rid = resource.get("id")
    if type(rid) is str and rid:
        keys.append(f"{rtype}/{rid}")
    return keys


def _modifiers_ok(value: Any, allowed: frozenset[str]) -> bool:
    if type(value) is not list:
        return False
    return all(type(e) is dict and type(e.get("url")) is str and e["url"] in allowed for e in value)


def _lookup_pseudonyms(keys: list[str], pseudonyms: Mapping[str, list[dict]]) -> list[dict[str, Any]]:
    for k in keys:
        found = pseudonyms.get(k)
        if found:
            return [dict(i) for i in found if isinstance(i, Mapping)]
    return []


def _select(
    entries: list[Any],
    plan: Plan,
    ids: _Ids,
    pseudonyms: Mapping[str, list[dict]],
    report: DeidReport,
    shift_keys: Mapping[str, str],
) -> tuple[list[_Candidate], _Resolver]:
    """Pre-pass over entries only (not deep): which resources are delivered, and their new ids."""
    known = r4().resources
    nodes = plan.nodes
    person_level = plan.profile.person_level
    resolver = _Resolver()
    by_key, pending = resolver.by_key, resolver.pending  # resolver.add, inlined for the hot loop
    candidates: list[_Candidate] = []
    used: set[str] = set()
    for index, entry in enumerate(entries):
        res = entry.get("resource") if type(entry) is dict else None
        if type(res) is not dict or type(res.get("resourceType")) is not str:
            report.drop("no-resource", "(none)")
            continue
        rtype = res["resourceType"]
        label = rtype if rtype in known else "(unknown)"  # resourceType is input: only known names reported
        report.resources_in += 1
        if not person_level:
            report.drop("aggregated-only", label, index)
        elif rtype not in nodes:
            report.drop("type-not-allowed", label, index)
        elif "modifierExtension" in res and not _modifiers_ok(res["modifierExtension"], plan.modifier_ok):
            report.drop("unknown-modifierExtension", label, index)
        else:
            keys = _entry_keys(entry, rtype, res)
            pseud = _lookup_pseudonyms(keys, pseudonyms) if rtype == "Patient" else []
            if rtype == "Patient" and not pseud:
                # fail closed: an unlinkable patient is not delivered
                report.drop("no-pseudonym", label, index)
                continue
            basis = (
                keys[-1]
                if keys
                else hashlib.sha256(orjson.dumps(res, option=orjson.OPT_SORT_KEYS)).hexdigest()
            )
            new_id = ids.uuid(rtype, basis)
            if new_id in used:
                new_id = ids.uuid(rtype, basis, str(index))
            used.add(new_id)
            urn = "urn:uuid:" + new_id
            for k in keys:
                by_key[k] = urn
            pending.append((rtype, res, urn))
            shift = next((shift_keys[k] for k in keys if k in shift_keys), None) if pseud else None
            base = restful_base(entry.get("fullUrl"))
            candidates.append(_Candidate(rtype, res, new_id, pseud, index, shift, base))
    return candidates, resolver


def _offsets(
    candidates: list[_Candidate], resolver: _Resolver, plan: Plan, ids: _Ids, patient_of: Mapping[int, int]
) -> list[int]:
    """Per-resource date offset: that of the patient it belongs to. Keyed on the patient's shift key (a
    pre-pseudonym, `pseudonymise.shift_basis`: the same at every hospital, across the TTP's key versions and
    for records of one person), else its first pseudonym. A resource's patient: its `subject`/`patient`,
    else the one it is tied to through references (`patient_of`, input entry → the Patient's entry), else
    the only one in the bundle; a shared resource (a Medication) has its own, by its opaque id."""
    if not plan.shift_dates:
        return [0] * len(candidates)
    days, registry = plan.shift_max_days, plan.registry
    patients: dict[str, int] = {}
    by_entry: dict[int, int] = {}
    for c in candidates:
        if c.rtype == "Patient":
            offset = (
                shift_offset(bytes.fromhex(c.shift_key), registry, days)
                if c.shift_key
                else ids.offset(str(c.pseudonyms[0].get("value", c.new_id)), days)
            )
            patients["urn:uuid:" + c.new_id] = by_entry[c.index] = offset
    only = next(iter(patients.values())) if len(patients) == 1 else None
    fallback = ids.offset("bundle:" + ",".join(sorted(patients)), plan.shift_max_days)
    out = []
    for c in candidates:
        off = patients.get("urn:uuid:" + c.new_id)
        shared = c.rtype in SHARED_TYPES
        if off is None and not shared:
            off = only
        if off is None:
            for key in ("subject", "patient"):
                ref = c.resource.get(key)
                target = (
                    resolver(ref["reference"])
                    if type(ref) is dict and type(ref.get("reference")) is str
                    else None
                )
                if target in patients:
                    off = patients[target]
                    break
        if off is None and c.index in patient_of:
            off = by_entry.get(patient_of[c.index])
        if off is None and shared:
            off = ids.offset("resource:" + c.new_id, days)  # the same in every Bundle that carries it
        out.append(fallback if off is None else off)
    return out


def shift_offset(pre_pseudonym: bytes, registry: str, max_days: int) -> int:
    """A patient's date offset for one registry: HMAC-SHA-256 under their pre-pseudonym, so that every
    hospital (one source key) shifts one person alike without sharing a secret of its own; never 0."""
    digest = hmac.digest(pre_pseudonym, f"nlps1-date-shift|{registry}".encode(), "sha256")
    n = int.from_bytes(digest[:4], "big") % (2 * max_days)
    return n - max_days if n < max_days else n - max_days + 1


# Security labels that tell the registry how to handle a resource (restricted, psychiatry, HIV...): kept as
# system and code, never a display; any other label (a local one may be text) is dropped.
_LABEL_SYSTEMS = frozenset(
    {
        "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    }
)
_LABEL_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def _meta(src: Any, patient: bool) -> dict[str, Any] | None:
    meta: dict[str, Any] = {}
    if type(src) is dict and type(src.get("profile")) is list:
        profiles = [x for x in src["profile"] if type(x) is str]
        if profiles:
            meta["profile"] = profiles
    labels = [dict(PSEUDED)] if patient else []
    if type(src) is dict and type(src.get("security")) is list:
        for label in src["security"]:
            if type(label) is dict and label.get("system") in _LABEL_SYSTEMS:
                code = label.get("code")
                if type(code) is str and _LABEL_CODE.fullmatch(code):
                    labels.append({"system": label["system"], "code": code})
    if labels:
        meta["security"] = labels
    return meta or None


def _patient_meta(res: dict[str, Any], out: dict[str, Any]) -> None:
    out["meta"] = _meta(res.get("meta"), True)


def _prune(value: Any, dead: set[str], definition: str, types: R4Types) -> Any:
    """Remove references into ``dead`` (resources dropped during the walk); rare, so a plain recursion.
    Typed like the walk: an element that loses something R4 requires of it goes too (an
    ``Encounter.diagnosis`` whose ``condition`` was dropped); the resource's own check is the caller's."""
    if type(value) is list:
        return [r for r in (_prune(v, dead, definition, types) for v in value) if r is not None]
    if type(value) is not dict or definition not in types.elements:
        return value
    if value.get("reference") in dead:
        return None
    elements = types.elements[definition]
    out = {}
    for k, v in value.items():
        et = elements.get(k)
        r = _prune(v, dead, et.type, types) if et is not None else v
        if r is not None and r != [] and r != {}:
            out[k] = r
    if definition not in types.resources and not p.complete(out, types.must_have(definition)):
        return None
    return out


# ── a Location or Organization at the patient's home (a home visit; gateway/deid/homes.py) ─────────────────
# Their addresses are kept as a public place's; at the patient's own address it is theirs, and it gets what
# the profile gives Patient.address (PC4, no street), or nothing when the profile delivers none. What else
# names such a place names the home: its identifier (a BAG verblijfsobject id, a KvK number), its name
# ("Lindengracht 87"), its telecom, a Location's coordinates (a privacy probe found the first two delivered).

_AT_HOME_TYPES = ("Location", "Organization")
_NAMING_A_HOME = ("identifier", "name", "alias", "telecom", "position", "description", "contact")
_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def _masked() -> dict[str, Any]:
    """A primitive's `_element` saying its value is withheld (a fresh one per output: outputs are mutable)."""
    return {"extension": [{"url": _ABSENT, "valueCode": "masked"}]}


def _generalise_homes(
    kept: list[tuple[_Candidate, dict[str, Any]]],
    entries: list[Any],
    plan: Plan,
    ctx: p.WalkContext,
    other_people: Iterable[dict[str, Any]] = (),
) -> None:
    places = [(c, out) for c, out in kept if c.rtype in _AT_HOME_TYPES]
    people = itertools.chain((e.get("resource") for e in entries if type(e) is dict), other_people)
    homes = person_homes(people) if places else []
    by_urn = {"urn:uuid:" + c.new_id: (c, out) for c, out in places}
    # what a home is part of (its building, "Woonblok Lindengracht" at "Lindengracht 85-89") and what is part
    # of it (a room, numbered after the home's BAG id) name the home too (re-probes: each was delivered
    # beside the stripped home). Not who manages it: that is mostly the hospital or a home-care organisation.
    near: dict[str, set[str]] = {urn: set() for urn in by_urn}
    for urn, (_, out) in by_urn.items():
        parent = out.get("partOf")
        parent = parent.get("reference") if type(parent) is dict else None
        if parent in by_urn:
            near[urn].add(parent)
            near[parent].add(urn)
    at_homes = [urn for urn, (c, _) in by_urn.items() if at_home(c.resource, homes)]
    done: set[str] = set()
    while at_homes:
        urn = at_homes.pop()
        if urn in done:
            continue
        done.add(urn)
        c, out = by_urn[urn]
        if "address" in out:
            _generalise_home_address(c.resource, out, plan, ctx)
        _unname_home(out, ctx)
        at_homes += near[urn] - done


def _unname_home(out: dict[str, Any], ctx: p.WalkContext) -> None:
    rtype = out["resourceType"]
    for element in _NAMING_A_HOME:
        if out.pop(element, None) is not None:
            ctx.count(f"{rtype}.{element}.(patient-home)")
        out.pop("_" + element, None)
    if rtype == "Organization":  # org-1 asks for a name or an identifier: the name's place says it's withheld
        out["_name"] = _masked()


def _generalise_home_address(
    place: dict[str, Any], out: dict[str, Any], plan: Plan, ctx: p.WalkContext
) -> None:
    patient = plan.nodes.get("Patient")
    field_ = patient[0].get("address") if patient else None
    address = place.get("address")
    items = address if type(address) is list else [address]
    general = []
    if field_ and field_[0] == p.COMPLEX:
        general = [g for g in (p.walk(a, field_[1], ctx) for a in items if type(a) is dict) if g]
    if general:
        out["address"] = general if type(address) is list else general[0]
    else:
        del out["address"]
    ctx.count(f"{place['resourceType']}.address.(patient-home)")


def _walk_all(
    candidates: list[_Candidate],
    offsets: list[int],
    plan: Plan,
    ctx: p.WalkContext,
    report: DeidReport,
    links: dict[str, list[str]],
) -> list[tuple[_Candidate, dict[str, Any]]]:
    """Each candidate walked by its plan; `links` gets the references each one kept wrote (by its urn)."""
    kept: list[tuple[_Candidate, dict[str, Any]]] = []
    dead: set[str] = set()
    required = plan.required
    types = r4()
    nodes = plan.nodes
    walk = p.walk
    for c, off in zip(candidates, offsets, strict=True):
        ctx.date_offset, ctx.base = off, c.base
        ctx.emitted = links["urn:uuid:" + c.new_id] = []
        rtype, res = c.rtype, c.resource
        out: dict[str, Any] = {"resourceType": rtype, "id": c.new_id}
        try:
            if rtype == "Patient":
                ctx.pseudonyms = c.pseudonyms
                _patient_meta(res, out)
                walk(res, nodes[rtype], ctx, out)
                out["identifier"] = [dict(i) for i in c.pseudonyms]
            else:
                if "meta" in res:
                    meta = _meta(res["meta"], False)
                    if meta:
                        out["meta"] = meta
                walk(res, nodes[rtype], ctx, out)
        except p.DropResource as exc:
            report.drop(exc.reason, c.rtype, c.index)
            dead.add("urn:uuid:" + c.new_id)
            continue
        if p.complete(out, required[c.rtype]):
            kept.append((c, out))
        else:
            # e.g. Condition.subject pointed at a patient that is not delivered, or the only medication
            # was free text: the rest is meaningless, and not valid R4
            report.drop("required-element-lost", c.rtype, c.index)
            dead.add("urn:uuid:" + c.new_id)
    while True:
        if not dead:
            return kept
        # drops during the walk (rare): remove references to them, which may cascade
        kept = [(c, _prune(out, dead, c.rtype, types)) for c, out in kept]
        lost = [(c, out) for c, out in kept if not p.complete(out, required[c.rtype])]
        if not lost:
            return kept
        for c, _ in lost:
            # e.g. Condition.subject pointed at a patient that is not delivered: the rest is meaningless
            report.drop("required-element-lost", c.rtype, c.index)
            dead.add("urn:uuid:" + c.new_id)
        kept = [(c, out) for c, out in kept if "urn:uuid:" + c.new_id not in dead]


def _linked_to_patients(
    kept: list[tuple[_Candidate, dict[str, Any]]], links: dict[str, list[str]], report: DeidReport
) -> list[tuple[_Candidate, dict[str, Any]]]:
    """`gateway.linkage` on what the walk left: the profile may have cut the only link of a resource to its
    patient (an Observation tied to them through an Encounter the registry does not get), or a Patient may
    be left out (an unknown modifier extension). Whose data the rest is cannot be known: not delivered."""
    urns = {"urn:uuid:" + c.new_id: c for c, _ in kept}
    patients = [urn for urn, c in urns.items() if c.rtype == "Patient"]
    types = {urn: c.rtype for urn, c in urns.items()}
    named = {t for urn in urns if types[urn] not in SHARED_TYPES for t in links.get(urn, ())}
    reached = linked_to_patients({urn: links.get(urn, ()) for urn in urns}, types, patients, named)
    if len(reached) == len(urns):
        return kept
    dead = set(urns) - reached
    for urn in dead:
        report.drop("not-linked-to-a-patient", urns[urn].rtype, urns[urn].index)
    out = []
    types_r4 = r4()
    for c, resource in kept:
        urn = "urn:uuid:" + c.new_id
        if urn in dead:
            continue
        if dead.intersection(links.get(urn, ())):  # a shared role's reference to what does not go
            resource = _prune(resource, dead, c.rtype, types_r4)
            if not p.complete(resource, types_r4.must_have(c.rtype)):
                report.drop("required-element-lost", c.rtype, c.index)
                continue
        out.append((c, resource))
    return out


_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
# a profile's purpose as the purpose of use the Provenance states
_PURPOSE_OF_USE = {
    "quality-registry": "HQUALIMP",
    "scientific-research": "HRESCH",
    "management-information": "HOPERAT",
}


def _provenance(entries: list[dict[str, Any]], plan: Plan, ids: _Ids, info: ProvenanceInfo) -> dict[str, Any]:
    content = hashlib.sha256(orjson.dumps(entries)).hexdigest()
    pid = ids.uuid("Provenance", content)
    reason = _PURPOSE_OF_USE.get(plan.profile.purpose)
    # an empty `reason` list is not R4 (a probe's research profile had one): no reason then, not []
    reasons = {"reason": [{"coding": [{"system": _ACT_REASON, "code": reason}]}]} if reason else {}
    return {
        "fullUrl": "urn:uuid:" + pid,
        "resource": {
            "resourceType": "Provenance",
            "id": pid,
            "target": [{"reference": e["fullUrl"]} for e in entries],
            "recorded": info.recorded,
            # what the registry must know to read the data: its dates moved (a registry holder's probe found
            # a shifting profile's Provenance alike to one that keeps dates)
            "policy": [f"urn:fhir-delivery-gateway:profile:{plan.registry}"]
            + (["urn:fhir-delivery-gateway:deid:dates-shifted-per-patient"] if plan.shift_dates else []),
            **reasons,
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle",
                        "code": "pseudonymize",
                        "display": "Pseudonymize Record Lifecycle Event",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "performer",
                            }
                        ]
                    },
                    "who": {"display": f"{info.gateway_name} {info.gateway_version}"},
                },
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "informant",
                            }
                        ]
                    },
                    "who": {"display": f"TTP {info.ttp_name}"},
                },
            ],
        },
        "request": {"method": "PUT", "url": "Provenance/" + pid},
    }


def deidentify(
    bundle: dict[str, Any],
    plan: Plan,
    *,
    id_key: bytes,
    pseudonyms: Mapping[str, list[dict]],
    provenance: ProvenanceInfo,
    outside_references: Iterable[str] = (),
    other_people: Iterable[dict[str, Any]] = (),
    shift_keys: Mapping[str, str] | None = None,
    patient_of: Mapping[int, int] | None = None,
) -> DeidResult:
    """De-identify one Bundle for the plan's registry; returns a transaction Bundle and a report.

    ``pseudonyms`` maps an original Patient fullUrl (and/or ``Patient/<id>``) to ready-made pseudonym
    Identifiers; a Patient without any is not delivered (reason ``no-pseudonym``). ``outside_references``
    are the references that the validation found to point outside the Bundle; they are dropped, unless the
    profile asks for ``references.outside_bundle: opaque-id`` (see ``outside_targets``). ``other_people``:
    Patients not delivered in this Bundle (an objecting one, another patient's in a bulk group) whose home
    addresses still make a place their home (see ``_generalise_homes``). ``shift_keys`` (keyed as
    ``pseudonyms``) and ``patient_of`` (entry index → its Patient's entry index) choose date offsets (see
    ``_offsets``).
    """
    # The walk allocates a container per element and builds no reference cycles (perf-notes: the GC makes
    # large bundles 2x slower). Harmless if another thread races on the switch.
    with paused_gc():
        return _deidentify(
            bundle,
            plan,
            id_key,
            pseudonyms,
            provenance,
            outside_references,
            other_people,
            shift_keys or {},
            patient_of or {},
        )


def outside_targets(references: Iterable[str], plan: Plan, ids: _Ids) -> dict[str, str]:
    """A relative reference `Type/id` to a resource that is not in the Bundle → `Type/<opaque id>`: the id
    that resource got, or gets, when it is delivered itself (an earlier delivery, say), since opaque ids
    are keyed on `Type/id` and stable per registry. Only for types the profile delivers, never Patient (a
    Patient must be in the Bundle); any other form (absolute, `urn:`, conditional) is still dropped."""
    if plan.profile.references.get("outside_bundle") != "opaque-id":
        return {}
    found: dict[str, str] = {}
    for ref in references:
        match = _RELATIVE_REFERENCE.fullmatch(ref)
        if match is None:
            continue
        rtype, rid = match.group(1), match.group(2)
        if rtype != "Patient" and rtype in plan.nodes:
            found[ref] = f"{rtype}/{ids.uuid(rtype, f'{rtype}/{rid}')}"
    return found


def _deidentify(
    bundle: dict[str, Any],
    plan: Plan,
    id_key: bytes,
    pseudonyms: Mapping[str, list[dict]],
    provenance: ProvenanceInfo,
    outside_references: Iterable[str],
    other_people: Iterable[dict[str, Any]],
    shift_keys: Mapping[str, str],
    patient_of: Mapping[int, int],
) -> DeidResult:
    report = DeidReport()
    raw_entries = bundle.get("entry") if isinstance(bundle, dict) else None
    entries = raw_entries if type(raw_entries) is list else []
    ids = _Ids(id_key, plan.registry)
    if not plan.profile.person_level:
        report.refused = "aggregated-only"
    candidates, resolver = _select(entries, plan, ids, pseudonyms, report, shift_keys)
    resolver.outside = outside_targets(outside_references, plan, ids)
    ctx = p.WalkContext(
        resolve=resolver,
        ref_map=resolver.by_key,
        keep_display=plan.keep_display,
        extensions=dict(plan.extension_nodes),
        modifier_ok=plan.modifier_ok,
    )
    links: dict[str, list[str]] = {}
    offsets = _offsets(candidates, resolver, plan, ids, patient_of)
    kept = _linked_to_patients(_walk_all(candidates, offsets, plan, ctx, report, links), links, report)
    _generalise_homes(kept, entries, plan, ctx, other_people)
    out_entries = [
        {
            "fullUrl": "urn:uuid:" + c.new_id,
            "resource": out,
            "request": {"method": "PUT", "url": f"{c.rtype}/{c.new_id}"},
        }
        for c, out in kept
    ]
    report.resources_kept = len(out_entries)
    report.elements_removed = ctx.removed
    report.references_dropped = ctx.references_dropped
    sources: list[int | None] = [c.index for c, _ in kept]
    if out_entries:
        out_entries.append(_provenance(out_entries, plan, ids, provenance))
        sources.append(None)
    bundle_id = ids.uuid("Bundle", *(e["fullUrl"] for e in out_entries[-1:]))
    return DeidResult(
        bundle={
            "resourceType": "Bundle",
            "id": bundle_id,
            # PSEUDED, and the Bundle's own confidentiality labels (a whole delivery marked very restricted)
            "meta": {"security": _meta(bundle.get("meta"), True)["security"]},
            "type": "transaction",
            "entry": out_entries,
        },
        report=report,
        sources=sources,
    )


def never_delivered(plan: Plan) -> list[tuple[str, str]]:
    """The resource types the plan can never deliver, each with a required element the rules always remove
    (`("DocumentReference", "content.attachment")` when attachments are dropped): valid, but surely not
    meant."""
    out = []
    for rtype, node in sorted(plan.nodes.items()):
        lost = _always_lost(node[0], plan.required.get(rtype, ()), set())
        if lost is not None:
            out.append((rtype, lost))
    return out


def _always_lost(
    fields: Mapping[str, tuple], required: tuple[tuple[str, ...], ...], seen: set[int]
) -> str | None:
    """A required element none of whose forms can survive (removed, or its every item losing one of its
    own), as a dotted path; None when each can. A node on the way being checked already counts as one
    that can (datatypes are recursive)."""
    for names in required:
        reasons = [_lost(fields.get(name), seen) for name in names]
        if all(r is not None for r in reasons):
            return names[0] + (reasons[0] if reasons[0] else "")
    return None


def _lost(field: tuple | None, seen: set[int]) -> str | None:
    if field is None or field[0] == p.REMOVE:
        return ""
    node = field[1]
    if field[0] != p.COMPLEX or node is None or id(node) in seen:
        return None
    inner = _always_lost(node[0], node[3], seen | {id(node)})
    return None if inner is None else "." + inner
