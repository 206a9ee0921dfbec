"""The pseudonymise stage: pseudonym inputs of every admitted patient → one TTP batch → Patient identifiers.

Only patients that passed the opt-out check reach this stage, and only pre-pseudonyms (never plain values)
go to the TTP, in ONE batch for the whole bundle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.pseudonym.extract import extract_inputs
from gateway.pseudonym.mapping import InputMapping
from gateway.pseudonym.source import SourceStage
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend

PSEUDED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED"}


@dataclass
class PseudonymOutcome:
    identifiers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # patient key → Identifiers
    types_added: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # "<TYPE>:<reason>" → count
    # patient key → the pre-pseudonym of its first pseudonym, hex: what a date shift is keyed on, since it
    # stays the same when the TTP's key is rotated (the pseudonyms then change) and is never sent anywhere
    shift_keys: dict[str, str] = field(default_factory=dict)


def pseudonym_identifier(system_template: str, registry: str, ptype: str, value: str) -> dict[str, Any]:
    return {
        "use": "secondary",
        "type": {"coding": [dict(PSEUDED)], "text": f"NLPS1 {ptype}"},
        "system": system_template.format(registry=registry, type=ptype),
        "value": value,
    }


async def pseudonymise_patients(
    patients: Mapping[str, dict[str, Any]],
    *,
    registry: str,
    types: Sequence[str],
    mapping: InputMapping,
    source: SourceStage,
    mrn_system: str | None,
    ttp: TTPBackend,
    system_template: str,
) -> PseudonymOutcome:
    """`patients` maps a patient key (its fullUrl in the bundle) to the Patient resource."""
    outcome = PseudonymOutcome()
    batch: list[PrePseudonym] = []
    owners: list[str] = []
    for key, patient in patients.items():
        extraction = extract_inputs(patient, types, mapping, mrn_system)
        for ptype, reason in extraction.skipped.items():
            outcome.skipped[f"{ptype}:{reason}"] += 1
        pres = source.pre_pseudonyms(extraction, registry)
        batch.extend(pres)
        owners.extend([key] * len(pres))
        outcome.identifiers.setdefault(key, [])
    if not batch:
        return outcome
    results = await ttp.pseudonymise(registry, batch)
    for result in results:
        key = owners[result.index]
        if result.identifier_value is None:
            outcome.skipped[f"{result.type}:ttp-{result.error_code or 'error'}"] += 1
            continue
        ident = pseudonym_identifier(system_template, registry, result.type, result.identifier_value)
        if not outcome.identifiers[key]:
            outcome.shift_keys[key] = batch[result.index].value.hex()
        outcome.identifiers[key].append(ident)
        outcome.types_added[result.type] += 1
    return outcome
