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


def person_identifier(ident: object) -> tuple[str | None, str] | None:
    """An identifier as records of one person are joined by it: its system under one name (None without
    one) and its value without spaces; None without a value, or for a placeholder."""
    system = ident.get("system") if isinstance(ident, dict) else None
    value = ident.get("value") if isinstance(ident, dict) else None
    if not isinstance(value, str) or is_placeholder(value):
        return None
    return (canonical_system(system) if isinstance(system, str) and system else None), "".join(value.split())
