"""Pass 2 for one patient group: read its lines by offset, run the whole chain once (ONE TTP batch for all its
patients), cut the result into transaction Bundles.

A chain error is narrowed down instead of failing the group: an error that names entries
(`Bundle.entry[i]...`: schema errors, a reference to a Patient that is not there) drops those entries
(reported
by file and line number, never by value) and the group is run again; an error that names no entry splits the
group in halves, down to a single patient, whose resources are then reported as rejected.
TTPUnavailable and store errors are not caught: the job stops and can be resumed (fail closed).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.bulk.chunks import Chunk, split_transaction
from gateway.bulk.index import Line
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import SchemaValidator
from gateway.process import ProviderChain, RegistryChain, process_bundle
from gateway.pseudonym.mapping import InputMapping

MAX_RETRIES = 4
_ENTRY = re.compile(r"^Bundle\.entry\[(\d+)\]")
_UUID_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Chains:
    """What the chain needs for one (registry, provider): from a Runtime or built offline."""

    registry: RegistryChain
    provider: ProviderChain
    validator: SchemaValidator
    mapping: InputMapping


@dataclass
class GroupResult:
    chunks: list[Chunk] = field(default_factory=list)
    patients: int = 0
    patients_opted_out: int = 0
    patients_unknown_optout: int = 0
    patients_no_pseudonym: int = 0
    resources_opted_out: int = 0
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # reason → resource type → count
    rejected_lines: list[tuple[int, int, str]] = field(default_factory=list)  # (file, line, reason)
    known_types: frozenset[str] = frozenset()

    def drop(self, reason: str, rtype: str, n: int = 1) -> None:
        label = rtype if rtype in self.known_types else "(unknown)"  # a type name from input only if R4
        self.dropped.setdefault(reason, Counter())[label] += n

    def add_report(self, report: dict[str, Any]) -> None:
        self.patients_opted_out += int(report.get("patientsDroppedOptOut") or 0)
        self.patients_unknown_optout += int(report.get("patientsDroppedUnknownOptOut") or 0)
        self.patients_no_pseudonym += int(report.get("patientsDroppedNoPseudonym") or 0)
        self.resources_opted_out += int(report.get("resourcesDroppedOptOut") or 0)
        deid = report.get("deidentification") or {}
        for reason, per_type in (deid.get("dropped") or {}).items():
            for rtype, n in per_type.items():
                self.drop(f"deid:{reason}", rtype, int(n))


@dataclass(frozen=True)
class _Item:
    line: Line
    owner: int | None
    resource: dict


async def run_group(
    lines: list[Line],
    read: Callable[[Line], bytes],
    chains: Chains,
    *,
    tag: str,
    bundle_size: int,
    max_line_bytes: int,
    recorded: str,
) -> GroupResult:
    result = GroupResult(known_types=chains.validator.resource_types)
    items: list[_Item] = []
    for line in lines:
        try:
            resource = parse_json(read(line), max_bytes=max_line_bytes)
        except FhirError as err:
            result.rejected_lines.append((line.file, line.line, f"invalid-{err.issues[0].code}"))
            result.drop("invalid-line", line.rtype)
            continue
        items.append(_Item(line, line.owner, resource))
    result.patients = sum(1 for i in items if i.resource.get("resourceType") == "Patient")
    bundles = await _process(items, chains, result, recorded)
    for number, bundle in enumerate(bundles):
        sub_tag = tag if len(bundles) == 1 else f"{tag}.{number}"
        result.chunks.extend(split_transaction(bundle, max_entries=bundle_size, tag=sub_tag))
    return result


async def _process(items: list[_Item], chains: Chains, result: GroupResult, recorded: str) -> list[dict]:
    """De-identified bundles for `items` (one normally; several when the group had to be split)."""
    for _ in range(MAX_RETRIES):
        if not any(i.resource.get("resourceType") == "Patient" for i in items):
            for item in items:
                result.drop("no-patient-left", item.line.rtype)
            return []
        try:
            processed = await process_bundle(
                _collection(items),
                registry=chains.registry,
                provider=chains.provider,
                validator=chains.validator,
                mapping=chains.mapping,
                recorded=recorded,
            )
        except FhirError as err:
            bad = _entries_named(err, len(items))
            if not bad:
                return await _split(items, chains, result, recorded, err)
            for i in sorted(bad):
                code = next(
                    (
                        iss.code
                        for iss in err.issues
                        if _ENTRY.match(iss.expression[0] if iss.expression else "")
                    ),
                    "invalid",
                )
                result.rejected_lines.append((items[i].line.file, items[i].line.line, f"rejected-{code}"))
                result.drop(f"rejected-{err.status}", items[i].line.rtype)
            items = [item for n, item in enumerate(items) if n not in bad]
            continue
        result.add_report(processed.report)
        return [processed.bundle] if processed.bundle is not None else []
    return await _split(items, chains, result, recorded, None)


async def _split(
    items: list[_Item], chains: Chains, result: GroupResult, recorded: str, err: FhirError | None
) -> list[dict]:
    owners = sorted({i.owner for i in items if i.owner is not None})
    if len(owners) <= 1:
        reason = f"rejected-{err.status}-{err.issues[0].code}" if err else "rejected"
        for item in items:
            result.drop(reason, item.line.rtype)
        return []
    half = set(owners[: len(owners) // 2])
    first = [i for i in items if i.owner in half or i.owner is None]
    second = [i for i in items if (i.owner is not None and i.owner not in half) or i.owner is None]
    return await _process(first, chains, result, recorded) + await _process(second, chains, result, recorded)


def _entries_named(err: FhirError, count: int) -> set[int]:
    found: set[int] = set()
    for issue in err.issues:
        if issue.severity not in ("error", "fatal"):
            continue
        match = _ENTRY.match(issue.expression[0]) if issue.expression else None
        if match is None:
            return set()  # an error about the whole bundle: cannot be narrowed to entries
        index = int(match.group(1))
        if index < count:
            found.add(index)
    return found


def _collection(items: list[_Item]) -> dict[str, Any]:
    entries = []
    for item in items:
        rid = item.resource.get("id")
        # NDJSON has no fullUrl; a UUID id is what `urn:uuid:` references in an export point at.
        if isinstance(rid, str) and _UUID_ID.fullmatch(rid):
            entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": item.resource})
        else:
            entries.append({"resource": item.resource})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def line_reader(paths: list[str]) -> tuple[Callable[[Line], bytes], Callable[[], None]]:
    """pread by (file, offset, length): no seek state, so one descriptor per file serves every group."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]

    def read(line: Line) -> bytes:
        return os.pread(fds[line.file], line.length, line.off)

    def close() -> None:
        for fd in fds:
            os.close(fd)

    return read, close
