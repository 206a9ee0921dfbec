"""Split one de-identified transaction Bundle (a whole patient group) into transaction Bundles of bounded
size.

Each output Bundle is self-contained for the registry: a patient travels with everything that (directly or
through other entries) refers to them, and every *shared* entry (one that leads to no patient: Organization,
Practitioner, Medication, ...) is copied into each Bundle that refers to it. Patients linked by a common entry
stay together. Each Bundle gets its own Provenance whose targets are its own entries, and an identifier
(`urn:fhir-gateway:bulk|<tag>`) the registry (and the test receiver) can count deliveries by.

Entries are serialised once, with orjson; the references are found in those bytes at C speed (the engine
writes every internal reference as `urn:uuid:<id>`), so no Python walk over the resources is needed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

IDENTIFIER_SYSTEM = "urn:fhir-gateway:bulk"
_URN_REF = re.compile(rb'"reference":"(urn:uuid:[0-9a-f-]{36})"')


@dataclass
class Chunk:
    tag: str
    payload: bytes
    counts: Counter[str]  # resource type → entries in this Bundle (Provenance included)
    picked: list[int] = field(default_factory=list)  # the entries of the split Bundle it carries
    # every Patient's new `Patient/<id>`: a later delivery of any of them waits for this Bundle
    patient_keys: tuple[str, ...] = ()

    @property
    def order_key(self) -> str | None:
        """The first Patient's new `Patient/<id>`."""
        return self.patient_keys[0] if self.patient_keys else None


def split_transaction(bundle: dict[str, Any], *, max_entries: int, tag: str) -> list[Chunk]:
    entries = list(bundle.get("entry") or [])
    provenance = entries.pop() if entries and _is_provenance(entries[-1]) else None
    if not entries:
        return []
    dumped = [orjson.dumps(e) for e in entries]
    position = {e.get("fullUrl"): i for i, e in enumerate(entries)}
    targets = [{position[r.decode()] for r in _URN_REF.findall(d) if r.decode() in position} for d in dumped]
    owned = _reaching_patients(entries, targets)
    parts = _pack(_components(owned, targets), max_entries)
    chunks = []
    for members in parts:
        picked = sorted(members | _shared_closure(members, targets, owned))
        chunk_tag = f"{tag}-{_carried(entries, members)}"
        chunks.append(_chunk(bundle, entries, dumped, picked, provenance, chunk_tag))
    return chunks


def _carried(entries: list[dict], members: set[int]) -> str:
    """What a Bundle is, for its identifier and the outbox's idempotency key: the patients it carries (their
    de-identified fullUrls, stable per registry). A group redone after an interruption may cut its Bundles
    otherwise (an objection registered in between, a patient the TTP could not answer for); a Bundle stored
    by the first run then counts as already stored only if the redone one carries the same patients, so no
    patient is skipped for having been in a different Bundle."""
    patients = sorted(
        entries[i]["fullUrl"] for i in members if entries[i]["resource"].get("resourceType") == "Patient"
    )
    return hashlib.sha256("\n".join(patients).encode()).hexdigest()[:16]


def _is_provenance(entry: Any) -> bool:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    return isinstance(resource, dict) and resource.get("resourceType") == "Provenance"


def _reaching_patients(entries: list[dict], targets: list[set[int]]) -> set[int]:
    """Entries from which a Patient can be reached by following references (the Patients included)."""
    reverse: list[list[int]] = [[] for _ in entries]
    for source, outs in enumerate(targets):
        for target in outs:
            reverse[target].append(source)
    seen = {i for i, e in enumerate(entries) if e["resource"].get("resourceType") == "Patient"}
    stack = list(seen)
    while stack:
        for source in reverse[stack.pop()]:
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return seen


def _components(owned: set[int], targets: list[set[int]]) -> list[set[int]]:
    parent = {i: i for i in owned}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for source in owned:
        for target in targets[source]:
            if target in owned:
                a, b = find(source), find(target)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, set[int]] = {}
    for i in sorted(owned):
        groups.setdefault(find(i), set()).add(i)
    return list(groups.values())


def _pack(components: list[set[int]], max_entries: int) -> list[set[int]]:
    """First fit in order: deterministic, so a re-run cuts the same Bundles (idempotency keys match)."""
    parts: list[set[int]] = []
    current: set[int] = set()
    for comp in components:
        if current and len(current) + len(comp) > max_entries:
            parts.append(current)
            current = set()
        current |= comp
    if current:
        parts.append(current)
    return parts


def _shared_closure(members: set[int], targets: list[set[int]], owned: set[int]) -> set[int]:
    shared: set[int] = set()
    stack = [t for m in members for t in targets[m] if t not in owned]
    while stack:
        i = stack.pop()
        if i not in shared:
            shared.add(i)
            stack.extend(t for t in targets[i] if t not in owned)
    return shared


def _chunk(
    bundle: dict[str, Any],
    entries: list[dict],
    dumped: list[bytes],
    picked: list[int],
    provenance: dict | None,
    tag: str,
) -> Chunk:
    parts = [dumped[i] for i in picked]
    counts: Counter[str] = Counter(entries[i]["resource"].get("resourceType") for i in picked)
    if provenance is not None:
        parts.append(orjson.dumps(_provenance_for(provenance, [entries[i]["fullUrl"] for i in picked], tag)))
        counts["Provenance"] += 1
    head = {
        "resourceType": "Bundle",
        "id": _uuid(f"bundle|{tag}"),
        "meta": bundle.get("meta") or {},
        "identifier": {"system": IDENTIFIER_SYSTEM, "value": tag},
        "type": "transaction",
    }
    payload = orjson.dumps(head)[:-1] + b',"entry":[' + b",".join(parts) + b"]}"
    patient_keys = tuple(
        f"Patient/{entries[i]['resource'].get('id')}"
        for i in picked
        if entries[i]["resource"].get("resourceType") == "Patient"
    )
    return Chunk(tag, payload, counts, picked, patient_keys)


def _provenance_for(provenance: dict, full_urls: list[str], tag: str) -> dict[str, Any]:
    resource = dict(provenance["resource"])
    pid = _uuid(f"provenance|{resource.get('id')}|{tag}")
    resource["id"] = pid
    resource["target"] = [{"reference": u} for u in full_urls]
    return {
        "fullUrl": f"urn:uuid:{pid}",
        "resource": resource,
        "request": {"method": "PUT", "url": f"Provenance/{pid}"},
    }


def _uuid(text: str) -> str:
    """A deterministic UUID-shaped id from non-personal text (job, group and chunk numbers)."""
    b = bytearray(hashlib.sha256(text.encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
