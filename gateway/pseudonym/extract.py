"""Pseudonym inputs from a FHIR R4 Patient given as a plain dict (orjson output), per domain spec §2.7 / §4.2.

Works on dicts, not fhir.resources models: model validation costs more than the whole de-identification.
The input is untrusted JSON, so every access checks the JSON type; any value of the wrong shape makes the
affected field unusable, and the pseudonym types needing it are skipped with a fixed reason. Nothing here
raises on patient data, and no patient value ever reaches an exception, log or reason text.

Where the data is ambiguous (two different BSNs, a family name that may contain the partner's name, two
official names or addresses that differ) the type is skipped rather than guessed: a wrong pseudonym links two
different people, one chosen by a list's order differs between deliveries; a skipped one only loses a link.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import Enum
from functools import cached_property
from typing import Any

from gateway.pseudonym import normalise
from gateway.pseudonym.mapping import InputMapping
from gateway.pseudonym.nlps1 import SCHEME, PseudonymError, canonical_type
from gateway.pseudonym.types import Extraction, PseudonymInput


class Unusable(Enum):
    """Why a field has no value; turned into the mapping's skip reason for the type."""

    MISSING = "missing"  # absent, partial or invalid: the field's (or type's) skip_reason
    AMBIGUOUS = "ambiguous"  # two different usable values (BSN, MRN, birth name, initial, official address)
    NOT_CONFIGURED = "not-configured"  # MRN without a configured patient-number system


FieldValue = str | Unusable


def extract_inputs(
    patient: Any, types: Iterable[str], mapping: InputMapping, mrn_system: str | None
) -> Extraction:
    """Normalised inputs and canonical strings for each requested type, or the reason it was skipped.

    `types` are NLPS1 type names (`sNGGV` and `SNGGV` both accepted). An unknown type, or one the mapping has
    no entry for, is a configuration error and raises PseudonymError; patient data never raises.
    """
    wanted = _wanted_types(types, mapping)
    fields = PatientFields(patient if isinstance(patient, dict) else {}, mapping, mrn_system)
    extraction = Extraction()
    for ptype in wanted:
        spec = mapping.types[ptype]
        values: list[str] = []
        for field_name, missing_reason in zip(spec.fields, spec.skip_reasons, strict=True):
            value = fields.get(field_name)
            if isinstance(value, Unusable):
                extraction.skipped[ptype] = _reason(value, field_name, missing_reason, mapping)
                break
            values.append(value)
        else:
            canonical = "|".join((SCHEME, ptype, *values))
            extraction.inputs.append(PseudonymInput(ptype, tuple(values), canonical))
    return extraction


def _wanted_types(types: Iterable[str], mapping: InputMapping) -> list[str]:
    if isinstance(types, str):
        # A bare string would otherwise be iterated letter by letter ("GG" → "G", "G").
        raise PseudonymError("pass a collection of pseudonym types, not one string")
    wanted: list[str] = []
    for name in types:
        if not isinstance(name, str):
            raise PseudonymError("pseudonym types must be strings")
        ptype = canonical_type(name)
        if ptype not in mapping.types:
            raise PseudonymError("pseudonym type has no entry in the input mapping")
        if ptype not in wanted:
            wanted.append(ptype)
    return wanted


def _reason(value: Unusable, field_name: str, missing_reason: str, mapping: InputMapping) -> str:
    if value is Unusable.NOT_CONFIGURED:
        return mapping.mrn_not_configured_reason
    if value is Unusable.AMBIGUOUS:
        return mapping.ambiguous_reasons[field_name]
    return missing_reason


class PatientFields:
    """Computes each field of one Patient at most once (the name feeds four types, the birth date seven).

    Field `x` of the mapping is produced by the method `field_x`; the mapping validator only admits the
    field names that have such a method (mapping.FIELDS).
    """

    def __init__(self, patient: dict[str, Any], mapping: InputMapping, mrn_system: str | None) -> None:
        self._patient = patient
        self._mapping = mapping
        self._mrn_system = mrn_system
        self._cache: dict[str, FieldValue] = {}

    def get(self, field_name: str) -> FieldValue:
        value = self._cache.get(field_name)
        if value is None:
            value = self._cache[field_name] = getattr(self, "field_" + field_name)()
        return value

    # identifiers -------------------------------------------------------------------------------------------

    def field_bsn(self) -> FieldValue:
        return _one_identifier(self._patient, self._mapping.bsn_system, normalise.bsn)

    def field_mrn(self) -> FieldValue:
        if self._mrn_system is None:
            return Unusable.NOT_CONFIGURED
        return _one_identifier(self._patient, self._mrn_system, normalise.mrn)

    # name, birth date, sex ---------------------------------------------------------------------------------

    @cached_property
    def _names(self) -> list[dict[str, Any]]:
        uses = self._mapping.name_uses
        return [
            n for n in _list(self._patient.get("name")) if isinstance(n, dict) and _str_in(n.get("use"), uses)
        ]

    @cached_property
    def _birth_name_letters(self) -> str | Unusable | None:
        """The one birth name the official names give, whichever their order: two different ones are
        ambiguous, and one that cannot be read does not hide one that can (a re-probe's list order chose)."""
        return _one_reading(birth_name_letters([name], self._mapping) for name in self._names)

    def _birth_name(self, length: int) -> FieldValue:
        letters = self._birth_name_letters
        if isinstance(letters, Unusable):
            return letters
        return _or_missing(normalise.birth_name(letters, length))

    def field_name8(self) -> FieldValue:
        return self._birth_name(normalise.NAME_LONG)

    def field_name4(self) -> FieldValue:
        return self._birth_name(normalise.NAME_SHORT)

    def field_initial(self) -> FieldValue:
        found = _one_reading(first_initial([name], self._mapping) for name in self._names)
        return found if isinstance(found, Unusable) else _or_missing(found)

    def field_birthdate(self) -> FieldValue:
        return _or_missing(normalise.birth_date(self._patient.get("birthDate")))

    def field_sex(self) -> FieldValue:
        mapping = self._mapping
        return _or_missing(normalise.sex(self._patient.get("gender"), mapping.sex_map, mapping.sex_absent))

    # address -----------------------------------------------------------------------------------------------

    @cached_property
    def _addresses(self) -> list[dict[str, str | None]]:
        """The address fields of each address of the chosen rank (`address_candidates`)."""
        return [address_fields(a, self._mapping) for a in address_candidates(self._patient, self._mapping)]

    def _address_field(self, name: str) -> FieldValue:
        """One field of the official address. Of several, whichever their order: a postcode that all usable
        ones share; a house number or suffix of the one whole place (postcode, number, suffix) they all are.
        Two different values are ambiguous (a probe's list order chose the postcode pseudonyms)."""
        found = self._addresses
        if len(found) <= 1:
            return _or_missing(found[0][name] if found else None)
        if name in ("pc6", "pc4"):
            postcode = _one_reading(f[name] for f in found)
            return postcode if isinstance(postcode, Unusable) else _or_missing(postcode)
        place = _one_reading(_place(f) for f in found)
        if isinstance(place, Unusable):
            return place
        return Unusable.MISSING if place is None else place[_PLACE_PARTS.index(name)]

    def field_pc6(self) -> FieldValue:
        return self._address_field("pc6")

    def field_pc4(self) -> FieldValue:
        return self._address_field("pc4")

    def field_housenumber(self) -> FieldValue:
        return self._address_field("housenumber")

    def field_suffix(self) -> FieldValue:
        return self._address_field("suffix")


def _one_reading(readings: Iterable[Any]) -> Any:
    """The one usable (not None) reading, None if there is none, AMBIGUOUS if they differ."""
    found = set(readings) - {None}
    if len(found) > 1:
        return Unusable.AMBIGUOUS
    return found.pop() if found else None


_PLACE_PARTS = ("pc6", "housenumber", "suffix")


def _place(fields: dict[str, str | None]) -> tuple[str | None, ...] | None:
    place = tuple(fields[part] for part in _PLACE_PARTS)
    return None if None in place else place


# --- building blocks (module-level so they can be tested and reused on their own) ---------------------------


def birth_name_letters(names: list[dict[str, Any]], mapping: InputMapping) -> str | None:
    """The transformed own surname (all letters) from the first name that carries a surname, or None.

    Own-name extension first. Without it `family` is used only when the assembly order is absent or allows it
    (NL1), minus the own voorvoegsel; a family name under NL2..NL4 holds the partner's name and is not used.
    """
    for name in names:
        family = name.get("family")
        family_ext = name.get("_family")
        own = _extension_values(family_ext, mapping.own_name_url)
        if not own and family is None and family_ext is None:
            continue  # e.g. a second official name holding only initials
        if own:
            return normalise.letters(_single(own)) or None
        if not _family_fallback_allowed(name, family_ext, mapping) or not isinstance(family, str):
            return None
        prefixes = _extension_values(family_ext, mapping.own_prefix_url)
        if prefixes:
            prefix = _single(prefixes)
            if not isinstance(prefix, str):
                return None
            family = strip_prefix(family, prefix)
            if family is None:
                return None
        return normalise.letters(family) or None
    return None


def _family_fallback_allowed(name: dict[str, Any], family_ext: object, mapping: InputMapping) -> bool:
    orders = _extension_values(name, mapping.assembly_order_url)
    if not orders:
        # Without an order, a partner name next to `family` means `family` may well be the partner's name.
        partner = any(_extension_values(family_ext, url) for url in mapping.partner_name_urls)
        return mapping.family_fallback_when_order_absent and not partner
    order = _single(orders)
    return _str_in(order, mapping.family_fallback_orders)


def strip_prefix(family: str, prefix: str) -> str | None:
    """`family` without the leading voorvoegsel `prefix` ("van Putten" − "van" → "Putten").

    None when `family` does not start with the prefix as a separate word: then it is not known which part of
    `family` is the own surname.
    """
    family, prefix = family.strip(), prefix.strip()
    if not prefix:
        return family
    head, rest = family[: len(prefix)], family[len(prefix) :]
    if head.casefold() != prefix.casefold():
        return None
    # "'t Hart" / "d'Ancona": a prefix ending in an apostrophe may be written against the name.
    if rest and not rest[0].isspace() and prefix[-1].isalnum():
        return None
    return rest.strip()


def first_initial(names: list[dict[str, Any]], mapping: InputMapping) -> str | None:
    """The first letter of the first usable given name (qualifier BR/IN, or none if allowed) of the names."""
    for name in names:
        givens = _list(name.get("given"))
        # `_given` is aligned with `given` by position; either may be shorter or hold nulls.
        given_ext = _list(name.get("_given"))
        for index in range(max(len(givens), len(given_ext))):
            ext = given_ext[index] if index < len(given_ext) else None
            if not _given_qualifies(ext, mapping):
                continue
            letter = normalise.initial(givens[index] if index < len(givens) else None)
            if letter:
                return letter
    return None


def _given_qualifies(ext: object, mapping: InputMapping) -> bool:
    qualifiers = _extension_values(ext, mapping.given_qualifier_url)
    if not qualifiers:
        return mapping.accept_unqualified_given
    # A given may carry several qualifiers (e.g. BR and CL): one accepted qualifier is enough.
    return any(_str_in(q, mapping.given_qualifiers) for q in qualifiers)


def address_fields(address: dict[str, Any], mapping: InputMapping) -> dict[str, str | None]:
    """pc6, pc4, housenumber and suffix of one address, each None where it cannot be produced."""
    line = house_number_line(address, mapping)
    numbers = _extension_values(line, mapping.house_number_url) if line is not None else []
    suffixes = _extension_values(line, mapping.suffix_url) if line is not None else []
    postal_code = address.get("postalCode")
    disagree = len(suffixes) > 1 and not _all_equal(suffixes)  # a repeated suffix that disagrees
    return {
        "pc6": normalise.postcode6(postal_code),
        "pc4": normalise.postcode4(postal_code),
        "housenumber": normalise.house_number(_single(numbers)) if line is not None else None,
        "suffix": None if disagree else normalise.house_number_suffix(suffixes[0] if suffixes else None),
    }


def address_candidates(patient: dict[str, Any], mapping: InputMapping) -> list[dict[str, Any]]:
    """The addresses of the first rank that has any: official (AddressType HP), else `use=home` that is not
    only a postal address (a PO box). Neither `use=old` nor one whose `period` has ended: the patient no
    longer lives there (so such an address stops counting on the day after its end)."""
    today = datetime.now(UTC).date().isoformat()
    addresses = [
        a for a in _list(patient.get("address"))
        if isinstance(a, dict) and a.get("use") != "old" and not _ended(a.get("period"), today)
    ]  # fmt: skip
    official = [a for a in addresses if mapping.preferred_address_type in _address_types(a, mapping)]
    fallback = mapping.fallback_address_use
    return official or [a for a in addresses if a.get("use") == fallback and a.get("type") != "postal"]


_DATE_PREFIX = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")


def _ended(period: object, today: str) -> bool:
    """Whether a period's end (a FHIR date or dateTime, partial or not) lies before today; anything else is
    taken as running (a wrongly written end never drops an address)."""
    end = period.get("end") if isinstance(period, dict) else None
    if not isinstance(end, str) or not _DATE_PREFIX.match(end):
        return False
    day = end[:10]
    return day < today[: len(day)]


def _address_types(address: dict[str, Any], mapping: InputMapping) -> set[str]:
    codes: set[str] = set()
    for value in _extension_values(address, mapping.address_type_url):
        if isinstance(value, str):  # valueCode
            codes.add(value)
        elif isinstance(value, dict):  # valueCodeableConcept (zib) or valueCoding
            codings = _list(value.get("coding")) if "coding" in value else [value]
            codes.update(c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str))
    return codes


def house_number_line(address: dict[str, Any], mapping: InputMapping) -> dict[str, Any] | None:
    """The `_line` element (primitive extension object) of the first line carrying a house number."""
    for line_ext in _list(address.get("_line")):
        if _extension_values(line_ext, mapping.house_number_url):
            return line_ext
    return None


def _one_identifier(patient: dict[str, Any], system: str, norm: Callable[[object], str | None]) -> FieldValue:
    """The one usable value of the identifiers with `system` (use=old ignored); two different: ambiguous."""
    found: set[str] = set()
    for ident in _list(patient.get("identifier")):
        if isinstance(ident, dict) and ident.get("system") == system and ident.get("use") != "old":
            value = norm(ident.get("value"))
            if value is not None:
                found.add(value)
    if len(found) > 1:
        return Unusable.AMBIGUOUS
    return found.pop() if found else Unusable.MISSING


# --- JSON helpers: tolerate any JSON type where FHIR expects a list, object or string ---


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str_in(value: object, allowed: frozenset[str]) -> bool:
    # The isinstance check matters: `[] in frozenset()` raises TypeError (unhashable).
    return isinstance(value, str) and value in allowed


def _extension_values(holder: object, url: str) -> list[object]:
    """The value[x] of every extension with `url` on an element or a `_primitive` object."""
    if not isinstance(holder, dict):
        return []
    return [
        _value_x(ext)
        for ext in _list(holder.get("extension"))
        if isinstance(ext, dict) and ext.get("url") == url
    ]


def _value_x(extension: dict[str, Any]) -> object:
    for key, value in extension.items():
        if isinstance(key, str) and key.startswith("value"):
            return value
    return None


def _all_equal(values: list[object]) -> bool:
    return all(v == values[0] for v in values[1:])


def _single(values: list[object]) -> object:
    """The value if all occurrences agree, else None (a repeated extension that disagrees is not guessed)."""
    return values[0] if values and _all_equal(values) else None


def _or_missing(value: str | None) -> FieldValue:
    return Unusable.MISSING if value is None else value
