"""NLPS1 input normalisation (domain spec §4.2).

Every function takes whatever the FHIR JSON held (any JSON type) and returns the normalised string, or None
when the value cannot be used. None means "skip this pseudonym type", never "guess": a wrong pseudonym links
two different people, a skipped one only loses a link. No function raises on odd input.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from datetime import date

# Letters that NFKD does not decompose into A–Z (§4.2). The lower-case forms are mapped too because the rule
# upper-cases the result anyway: without them "øster" would lose its first letter while "ØSTER" keeps it.
_LETTER_MAP = str.maketrans(
    {
        "ß": "SS",
        "ẞ": "SS",
        "Æ": "AE",
        "æ": "AE",
        "Ø": "O",
        "ø": "O",
        "Ł": "L",
        "ł": "L",
        "Ĳ": "IJ",
        "ĳ": "IJ",
        "Œ": "OE",
        "œ": "OE",
    }
)
# Patterns are used with fullmatch(): "$" in match() would also accept a trailing newline.
_NOT_AZ = re.compile(r"[^A-Z]+")
_NOT_AZ09 = re.compile(r"[^A-Z0-9]+")
_FULL_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_DUTCH_POSTCODE = re.compile(r"[1-9][0-9]{3}[A-Z]{2}")
_DIGITS = re.compile(r"[0-9]+")
_BSN = re.compile(r"[0-9]{9}")
_WHITESPACE = re.compile(r"\s+")

NAME_LONG = 8  # NGG, NGGV
NAME_SHORT = 4  # SNGG, SNGGV


def letters(value: object) -> str:
    """The §4.2 name transform: letter map, NFKD, drop combining marks, upper-case, keep A–Z only."""
    if not isinstance(value, str):
        return ""
    decomposed = unicodedata.normalize("NFKD", value.translate(_LETTER_MAP))
    # Combining marks are dropped by the A–Z filter below; upper() can create new ones (e.g. "ǰ" → "J̌").
    return _NOT_AZ.sub("", decomposed.upper())


def birth_name(value: object, length: int) -> str | None:
    """First `length` letters of the transformed own surname; shorter names are not padded."""
    name = letters(value)
    return name[:length] if name else None


def initial(value: object) -> str | None:
    """First letter of a given name after the name transform ("Émile" → "E", "Ĳsbrand" → "I")."""
    name = letters(value)
    return name[0] if name else None


def birth_date(value: object) -> str | None:
    """A full, existing calendar date `YYYY-MM-DD` → `YYYYMMDD`; partial dates (`1975`, `1975-03`) → None."""
    if not isinstance(value, str):
        return None
    match = _FULL_DATE.fullmatch(value)
    if not match:
        return None
    year, month, day = (int(g) for g in match.groups())
    try:
        date(year, month, day)
    except ValueError:
        return None
    return "".join(match.groups())


def sex(value: object, sex_map: Mapping[str, str], absent: str) -> str | None:
    """Administrative gender → NLPS1 sex code; absent → `absent`; an unknown code → None (not guessed)."""
    if value is None:
        return absent
    if not isinstance(value, str):
        return None
    return sex_map.get(value)


def postcode6(value: object) -> str | None:
    """A Dutch postcode `1234AB` after removing whitespace and upper-casing; anything else → None."""
    if not isinstance(value, str):
        return None
    code = _WHITESPACE.sub("", value).upper()
    return code if _DUTCH_POSTCODE.fullmatch(code) else None


def postcode4(value: object) -> str | None:
    """The four digits of a Dutch postcode."""
    code = postcode6(value)
    return code[:4] if code else None


def house_number(value: object) -> str | None:
    """Digits only (surrounding whitespace ignored), leading zeros dropped; 0, empty or non-digits → None."""
    if not isinstance(value, str):
        return None
    digits = value.strip()
    if not _DIGITS.fullmatch(digits):
        return None
    digits = digits.lstrip("0")
    return digits or None


def house_number_suffix(value: object) -> str | None:
    """Letter + addition, upper-cased, alphanumerics only ("A 2" → "A2", " bis" → "BIS"); absent → "".

    A value of the wrong JSON type → None: the suffix is part of the A-type input, so it is not dropped.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        return None
    decomposed = unicodedata.normalize("NFKD", value.translate(_LETTER_MAP))
    return _NOT_AZ09.sub("", decomposed.upper())


def elfproef(digits: str) -> bool:
    """The BSN 11-proef: Σ d_i·(9−i) for i=0..7, minus d_8, ≡ 0 (mod 11)."""
    total = sum(int(d) * (9 - i) for i, d in enumerate(digits[:8])) - int(digits[8])
    return total % 11 == 0


def bsn(value: object) -> str | None:
    """Exactly nine digits (surrounding whitespace ignored), not all zeros, passing the 11-proef."""
    if not isinstance(value, str):
        return None
    digits = value.strip()
    if not _BSN.fullmatch(digits) or digits == "000000000":
        return None
    return digits if elfproef(digits) else None


def mrn(value: object) -> str | None:
    """The provider's patient number, trimmed; empty → None. The value is otherwise kept as-is."""
    if not isinstance(value, str):
        return None
    trimmed = value.strip()
    if not trimmed:
        return None
    try:
        # A lone surrogate (possible with json.loads, not with orjson) cannot be UTF-8 encoded for the HMAC.
        trimmed.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return trimmed
