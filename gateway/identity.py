"""Which identifier values say who a patient is: two Patient records that share one are one person (an EHR
duplicate: the TTP gives them the same pseudonyms), unless the value is a placeholder.

Kept free of heavy imports: the bulk index's scanning processes use it.
"""

from __future__ import annotations

# What EHRs write where the number is not known (lower case, spaces removed)
_PLACEHOLDER_WORDS = frozenset(
    {"unknown", "onbekend", "none", "null", "nil", "na", "n/a", "nvt", "n.v.t.", "-", "?", "x", "xxx", "test"}
)


def is_placeholder(value: str) -> bool:
    """The same character throughout (000000000, 999999999, XXXX) or a word for "unknown": shared by many
    unrelated patients, so it joins no two records into one person."""
    compact = "".join(value.split()).lower()
    return not compact or len(set(compact)) == 1 or compact in _PLACEHOLDER_WORDS


# One number under two names: the BSN by its FHIR NamingSystem URI and by its OID
_SAME_SYSTEM = {"urn:oid:2.16.840.1.113883.2.4.6.3": "http://fhir.nl/fhir/NamingSystem/bsn"}


def canonical_system(system: str) -> str:
    """The system under one name, so that a BSN written with its OID is the same number."""
    return _SAME_SYSTEM.get(system, system)
