"""Opt-out (objection) sources, domain spec §6: decide per patient before anything goes to the TTP.

Sources: `RegisterOptOut` (the gateway's own HMAC-keyed objection register), `BundleConsentOptOut`
(Consents posted in the Bundle), `EhrConsentSearch` (Consent search on the EHR's FHIR API). Combine them
with `CombinedOptOut`: any objected → objected, else any unknown → unknown, else allowed. Only `allowed`
patients are delivered:

    index = validate_bundle(bundle, validator)
    refs = patient_refs(index, provider=..., registry=..., mrn_system=...)
    decisions = await CombinedOptOut([register, BundleConsentOptOut.from_bundle(bundle), ehr]).check(refs)
    drop = entries_to_drop(index, decisions)   # every entry of every patient not `allowed`
"""

from gateway.optout.apply import entries_to_drop, orphaned_by, patient_key, patient_refs
from gateway.optout.base import CombinedOptOut, Decision, OptOutSource, PatientRef, Reason, combine
from gateway.optout.consent import BundleConsentOptOut, ConsentPolicy, evaluate_consent
from gateway.optout.ehr import BearerToken, EhrConsentSearch
from gateway.optout.register import (
    InMemoryObjectionRegister,
    ObjectionCsvError,
    ObjectionLookup,
    RegisterOptOut,
    objection_digest,
    read_objection_csv,
    registered_form,
    stored_forms,
)

__all__ = [
    "BearerToken",
    "BundleConsentOptOut",
    "CombinedOptOut",
    "ConsentPolicy",
    "Decision",
    "EhrConsentSearch",
    "InMemoryObjectionRegister",
    "ObjectionCsvError",
    "ObjectionLookup",
    "OptOutSource",
    "PatientRef",
    "Reason",
    "RegisterOptOut",
    "combine",
    "entries_to_drop",
    "evaluate_consent",
    "objection_digest",
    "registered_form",
    "stored_forms",
    "orphaned_by",
    "patient_key",
    "patient_refs",
    "read_objection_csv",
]
