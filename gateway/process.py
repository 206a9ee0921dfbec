"""The chain for one bundle: validate → opt-out → pseudonymise → de-identify → leak gate.

Plain data in, plain data out; the I/O (TTP, opt-out sources) sits behind interfaces passed in. The HTTP
service, the offline `deidentify` command, bulk delivery and the benchmarks all run this one function.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

import orjson

from gateway import __version__
from gateway.deid.engine import DeidResult, Plan, ProvenanceInfo, deidentify
from gateway.deid.leakscan import scan, sensitive_values
from gateway.keys import derive
from gateway.linkage import SHARED_TYPES
from gateway.optout import BundleConsentOptOut, CombinedOptOut, ConsentPolicy, Decision, OptOutSource
from gateway.optout.apply import entries_to_drop, not_linked, patient_key, patient_refs
from gateway.optout.persons import same_person_alike
from gateway.outcome import FhirError, Issue
from gateway.pipeline.strict import bundle_model_issues
from gateway.pipeline.validate import (
    BundleIndex,
    PatientEntry,
    SchemaValidator,
    reference_type,
    resources_of_patient,
    validate_bundle,
)
from gateway.pseudonym.mapping import InputMapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonymise import PseudonymOutcome, pseudonymise_patients
from gateway.ttp.backend import TTPBackend

# The per-bundle counts of a report (integers), in the order they are shown to EHRs and auditors.
REPORT_COUNTS = (
    "patients",
    "patientsDroppedOptOut",
    "patientsDroppedUnknownOptOut",
    "patientsDroppedNoPseudonym",
    "resourcesIn",
    "resourcesDroppedOptOut",
    "resourcesDroppedNoPseudonym",
)


_T = TypeVar("_T")
log = logging.getLogger("gateway.process")  # counts only: never a value from a bundle

# A posted Bundle (`serving`) of more entries runs its CPU stages (validation, de-identification, the leak
# gate) in a worker thread, so that the event loop keeps answering /healthz and other EHRs meanwhile: a
# 100,000-entry Bundle held it for seconds. A smaller one stays inline (a 1,000-entry Bundle holds it for
# about 0.1 s): under concurrent posts the thread's share of the GIL cost a third of the 1,000-entry rate.
OFF_LOOP_ENTRIES = 5_000
# ... or Patients: the leak gate's work grows with the number of patients (a probe's 2,500 one-line Patients,
# 0.6 MB, held the loop for seconds); a posted Bundle holds a few
OFF_LOOP_PATIENTS = 200


@dataclass(frozen=True)
class RegistryChain:
    """Everything one registry's deliveries need, compiled once at start-up."""

    registry: str
    plan: Plan
    types: tuple[str, ...]
    optout: tuple[OptOutSource, ...]  # sources that answer independently of the posted bundle
    id_key: bytes
    bundle_consent: bool = True  # also read Consent resources posted in the bundle
    consent_policy: ConsentPolicy | None = None  # which Consents concern this registry (default: purposes)
    identifier_system: str = "urn:nlps1:{registry}:{type}"
    require_patient: bool = True
    strict: bool = False  # also check every posted and delivered resource with its R4B model (strict.py)


@dataclass(frozen=True)
class ProviderChain:
    provider: str
    source: SourceStage
    mrn_system: str | None
    ttp: TTPBackend  # authenticated as this provider: the TTP binds the MRN layer to it
    ttp_name: str = "reference-ttp"


@dataclass
class Processed:
    bundle: dict[str, Any] | None  # None: nothing left to deliver (every patient opted out)
    report: dict[str, Any] = field(default_factory=dict)
    patient_keys: list[str] = field(default_factory=list)  # opaque, pseudonymous ordering keys
    payload: bytes | None = None  # orjson.dumps(bundle), exactly the text the leak gate scanned
    dropped_entries: dict[str, set[int]] = field(default_factory=dict)  # reason → input entry indices
    sources: list[int | None] = field(default_factory=list)  # output entry → input entry (None: Provenance)
    deid_dropped: dict[int, str] = field(default_factory=dict)  # input entry → why de-identification dropped


async def process_bundle(
    bundle: dict[str, Any],
    *,
    registry: RegistryChain,
    provider: ProviderChain,
    validator: SchemaValidator,
    mapping: InputMapping,
    recorded: str | None = None,
    other_people: Sequence[dict[str, Any]] = (),
    serving: bool = False,
    large: bool = False,
) -> Processed:
    """`recorded` (a FHIR instant) goes into the Provenance; by default the current time. `other_people`:
    Patients of whom nothing is delivered here but whose values must not leak into it either (bulk: the
    patients of another slice whose home a shared place is); never offered to the TTP. `serving` and
    `large` (a large body, whatever its number of entries): the CPU stages run in a worker thread."""
    if not registry.plan.profile.person_level:
        # checked before anything else: no patient of this bundle may reach the TTP for such a registry
        raise FhirError.single(
            422,
            "business-rule",
            "this registry's profile allows aggregated data only; person-level delivery is refused",
            "registry",
        )
    # only where an event loop serves others: a bulk worker's thread would cost a malloc arena, not time
    entries = bundle.get("entry") if isinstance(bundle, dict) else None  # not validated yet: any JSON
    off_loop = serving and (large or _many_entries_or_patients(entries))
    index = await cpu_work(off_loop, _validated, bundle, validator, registry)
    decisions = await decide_optout(bundle, index.patients, registry, provider)
    admitted = {key: res for key, res in _patients(index).items() if decisions[key].status == "allowed"}
    dropped_entries = _optout_drops(index, decisions)
    dropped = dropped_entries["opted-out"] | dropped_entries["opt-out-unknown"]
    types = _resource_types(bundle)
    unlinked = not_linked(index, admitted, dropped, types)
    if unlinked:
        dropped_entries["not-linked-to-a-patient"] = unlinked
    # outside the Bundle, a subject stays as an opaque id where the profile keeps such references
    outside_kept = registry.plan.profile.references.get("outside_bundle") == "opaque-id"
    about_no_patient = _about_no_patient(bundle, index, types, registry.plan.nodes.keys(), outside_kept)
    about_no_patient -= dropped | unlinked
    if about_no_patient:
        dropped_entries["subject-not-a-patient"] = about_no_patient
        unlinked = unlinked | about_no_patient
    report: dict[str, Any] = {
        "patients": len(decisions),
        "patientsDroppedOptOut": sum(1 for d in decisions.values() if d.status == "objected"),
        "patientsDroppedUnknownOptOut": sum(1 for d in decisions.values() if d.status == "unknown"),
        "optOutReasons": dict(Counter(d.reason for d in decisions.values() if d.status != "allowed")),
        "resourcesIn": len(bundle.get("entry") or []),
        "resourcesDroppedOptOut": len(dropped),
    }
    if index.issues:  # what was accepted with a warning (a reference dropped): paths and fixed texts only
        report["warnings"] = [issue.as_fhir() for issue in index.issues]
    log.debug(
        "opt-out decided",
        extra={
            "registry": registry.registry,
            "patients": len(decisions),
            "admitted": len(admitted),
            "entries_dropped": len(dropped),
        },
    )
    report["resourcesDroppedByReason"] = _by_reason(bundle, dropped_entries)
    if decisions and not admitted:
        return Processed(None, report, dropped_entries=dropped_entries)
    kept_input, kept_positions = _without_entries(bundle, dropped | unlinked)
    pseudonyms = await pseudonymise_patients(
        admitted,
        registry=registry.registry,
        types=registry.types,
        mapping=mapping,
        source=provider.source,
        mrn_system=provider.mrn_system,
        ttp=provider.ttp,
        system_template=registry.identifier_system,
        shift_dates=registry.plan.shift_dates,
    )
    unlinkable = [
        p
        for p in index.patients
        if patient_key(p) in admitted and not pseudonyms.identifiers.get(patient_key(p))
    ]
    if unlinkable:
        # a patient without any pseudonym cannot be linked by the registry: deliver none of their data
        no_link = {patient_key(p): Decision("unknown", "no-pseudonym") for p in unlinkable}
        dropped_no_pseudonym = entries_to_drop(index, {**decisions, **no_link})
        kept_input, kept_positions = _without_entries(bundle, dropped_no_pseudonym | unlinked)
        report["patientsDroppedNoPseudonym"] = len(unlinkable)
        no_link_entries = dropped_entries["no-pseudonym"] = dropped_no_pseudonym - dropped
        report["resourcesDroppedNoPseudonym"] = len(no_link_entries)
        report["resourcesDroppedByReason"] |= _by_reason(bundle, {"no-pseudonym": no_link_entries})
        if len(unlinkable) == len(admitted):
            report["pseudonymsSkipped"] = dict(pseudonyms.skipped)
            return Processed(None, report, dropped_entries=dropped_entries)
    result, payload, input_paths = await cpu_work(
        off_loop,
        _deidentified,
        bundle,
        kept_input,
        kept_positions,
        index,
        pseudonyms,
        admitted=admitted,
        types=types,
        registry=registry,
        provider=provider,
        recorded=recorded,
        other_people=other_people,
    )
    report |= {
        "pseudonymTypes": dict(pseudonyms.types_added),
        "pseudonymsSkipped": dict(pseudonyms.skipped),
        "deidentification": result.report.as_dict(),
    }
    if not result.bundle["entry"]:
        # de-identification left nothing (every Patient dropped for an unknown modifier extension): an
        # empty transaction is no delivery (a probe saw one forwarded and audited as delivered)
        return Processed(None, report, dropped_entries=dropped_entries)
    sources = [input_paths.position(s) for s in result.sources]
    deid_dropped = {input_paths.position(i): why for i, why in result.report.dropped_at.items()}
    return Processed(
        result.bundle, report, _patient_keys(result.bundle), payload, dropped_entries, sources, deid_dropped
    )


def _many_entries_or_patients(entries: Any) -> bool:
    if not isinstance(entries, list):
        return False  # not validated yet: validation says what is wrong
    if len(entries) > OFF_LOOP_ENTRIES:
        return True
    patients = 0
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        patients += isinstance(resource, dict) and resource.get("resourceType") == "Patient"
    return patients > OFF_LOOP_PATIENTS


async def cpu_work(off_loop: bool, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """`fn(*args)`, in a worker thread when `off_loop` (the event loop then serves others meanwhile)."""
    if off_loop:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _validated(bundle: dict[str, Any], validator: SchemaValidator, registry: RegistryChain) -> BundleIndex:
    index = validate_bundle(bundle, validator, require_patient=registry.require_patient)
    if registry.strict and (issues := bundle_model_issues(bundle)):
        raise FhirError(400, issues)
    return index


def _deidentified(
    bundle: dict[str, Any],
    kept_input: dict[str, Any],
    kept_positions: list[int] | None,
    index: BundleIndex,
    pseudonyms: PseudonymOutcome,
    *,
    admitted: Mapping[str, dict[str, Any]],
    types: Sequence[str],
    registry: RegistryChain,
    provider: ProviderChain,
    recorded: str | None,
    other_people: Sequence[dict[str, Any]],
) -> tuple[DeidResult, bytes, _InputPaths]:
    """De-identify what is kept and pass it through the leak gate; the payload is the text it scanned."""
    result = deidentify(
        kept_input,
        registry.plan,
        id_key=provider_id_key(registry.id_key, provider.provider),
        pseudonyms=_by_every_reference(pseudonyms.identifiers, index),
        shift_keys=_by_every_reference(pseudonyms.shift_keys, index),
        patient_of=_patient_of(index, admitted, kept_positions, types) if registry.plan.shift_dates else None,
        provenance=ProvenanceInfo(
            gateway_version=__version__, recorded=recorded or _now(), ttp_name=provider.ttp_name
        ),
        outside_references={ref for _, ref in index.external_references},
        # an objecting patient's home is still theirs: a place there that another patient's resources name
        other_people=[*(p.resource for p in index.patients if patient_key(p) not in admitted), *other_people],
    )
    log.debug(
        "de-identified",
        extra={
            "registry": registry.registry,
            "pseudonyms": sum(pseudonyms.types_added.values()),
            "resources_kept": result.report.resources_kept,
        },
    )
    # the values of every person of the input are sought, the dropped ones' too: nothing of an objecting
    # patient may reach the registry through another patient's resources
    sought = _with_people(bundle, other_people)
    input_paths = _InputPaths(result.sources, kept_positions)
    payload = _leak_gate(result.bundle, sought, registry.plan.profile.leak_gate_options(), input_paths)
    if registry.strict:
        _strict_output_gate(result.bundle, input_paths)
    return result, payload, input_paths


def _about_no_patient(
    bundle: dict[str, Any],
    index: BundleIndex,
    types: Sequence[str],
    delivered: Collection[str],
    outside_kept: bool,
) -> set[int]:
    """Entries whose `subject` or `patient` is a resource outside the Bundle (a Group, a Location elsewhere;
    unless `outside_kept`), or one of a type the profile does not deliver that is no Patient (a Group in the
    Bundle). Such a reference is dropped, and what is left would reach the registry as the data of whichever
    patient its Encounter leads to (probes saw a Group's Observation delivered so, without a subject)."""
    outside: dict[int, set[str]] = {}
    for i, ref in () if outside_kept else index.external_references:
        outside.setdefault(i, set()).add(ref)
    found = set()
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry["resource"]
        for key in ("subject", "patient"):
            for ref in _as_list(resource.get(key)):
                target = ref.get("reference") if isinstance(ref, dict) else None
                if not isinstance(target, str):
                    continue
                kind = _target_type(target, index, types)
                if target in outside.get(i, ()) or (kind not in (None, "Patient") and kind not in delivered):
                    found.add(i)
    return found


def _target_type(reference: str, index: BundleIndex, types: Sequence[str]) -> str | None:
    at = index.by_full_url.get(reference)
    return types[at] if at is not None else reference_type(reference)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _resource_types(bundle: dict[str, Any]) -> list[str]:
    """Each entry's resource type (validated: every entry has a resource with one)."""
    return [entry["resource"]["resourceType"] for entry in bundle.get("entry") or []]


def _patients(index: BundleIndex) -> dict[str, dict[str, Any]]:
    return {patient_key(p): p.resource for p in index.patients}


async def decide_optout(
    bundle: dict[str, Any], patients: Sequence[PatientEntry], registry: RegistryChain, provider: ProviderChain
) -> dict[str, Decision]:
    """One decision per patient key from the registry's sources (plus the bundle's Consents); anything a
    source cannot answer is `unknown`: fail closed. Also used by bulk to pre-fetch pseudonyms."""
    refs = patient_refs(
        patients, provider=provider.provider, registry=registry.registry, mrn_system=provider.mrn_system
    )
    sources = list(registry.optout)
    if registry.bundle_consent:
        sources.append(BundleConsentOptOut.from_bundle(bundle, policy=registry.consent_policy))
    if not sources:  # a registry without any opt-out source cannot deliver: fail closed
        return {r.key: Decision("unknown", "no-optout-source") for r in refs}
    try:
        decisions = await CombinedOptOut(sources).check(refs) if refs else {}
    except Exception:  # a source that cannot answer must not deliver anything: fail closed
        decisions = {}
    decided = {r.key: decisions.get(r.key) or Decision("unknown", "optout-source-error") for r in refs}
    return same_person_alike(patients, decided)


def _optout_drops(index: BundleIndex, decisions: Mapping[str, Decision]) -> dict[str, set[int]]:
    """The entries to drop for objections, and for the rest of the patients not allowed (unknown status);
    an entry of an objecting patient and of an unknown one counts as opted out."""
    dropped = entries_to_drop(index, decisions)
    objected: set[int] = set()
    if any(d.status == "objected" for d in decisions.values()):
        only = {k: d if d.status == "objected" else Decision("allowed", "") for k, d in decisions.items()}
        objected = entries_to_drop(index, only)
    return {"opted-out": objected, "opt-out-unknown": dropped - objected}


def _by_reason(bundle: dict[str, Any], entries: Mapping[str, set[int]]) -> dict[str, dict[str, int]]:
    """reason → resource type → count for entries dropped before de-identification. The types are R4 type
    names (the schema check admitted them), never values."""
    items = bundle.get("entry") or []
    counted = {
        reason: Counter(_resource_type(items[i]) for i in sorted(indices))
        for reason, indices in entries.items()
    }
    return {reason: dict(sorted(c.items())) for reason, c in counted.items() if c}


def _resource_type(entry: Any) -> str:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    return resource.get("resourceType", "(none)") if isinstance(resource, dict) else "(none)"


def dropped_by_reason(report: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Every drop of one bundle, reason → resource type → count: those before de-identification (opt-out,
    no pseudonym) and those of the de-identification itself, so that per type, what came in equals what was
    delivered plus what was dropped."""
    deid = report.get("deidentification") or {}
    merged: dict[str, Counter[str]] = {}
    for part in (report.get("resourcesDroppedByReason") or {}, deid.get("dropped") or {}):
        for reason, per_type in part.items():
            merged.setdefault(reason, Counter()).update(per_type)
    return {reason: dict(sorted(c.items())) for reason, c in sorted(merged.items())}


def _without_entries(bundle: dict[str, Any], dropped: set[int]) -> tuple[dict[str, Any], list[int] | None]:
    """The bundle without `dropped`, and the input position of each entry left (None: nothing dropped)."""
    if not dropped:
        return bundle, None
    positions = [i for i in range(len(bundle.get("entry") or [])) if i not in dropped]
    return {**bundle, "entry": [bundle["entry"][i] for i in positions]}, positions


def _by_every_reference(per_patient: Mapping[str, _T], index: BundleIndex) -> dict[str, _T]:
    """The engine looks a patient's pseudonyms up by fullUrl and by `Patient/<id>`; offer both."""
    out: dict[str, _T] = {}
    for patient in index.patients:
        key = patient_key(patient)
        if key not in per_patient:
            continue
        out[key] = per_patient[key]
        rid = patient.resource.get("id")
        if isinstance(rid, str):
            out[f"Patient/{rid}"] = per_patient[key]
    return out


def _patient_of(
    index: BundleIndex, admitted: Mapping[str, Any], positions: list[int] | None, types: Sequence[str]
) -> dict[int, int]:
    """Entry → the entry of the (first) admitted Patient it is tied to, for its date shift: one that leads to
    the patient, else one a resource of theirs refers to (a DiagnosticReport's result without a subject),
    shared resources apart. Both as positions in the bundle passed to de-identification (`positions`:
    input position of each of its entries; None: all of them)."""
    kept = {original: n for n, original in enumerate(positions)} if positions is not None else None
    owner: dict[int, int] = {}
    theirs = [(p.index, resources_of_patient(index, p)) for p in index.patients if patient_key(p) in admitted]
    for home, entries in theirs:
        for entry in sorted(entries):
            owner.setdefault(entry, home)
    for home, entries in theirs:  # then what their resources refer to, that no patient claimed
        queue = sorted(entries)
        while queue:
            for target in sorted(index.references[queue.pop()]):
                if target not in owner and types[target] not in SHARED_TYPES:
                    owner[target] = home
                    queue.append(target)
    if kept is None:
        return owner
    return {kept[e]: kept[h] for e, h in owner.items() if e in kept and h in kept}


@lru_cache(maxsize=256)
def provider_id_key(registry_id_key: bytes, provider: str) -> bytes:
    """Opaque ids are keyed per registry AND provider: two hospitals' `Patient/1` are different people, and
    one must never overwrite the other's at the registry."""
    return derive(registry_id_key, f"gateway:opaque-id-provider|{provider}")


def _with_people(bundle: dict[str, Any], people: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not people:
        return bundle
    return {**bundle, "entry": [*(bundle.get("entry") or []), *({"resource": p} for p in people)]}


_OUTPUT_ENTRY = re.compile(r"^Bundle\.entry\[(\d+)\]")


@dataclass(frozen=True)
class _InputPaths:
    """Names a finding in the de-identified Bundle by the entry of the input it came from: that is the entry
    the sender wrote (and the one bulk delivery drops), not its place in the output, which differs."""

    sources: list[int | None]  # output entry -> entry of the de-identified input (None: the Provenance)
    positions: list[int] | None  # entry of the de-identified input -> entry of the posted Bundle

    def position(self, source: int | None) -> int | None:
        """The posted entry of an entry of the de-identified input."""
        if source is None or self.positions is None:
            return source
        return self.positions[source]

    def __call__(self, path: str) -> str:
        match = _OUTPUT_ENTRY.match(path)
        if match is None:
            return path
        n = int(match.group(1))
        position = self.position(self.sources[n] if n < len(self.sources) else None)
        if position is None:
            return "Bundle"  # the gateway's own Provenance: about the whole delivery, not a sender's entry
        return f"Bundle.entry[{position}]{path[match.end():]}"


def _leak_gate(
    output: dict[str, Any], sought: dict[str, Any], options: dict[str, Any], input_path: _InputPaths
) -> bytes:
    """After rewriting, before anything leaves: a hit blocks the delivery, naming the path, not the value.
    Returns the serialised output it scanned, so that what is stored is byte for byte what was checked.
    ``sought``: the input whose people's values are looked for; ``options``: the profile's
    ``leak_gate_options()``."""
    payload = orjson.dumps(output)
    sensitive = sensitive_values(sought, **options)
    findings = scan(output, sensitive, serialized=payload)
    if findings:
        issues = [
            Issue(
                "security",
                f"direct identifier ({f.kind}) left after de-identification",
                (input_path(f.path),),
            )
            for f in findings[:50]
        ]
        raise FhirError(422, issues)
    return payload


def _strict_output_gate(output: dict[str, Any], input_path: _InputPaths) -> None:
    """Strict mode, after the leak gate: the engine makes valid R4 by construction, so a finding here is a
    gateway defect, and nothing is delivered. The paths name the input entry the finding came from."""
    issues = bundle_model_issues(output)
    if issues:
        text = "de-identified Bundle: {}; nothing delivered"
        raise FhirError(
            422,
            [
                Issue(i.code, text.format(i.diagnostics), tuple(input_path(e) for e in i.expression))
                for i in issues
            ],
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _patient_keys(bundle: dict[str, Any]) -> list[str]:
    return [
        f"Patient/{e['resource']['id']}"
        for e in bundle.get("entry") or []
        if isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Patient"
    ]
