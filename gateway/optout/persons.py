"""Records of one person in a Bundle: an EHR duplicate (the same identifier) or merged records (a
Patient.link). The TTP gives them the same pseudonyms, so they are decided alike: an objection on one holds
for all. The bulk index joins them the same way (`gateway/bulk/index.py`, `_person_keys`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl

from gateway.identity import person_identifier
from gateway.optout.apply import patient_key
from gateway.optout.base import Decision
from gateway.pipeline.validate import PatientEntry


def same_person_alike(
    patients: Sequence[PatientEntry], decisions: dict[str, Decision]
) -> dict[str, Decision]:
    """Records of one person (`_records_of_one_person`) get the same pseudonyms, so the registry links them:
    an objection on one holds for all (objected before unknown)."""
    out = decisions
    for keys in _records_of_one_person(patients):
        worst = max((decisions[k] for k in keys), key=lambda d: _RANK[d.status])
        out = {**out, **{k: worst for k in keys if _RANK[worst.status] > _RANK[out[k].status]}}
    return out


_RANK = {"allowed": 0, "unknown": 1, "objected": 2}
_PATIENT_TAIL = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")


def _system_value(ident: object) -> tuple[str | None, str]:
    """`person_identifier`, with "" for the value when there is none."""
    return person_identifier(ident) or (None, "")


def _link_names(other: dict) -> list[object]:
    """What a Patient.link's `other` may name a record of the Bundle by (see `_records_of_one_person`)."""
    target = other.get("reference")
    if isinstance(target, str):
        if target.startswith("Patient?"):
            query = parse_qsl(target[8:], keep_blank_values=True)
            tokens = [v.rpartition("|") for k, v in query if k == "identifier"]
            pairs = [_system_value({"system": system, "value": value}) for system, _, value in tokens]
            return [(system, value) if system else value for system, value in pairs if value]
        tail = _PATIENT_TAIL.search(target)
        return [target, *([f"Patient/{tail.group(1)}"] if tail else [])]
    system, value = _system_value(other.get("identifier"))
    return [((system, value) if system else value)] if value else []


def _records_of_one_person(patients: Sequence[PatientEntry]) -> list[list[str]]:
    """The patient keys of records of one person, in groups of two or more (none in the common case): they
    share an identifier (system and value, spaces ignored, placeholders not), or one links to another by
    reference or identifier, however chained."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    def join(a: str, b: str) -> None:
        a, b = root(a), root(b)
        if a != b:
            parent[b] = a

    named: dict[object, list[str]] = {}  # fullUrl, Patient/id, (system, value), value -> keys
    for patient in patients:
        key = patient_key(patient)
        parent.setdefault(key, key)
        names: list[object] = [key]
        if isinstance(patient.resource.get("id"), str):
            names.append(f"Patient/{patient.resource['id']}")
        found = patient.resource.get("identifier")
        for ident in found if isinstance(found, list) else ():
            system, value = _system_value(ident)
            if value:
                names += [(system, value), value] if system else [value]
                for other in named.get((system, value), []) if system else ():
                    join(other, key)  # the same identifier: an EHR duplicate
        for name in names:
            named.setdefault(name, []).append(key)
    for patient in patients:  # a link to another record of the Bundle: merged records of one person
        links = patient.resource.get("link")
        for link in links if isinstance(links, list) else ():
            other = link.get("other") if isinstance(link, dict) else None
            for name in _link_names(other) if isinstance(other, dict) else ():
                for found_key in named.get(name, []):
                    join(found_key, patient_key(patient))
    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(root(key), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]
