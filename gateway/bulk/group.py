"""Pass 2 for one patient group: read its lines by offset, run the whole chain once (ONE TTP batch for all its
patients), cut the result into transaction Bundles.

A chain error is narrowed down instead of failing the group: an error that names entries
(`Bundle.entry[i]...`: schema errors, a reference to a Patient that is not there, a leak-gate finding) drops
those entries (reported by file and line number, never by value) and the group is run again; an error that
names no entry splits the group in halves, down to a single patient, whose resources are then reported as
rejected. A dropped Consent takes its patient with it: without it the patient's objection is unknown.
TTPUnavailable and store errors are not caught: the job stops and can be resumed (fail closed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.bulk.chunks import Chunk, split_transaction
from gateway.bulk.index import RESOURCE_ID, UUID_ID, Line, pread_files
from gateway.optout.base import OUTAGE_REASONS, OptOutUnavailable, Reason
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import PatientEntry, SchemaValidator
from gateway.process import (
    Processed,
    ProviderChain,
    RegistryChain,
    decide_optout,
    patient_key,
    process_bundle,
)
from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import InputMapping
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend, TTPResult

MAX_RETRIES = 4
_OPT_OUT_REASONS = ("opted-out", "opt-out-unknown")
_ENTRY = re.compile(r"^Bundle\.entry\[(\d+)\]")
# An absolute reference in a line's text: the base, the type and the id it ends in
_ABSOLUTE_REFERENCE = re.compile(
    rb'"reference"\s*:\s*"(https?://[^"\\]+?/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^"\\]*)?"'
)


@dataclass(frozen=True)
class Chains:
    """What the chain needs for one (registry, provider): from a Runtime or built offline."""

    registry: RegistryChain
    provider: ProviderChain
    validator: SchemaValidator
    mapping: InputMapping

    async def process(
        self,
        bundle: dict[str, Any],
        *,
        recorded: str | None = None,
        other_people: Sequence[dict] = (),
        serving: bool = False,
    ) -> Processed:
        """`process_bundle` with these chains."""
        return await process_bundle(
            bundle,
            registry=self.registry,
            provider=self.provider,
            validator=self.validator,
            mapping=self.mapping,
            recorded=recorded,
            other_people=other_people,
            serving=serving,
        )


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
    ttp_calls: int = 0
    ttp_misses: int = 0
    opt_out_reasons: Counter[str] = field(default_factory=Counter)  # why patients were withheld (codes)
    shared_sent: set[int] = field(default_factory=set)  # line ids of the shared resources some Bundle carries
    pseudonym_types: set[str] = field(default_factory=set)  # the types the TTP gave the group's patients
    lines: int = 0  # the group's own lines and the shared ones it read (as a posted Bundle's resourcesIn)
    # a shared line rejected in a slice: line id → (file, line, listed reason or None, drop reason, type);
    # every slice (and group) that carries it may reject it again, and the job reports it once
    shared_rejected: dict[int, tuple[int, int, str | None, str, str]] = field(default_factory=dict)

    def drop(self, reason: str, rtype: str, n: int = 1) -> None:
        label = rtype if rtype in self.known_types else "(unknown)"  # a type name from input only if R4
        self.dropped.setdefault(reason, Counter())[label] += n

    def reject(self, item: _Item, drop_reason: str, listed_reason: str | None = None) -> None:
        """`item` is not delivered from this slice; listed among the rejected lines if `listed_reason`."""
        line = item.line
        if item.owner is None:
            if listed_reason is not None:
                self.shared_rejected.setdefault(line.id, (line.file, line.line, listed_reason, drop_reason,
                                                          line.rtype))
            return  # otherwise reported once for the job: sent with another slice, or never referenced
        if listed_reason is not None:
            self.rejected_lines.append((line.file, line.line, listed_reason))
        self.drop(drop_reason, line.rtype)

    def add_report(self, report: dict[str, Any]) -> None:
        self.pseudonym_types.update(report.get("pseudonymTypes") or {})
        self.patients_opted_out += int(report.get("patientsDroppedOptOut") or 0)
        self.patients_unknown_optout += int(report.get("patientsDroppedUnknownOptOut") or 0)
        self.patients_no_pseudonym += int(report.get("patientsDroppedNoPseudonym") or 0)
        self.opt_out_reasons.update(report.get("optOutReasons") or {})

    def add_deid_drops(self, items: Sequence[_Item], dropped: dict[int, str]) -> None:
        """What de-identification dropped: a patient's own line counted here; a shared line once for the
        job, under its reason (a probe saw every copy of a type the profile does not take counted, and the
        lines again as never referenced). Out of a slice that does not refer to it, it is not a drop."""
        for i, reason in dropped.items():
            item = items[i]
            if item.owner is not None:
                self.drop(f"deid:{reason}", item.line.rtype)
            elif reason != "not-linked-to-a-patient":
                line = item.line
                fate = (line.file, line.line, None, f"deid:{reason}", line.rtype)
                self.shared_rejected.setdefault(line.id, fate)

    def add_chain_drops(self, items: Sequence[_Item], dropped_entries: dict[str, set[int]]) -> None:
        """Opt-out and no-pseudonym drops, of the patients' own lines only: a shared line goes with every
        slice, and is reported once for the job (`shared-not-referenced` when no Bundle took it). So
        `resources_opted_out` is the sum of the `opted-out` and `opt-out-unknown` drops."""
        for reason, indices in dropped_entries.items():
            for i in indices:
                if items[i].owner is not None:
                    self.drop(reason, items[i].line.rtype)
                    self.resources_opted_out += reason in _OPT_OUT_REASONS


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
    patients_per_call: int = 10,
) -> GroupResult:
    """The whole group is ONE TTP batch (`prefetch_pseudonyms`); the chain itself then runs on slices of
    `patients_per_call` patients, answered from that batch. Why slices: the leak gate's cost grows with
    (strings x patients in the bundle), so a 200-patient bundle is ~15x slower per resource than a
    10-patient one (see benchmarks/README.md); slicing keeps the big TTP batch and loses nothing else."""
    result = GroupResult(known_types=chains.validator.resource_types)
    items: list[_Item] = []
    # Patients whose home a shared place of this group is (index.home_places), of any group: their home
    # and their values count in every slice that carries the place; they are never delivered from here
    others: list[dict] = []
    absolute: dict[int, bytes] = {}  # lines with an absolute reference (rare): they name the server's base
    unreadable_consents: set[int] = set()  # patients of a Consent line that cannot be read
    for line in lines:
        raw = read(line)
        if b"http" in raw and not line.bystander and _ABSOLUTE_REFERENCE.search(raw):
            absolute[line.id] = raw
        try:
            resource = parse_json(raw, max_bytes=max_line_bytes)
        except FhirError as err:
            if line.bystander:
                continue  # reported with its own group
            code = err.issues[0].code  # the issue's code: structure, value, too-costly, invalid
            reason = "invalid" if code == "invalid" else f"invalid-{code}"  # never "invalid-invalid"
            result.rejected_lines.append((line.file, line.line, reason))
            result.drop("invalid-line", line.rtype)
            if line.rtype == "Consent" and line.owner is not None:
                unreadable_consents.add(line.owner)
            continue
        if line.bystander:
            others.append(resource)
        else:
            items.append(_Item(line, line.owner, resource))
    result.patients = sum(1 for i in items if i.resource.get("resourceType") == "Patient")
    result.lines = sum(not line.bystander for line in lines)
    if unreadable_consents and chains.registry.bundle_consent:
        items = _withhold(items, unreadable_consents, result)
    bases = _server_bases(list(absolute.values()), items)
    if len(bases) > 1:
        items = _refuse_mixed_bases(items, absolute.keys(), result, chains.registry.bundle_consent)
    batch_ttp = BatchTTP(chains.provider.ttp)
    chains = replace(chains, provider=replace(chains.provider, ttp=batch_ttp))
    context = _Context(recorded, others, bases.pop() if len(bases) == 1 else None)
    await prefetch_pseudonyms(items, chains, context.base)
    for sub in _sub_batches(items, patients_per_call):
        for bundle, carried in await _process(sub, chains, result, context):
            # cut into bytes right away: a group's de-identified dicts are never all alive at once; each
            # Bundle's tag ends in a digest of the patients it carries (see chunks._carried)
            chunks = split_transaction(bundle, max_entries=bundle_size, tag=tag)
            result.chunks.extend(chunks)
            for chunk in chunks:
                shared = (carried[i] for i in chunk.picked)
                result.shared_sent.update(item.line.id for item in shared if item and item.owner is None)
    result.ttp_calls, result.ttp_misses = batch_ttp.calls, batch_ttp.misses
    return result


@dataclass(frozen=True)
class _Context:
    """What every slice of a group is run with."""

    recorded: str  # the Provenance's time: the job's, so that a redone group makes the same Bundles
    others: list[dict]  # Patients not delivered here whose values must not leak into it (`other_people`)
    base: str | None  # the server base the export's absolute references use (see `_server_base`)


async def _process(
    items: list[_Item], chains: Chains, result: GroupResult, context: _Context
) -> list[tuple[dict, list[_Item | None]]]:
    """De-identified bundles for `items` (one normally; several when the group had to be split), each with
    the item each of its entries came from (None: the Provenance)."""
    for _ in range(MAX_RETRIES):
        if not any(i.resource.get("resourceType") == "Patient" for i in items):
            for item in items:
                result.reject(item, "no-patient-left")
            return []
        try:
            processed = await chains.process(
                _collection(items, context.base), recorded=context.recorded, other_people=context.others
            )
        except FhirError as err:
            bad = _entries_named(err, len(items))
            if not bad:
                return await _split(items, chains, result, context, err)
            for i in sorted(bad):
                result.reject(items[i], f"rejected-{err.status}", f"rejected-{_issue_code_of_entry(err, i)}")
            withheld = _consent_owners(items, bad) if chains.registry.bundle_consent else set()
            items = _withhold([item for n, item in enumerate(items) if n not in bad], withheld, result)
            continue
        if OUTAGE_REASONS & (processed.report.get("optOutReasons") or {}).keys():
            raise OptOutUnavailable("an opt-out source could not be reached")
        result.add_report(processed.report)
        result.add_chain_drops(items, processed.dropped_entries)
        result.add_deid_drops(items, processed.deid_dropped)
        if processed.bundle is None:
            return []
        return [(processed.bundle, [None if s is None else items[s] for s in processed.sources])]
    return await _split(items, chains, result, context, None)


def _withhold(items: list[_Item], patients: set[int], result: GroupResult) -> list[_Item]:
    """`items` without those of `patients`, whose opt-out status is unknown (a Consent of theirs could not be
    read or was rejected): none of their data goes, and they are counted as such."""
    if not patients:
        return items
    kept = []
    for item in items:
        if item.owner in patients:
            result.drop("opt-out-unknown", item.line.rtype)
            result.resources_opted_out += 1
            # an owner's other records, and the family travelling with them, are withheld alike
            if item.resource.get("resourceType") == "Patient":
                result.patients_unknown_optout += 1
                result.opt_out_reasons[Reason.CONSENT_UNPARSEABLE] += 1
        else:
            kept.append(item)
    return kept


def _consent_owners(items: list[_Item], bad: set[int]) -> set[int]:
    """The patients of the Consents among the dropped entries: with a Consent gone, whether the patient
    objects is unknown, and unknown fails closed (none of their data goes)."""
    return {
        items[i].owner
        for i in bad
        if items[i].owner is not None and items[i].resource.get("resourceType") == "Consent"
    }


async def _split(
    items: list[_Item], chains: Chains, result: GroupResult, context: _Context, err: FhirError | None
) -> list[tuple[dict, list[_Item | None]]]:
    owners = sorted({i.owner for i in items if i.owner is not None})
    if len(owners) <= 1:
        reason = f"rejected-{err.status}-{err.issues[0].code}" if err else "rejected"
        for item in items:
            result.reject(item, reason)
        return []
    half = set(owners[: len(owners) // 2])
    first = [i for i in items if i.owner in half or i.owner is None]
    second = [i for i in items if (i.owner is not None and i.owner not in half) or i.owner is None]
    return await _process(first, chains, result, context) + await _process(second, chains, result, context)


def _sub_batches(items: list[_Item], patients: int) -> list[list[_Item]]:
    """Slices of `patients` patients with their resources; the shared resources go with every slice (the
    Bundle splitter keeps only those a slice's entries refer to)."""
    owners = sorted({i.owner for i in items if i.owner is not None})
    shared = [i for i in items if i.owner is None]
    if len(owners) <= patients:
        return [items]
    slices = []
    for start in range(0, len(owners), patients):
        wanted = set(owners[start : start + patients])
        slices.append([i for i in items if i.owner in wanted] + shared)
    return slices


class BatchTTP:
    """Answers the chain's TTP calls from one batch fetched for the whole group (keyed by pre-pseudonym
    bytes, never a plain value); anything not fetched (should not happen) goes to the real TTP."""

    def __init__(self, backend: TTPBackend) -> None:
        self.backend = backend
        self.answers: dict[tuple[str, str, int, bytes], TTPResult] = {}
        self.calls = self.misses = 0

    async def fetch(self, registry: str, items: Sequence[PrePseudonym]) -> None:
        if not items:
            return
        self.calls += 1
        for item, res in zip(items, await self.backend.pseudonymise(registry, items), strict=True):
            self.answers[(registry, item.type, item.key_version, item.value)] = res

    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        keys = [(registry, i.type, i.key_version, i.value) for i in items]
        missing = [i for i, k in zip(items, keys, strict=True) if k not in self.answers]
        if missing:
            self.misses += len(missing)
            await self.fetch(registry, missing)
        return [replace(self.answers[k], index=n) for n, k in enumerate(keys)]

    async def probe(self) -> None:
        await self.backend.probe()


async def prefetch_pseudonyms(items: list[_Item], chains: Chains, base: str | None = None) -> None:
    """ONE TTP batch for every patient of the group that the opt-out sources admit.

    The same sources as process_bundle (the registry's, plus the Consents of this group when the registry
    uses bundle consents) decide, with the same patient keys, so an objecting or unknown patient is never
    offered to the TTP. Any doubt (a source fails) means no prefetch: process_bundle then decides and calls
    the TTP itself per slice, exactly as without prefetching."""
    registry, provider = chains.registry, chains.provider
    collection = _collection(items, base)
    entries = collection["entry"]
    patients = [
        PatientEntry(n, e.get("fullUrl"), e["resource"])
        for n, e in enumerate(entries)
        if e["resource"].get("resourceType") == "Patient"
    ]
    if not patients:
        return
    decisions = await decide_optout(collection, patients, registry, provider)
    admitted = {patient_key(p): p.resource for p in patients if decisions[patient_key(p)].status == "allowed"}
    if not admitted or not isinstance(provider.ttp, BatchTTP):
        return
    pres: list[PrePseudonym] = []
    for patient in admitted.values():
        extraction = extract_inputs(patient, registry.types, chains.mapping, provider.mrn_system)
        pres.extend(provider.source.pre_pseudonyms(extraction, registry.registry))
    await provider.ttp.fetch(registry.registry, pres)


def _issue_code_of_entry(err: FhirError, index: int) -> str:
    """The issue type of the first error about entry ``index`` (each rejected line gets its own)."""
    for issue in err.issues:
        match = _ENTRY.match(issue.expression[0]) if issue.expression else None
        if match is not None and int(match.group(1)) == index:
            return issue.code
    return "invalid"


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


def _server_bases(lines: list[bytes], items: list[_Item]) -> set[str]:
    """The base URLs the group's absolute references name resources of the group under
    (`https://ehr.example.org/fhir/` for `https://ehr.example.org/fhir/Patient/p1` and its Patient p1).
    One: the entries get their RESTful fullUrls under it, which those references (and the relative ones)
    resolve against. Several: see `_refuse_mixed_bases`."""
    if not lines:
        return set()
    here = {(i.resource.get("resourceType"), i.resource.get("id")) for i in items}
    return {
        m.group(1).decode(errors="replace")
        for raw in lines
        for m in _ABSOLUTE_REFERENCE.finditer(raw)
        if (m.group(2).decode(), m.group(3).decode()) in here
    }


def _refuse_mixed_bases(
    items: list[_Item], absolute: Iterable[int], result: GroupResult, bundle_consent: bool
) -> list[_Item]:
    """The group's absolute references use two bases: the chain can resolve them against one only, and a
    link it cannot follow (an Observation of A made in B's Encounter) could carry an objector's data
    out. The lines with an absolute reference are not delivered; a Consent among them withholds its
    patient (whether they object is unknown)."""
    refused = set(absolute)
    consents = {
        i.owner for i in items if i.line.id in refused and i.owner is not None and i.line.rtype == "Consent"
    }
    kept = []
    for item in items:
        if item.line.id in refused:
            result.reject(item, "rejected-422", "rejected-mixed-server-bases")
        else:
            kept.append(item)
    return _withhold(kept, consents, result) if bundle_consent else kept


def _collection(items: list[_Item], base: str | None = None) -> dict[str, Any]:
    entries = []
    for item in items:
        rid = item.resource.get("id")
        rtype = item.resource.get("resourceType")
        valid_id = isinstance(rid, str) and RESOURCE_ID.fullmatch(rid) is not None
        if base is not None and valid_id and isinstance(rtype, str):
            entries.append({"fullUrl": f"{base}{rtype}/{rid}", "resource": item.resource})
        # NDJSON has no fullUrl; a UUID id is what `urn:uuid:` references in an export point at.
        elif isinstance(rid, str) and UUID_ID.fullmatch(rid):
            entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": item.resource})
        else:
            entries.append({"resource": item.resource})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def line_reader(paths: list[str]) -> tuple[Callable[[Line], bytes], Callable[[], None]]:
    """Lines by offset (`index.pread_files`)."""
    pread, close = pread_files(paths)
    return (lambda line: pread(line.file, line.off, line.length)), close
