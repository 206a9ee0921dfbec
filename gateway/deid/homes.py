"""A Location or Organization at a patient's home (a home visit; a relative's home counts alike): its address
is the person's, not a public place's. The engine gives it what the profile gives Patient.address; the leak
gate never treats its values as published. Both decide with ``at_home``, so they agree.

A Dutch address is its postcode and house number (how the BAG keys it), so "Canarystr. 42" is "Canarystraat
42". Erring towards "at home" only generalises a public place's address; erring the other way delivers a
home address. So a place is at a patient's home when any of its addresses:
- is typed ``use: home`` (whoever's home it is, it is a person's);
- has a patient's full postcode (separators ignored: "1015-CJ" is "1015 CJ");
- has a patient's house number and, of that patient's address, the same four postcode digits (a mistyped
  or shortened postcode), the same city, or a street that begins alike ("Keizersgr." for "Keizersgracht");
or when the place itself is typed as the patient's residence (v3-RoleCode PTRES). An address given only as
``text`` is read for its number and street too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

_PATIENT_RESIDENCE = "PTRES"
_PERSON_TYPES = ("Patient", "RelatedPerson", "Person")
_HOUSE_NUMBER_URL = "http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-houseNumber"
# the first run of digits that is not an ordinal of the street name: "2e Jan Steenstraat 15" is number 15
_HOUSE_NUMBER = re.compile(r"(?<![^\W_])(\d+)(?!\d|(?:e|de|ste)(?![^\W_]))")
_NOT_ALNUM = re.compile(r"[\W_]+")
_WORD = re.compile(r"[^\W\d_]+")


class Home(NamedTuple):
    postcode: str  # upper case, letters and digits only; "" when the address has none
    number: str  # the house number, "" when none is written
    city: str  # case-folded, "" when none
    streets: frozenset[str]  # the words of the street (case-folded, four letters or more)


def home_of(address: Any) -> Home | None:
    """The key of one FHIR Address, or None when it holds neither a postcode nor a house number."""
    if type(address) is not dict:
        return None
    postcode = address.get("postalCode")
    postcode = _NOT_ALNUM.sub("", postcode).upper() if type(postcode) is str else ""
    lines = _lines(address)
    number = _house_number(address, lines)
    if not postcode and not number:
        return None
    city = address.get("city")
    streets = frozenset(w for w in _WORD.findall(lines.casefold()) if len(w) >= 4)
    return Home(postcode, number, " ".join(city.casefold().split()) if type(city) is str else "", streets)


def _lines(address: dict[str, Any]) -> str:
    lines = address.get("line")
    text = " ".join(x for x in lines if type(x) is str) if type(lines) is list else ""
    return text or (address["text"] if type(address.get("text")) is str else "")


def _house_number(address: dict[str, Any], lines: str) -> str:
    """The nl-core houseNumber part of a line if there is one, else the first number in the lines."""
    parts = address.get("_line")
    for part in parts if type(parts) is list else ():
        extensions = part.get("extension") if type(part) is dict else None
        for ext in extensions if type(extensions) is list else ():
            number = type(ext) is dict and ext.get("url") == _HOUSE_NUMBER_URL
            value = ext.get("valueString") if number else None
            if type(value) is str:
                digits = _HOUSE_NUMBER.search(value)
                if digits:
                    return digits.group(1)
    number = _HOUSE_NUMBER.search(lines)
    return number.group(1) if number else ""


def person_homes(resources: Iterable[Any]) -> list[Home]:
    """The home addresses of every person among ``resources`` and what they contain: a patient's, and a
    relative's (a probe's home visit at the carer's house sent the whole Bundle to the leak gate's 422)."""
    homes: list[Home] = []
    for res in resources:
        if type(res) is not dict:
            continue
        contained = res.get("contained")
        for person in [res, *(contained if type(contained) is list else ())]:
            if type(person) is dict and person.get("resourceType") in _PERSON_TYPES:
                addresses = person.get("address")
                homes += [h for h in map(home_of, addresses if type(addresses) is list else ()) if h]
    return homes


def at_home(resource: dict[str, Any], homes: Iterable[Home]) -> bool:
    """Is this Location or Organization at a patient's home (see the module docstring)?"""
    addresses = resource.get("address")
    addresses = addresses if type(addresses) is list else [addresses]
    if any(type(a) is dict and a.get("use") == "home" for a in addresses):
        return True
    homes = list(homes)
    for key in filter(None, map(home_of, addresses)):
        if any(same_home(key, home) for home in homes):
            return True
    types = resource.get("type")
    return type(types) is list and any(
        type(t) is dict
        and any(type(c) is dict and c.get("code") == _PATIENT_RESIDENCE for c in t.get("coding") or ())
        for t in types
    )


def same_home(key: Home, home: Home) -> bool:
    if key.postcode and key.postcode == home.postcode:
        return True
    if not key.number or key.number != home.number:
        return False
    return (
        (key.postcode[:4] != "" and key.postcode[:4] == home.postcode[:4])
        or (key.city != "" and key.city == home.city)
        or any(h.startswith(k) or k.startswith(h) for k in key.streets for h in home.streets)
    )

