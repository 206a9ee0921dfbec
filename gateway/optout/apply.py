"""Glue between the validated Bundle and the opt-out sources: who to ask, and what to drop afterwards."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from gateway.linkage import SHARED_TYPES, linked_to_patients
from gateway.optout.base import Decision, PatientRef
from gateway.pipeline.validate import BundleIndex, PatientEntry, resources_of_patient, resources_of_patients


def patient_key(patient: PatientEntry) -> str:
    """The key of a Patient in opt-out answers: its fullUrl, or its entry position when it has none."""
    return patient.full_url or f"Bundle.entry[{patient.index}]"


def patient_refs(
    index: BundleIndex | Sequence[PatientEntry],
    *,
    provider: str,
    registry: str,
    mrn_system: str | None = None,
) -> list[PatientRef]:
    """One PatientRef per Patient (of a BundleIndex, or given); `mrn` is its identifier with `mrn_system`."""
    patients = index.patients if isinstance(index, BundleIndex) else index
    refs = []
    for p in patients:
        numbers = _mrns(p.resource, mrn_system)
        first = numbers[0] if numbers else None
        refs.append(PatientRef(patient_key(p), p.resource, first, provider, registry, tuple(numbers[1:])))
    return refs


def _mrns(resource: dict, system: str | None) -> list[str]:
    """The patient's numbers in the provider's system, in order, each once."""
    if system is None:
        return []
    found: list[str] = []
    for identifier in resource.get("identifier") or ():
        value = identifier.get("value") if isinstance(identifier, dict) else None
        number = value.strip() if identifier.get("system") == system and isinstance(value, str) else ""
        if number and number not in found:
            found.append(number)
    return found


def entries_to_drop(index: BundleIndex, decisions: Mapping[str, Decision]) -> set[int]:
    """Entry indices to remove for the Patients whose decision is not `allowed` (no decision = unknown):

    - every resource of such a Patient (`resources_of_patient`: the Patient and all that refers to it,
      transitively), so an entry that belongs to an allowed and a dropped Patient is dropped;
    - then every entry that only dropped entries refer to (e.g. the Binary holding a dropped
      DocumentReference's document, a Medication of a dropped MedicationRequest): it was in the Bundle for
      them and may carry their data. Patients are never dropped this way (they have their own decision), nor
      are an allowed patient's own resources (their Observation that only a dropped report listed), and
      entries that nothing refers to are kept.
    """
    drop: set[int] = set()
    allowed: list[PatientEntry] = []
    for patient in index.patients:
        decision = decisions.get(patient_key(patient))
        if decision is None or decision.status != "allowed":
            drop |= resources_of_patient(index, patient)
        else:
            allowed.append(patient)
    if not drop:
        return drop
    return drop | orphaned_by(index, drop, keep=resources_of_patients(index, [p.index for p in allowed]))


def not_linked(
    index: BundleIndex, allowed: Collection[str], dropped: set[int], types: Sequence[str]
) -> set[int]:
    """Entries of a Bundle with patients that `gateway.linkage` does not tie to an allowed patient: whose
    data they are cannot be known (an Observation without a subject could be an objecting patient's), so
    they are not delivered. `types`: each entry's resource type."""
    if not index.patients:
        return set()
    kept = [n for n in range(len(index.references)) if n not in dropped]
    named = {t for n, targets in enumerate(index.references) if types[n] not in SHARED_TYPES for t in targets}
    reach = linked_to_patients(
        {n: index.references[n] for n in kept},
        {n: types[n] for n in kept},
        [p.index for p in index.patients if patient_key(p) in allowed],
        named,
    )
    return set(kept) - reach


def orphaned_by(index: BundleIndex, dropped: set[int], keep: Collection[int] = frozenset()) -> set[int]:
    """Entries (not Patients, not in `keep`) all of whose referrers are in `dropped` or themselves orphaned,
    transitively."""
    patients = {p.index for p in index.patients}
    reverse = index.referenced_by
    gone = set(dropped)
    orphans: set[int] = set()
    queue = [t for i in dropped for t in index.references[i]]
    while queue:
        candidate = queue.pop()
        if candidate in gone or candidate in patients or candidate in keep:
            continue
        if reverse[candidate] and reverse[candidate] <= gone:
            gone.add(candidate)
            orphans.add(candidate)
            queue.extend(index.references[candidate])
    return orphans
