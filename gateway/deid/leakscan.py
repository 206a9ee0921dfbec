"""The leak gate: does a de-identified bundle still contain anything that identifies the patient?

``sensitive_values(input_bundle)`` collects identifying values from the *input* (names of persons, telecom,
address lines, postcodes, identifier values, original patient ids and fullUrls); ``scan(output, sensitive)``
looks for them, and for any 9-digit number passing the BSN 11-proef, in every string of the *output*.

Findings name the FHIR path and the kind, never the value. Matching is on whole tokens (letters/digits runs,
case-folded), so "Jan" does not match "January", and short values are ignored (below a threshold per kind)
because "M", "NL" or "1" would match everywhere; BSNs and postcodes are always checked. Two exceptions look
inside words (`glued`): a name of five letters or more run into another word at a change of case
("PompJansen", "dm2Jansen", "JansenPomp"; "Jansenstraat" is a word of its own), unless it is a word of FHIR
itself ("Value"); and a Dutch postcode run into anything ("pc1012NX").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from types import MappingProxyType
from typing import Any

import orjson

from gateway.deid.fold import fold, fold_document
from gateway.deid.homes import at_home, person_homes
from gateway.pipeline.parse import fhir_element_names

_TOKEN = re.compile(r"[^\W_]+")
_JSON_ESCAPE = re.compile(rb'\\(?:[nrtbf/"\\]|u[0-9a-fA-F]{4})')
_DIGIT_MARKS = bytes(
    48 if 48 <= c <= 57 else 97 if 65 <= c <= 90 or 97 <= c <= 122 else 32 for c in range(256)
)
# ASCII letters to lower case, digits kept, everything else a separator: split() yields _TOKEN's tokens
_LOWER_RUNS = bytes(
    c + 32 if 65 <= c <= 90 else c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256)
)
_ELEMENT_NAME = re.compile(r"_?[A-Za-z][A-Za-z0-9]{0,63}\Z")
_NINE = re.compile(r"(?<![0-9A-Za-z])[0-9]{9}(?![0-9A-Za-z])")
# a record number written as letters and six or more digits ("mrn7788123", case-folded): its digits alone too
_LETTERS_THEN_DIGITS = re.compile(r"[^\W\d_]+([0-9]{6,})")
# A BSN as people write it: 1234.56.789, 123 456 789, 123-456-789, 999/911/120, 99 99 11 120, 999,911,120
# (any of these separators, mixed too). A lookahead, so that overlapping candidates are all seen
# ("222 333 111" must not hide the "111 222 333" after it).
_BSN_SEP = r"[. /_,:'-]"
_SPLIT_BSN = re.compile(
    rf"(?<![0-9A-Za-z.])(?=(\d{{4}}{_BSN_SEP}\d{{2}}{_BSN_SEP}\d{{3}}|\d{{3}}{_BSN_SEP}\d{{3}}{_BSN_SEP}\d{{3}}"
    rf"|\d{{2}}{_BSN_SEP}\d{{2}}{_BSN_SEP}\d{{2}}{_BSN_SEP}\d{{3}})(?![0-9A-Za-z]|\.\d))"
)
_SPLIT_BSN_BYTES = re.compile(_SPLIT_BSN.pattern.encode())
# ... or glued to a word: "bsn999911120", "NL999911120" (a prefix of hex letters only is an opaque id's part)
_GLUED_BSN = re.compile(r"(?<![0-9A-Za-z])([A-Za-z]{1,8})([0-9]{9})(?![0-9A-Za-z])")
_GLUED_BSN_BYTES = re.compile(_GLUED_BSN.pattern.encode())
_HEX_LETTERS = frozenset("abcdefABCDEF")
# A telephone number as people write it (06-1234 5678, +31 (0)6 12 34 56 78): digits and separators
_PHONE_RUN = re.compile(r"\+?\d[\d .()/-]{6,}\d")
_PHONE_SEPARATORS = b" .()/-+"
_NOT_DIGIT = re.compile(r"\D")
# Our own opaque ids as they appear in the output: an id, a urn:uuid fullUrl or reference, Type/<id>
_OPAQUE_ID = re.compile(
    r"(?:urn:uuid:|[A-Z][A-Za-z]{1,63}/)?[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
_FULL_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# Date elements of events: the patient's birth date may be an event date there (a newborn's first
# observation) when the profile keeps dates; anywhere else (a value, a note, an extension) it is a leak
# when the profile generalises the birth date.
_EVENT_DATE_KEYS = frozenset(
    {"date", "start", "end", "issued", "authoredOn", "recorded", "created", "lastUpdated", "time", "when"}
)
PERSON_TYPES = {"Patient", "RelatedPerson", "Person"}
PRACTITIONER_TYPES = {"Practitioner", "PractitionerRole"}
# Numbering systems of organisations and professionals, whose 9-digit numbers pass the 11-proef as a BSN does
NOT_BSN_SYSTEMS = frozenset(
    "http://fhir.nl/fhir/NamingSystem/" + name
    for name in ("rsin", "kvk", "ura", "agb-z", "uzi-nr-pers", "uzi-nr-sys", "big")
)
# Identifiers of these resources name an organisation or a product, not a person (AGB, URA, GTIN...)
PUBLIC_TYPES = {"Organization", "Location", "Medication", "Substance", "HealthcareService", "Endpoint"}
MIN_LEN = {"name": 3, "telecom": 5, "address": 4, "identifier": 4, "patient-id": 8, "birth-date": 6}
# a part of a name people may write alone (a surname without voorvoegsels, a word of a name's text): a name
# when found, but a word a public place also has in its city or street is that place's
NAME_PART = "name-part"
TERMINOLOGY_PREFIXES = (
    "http://snomed.info/",
    "http://loinc.org",
    "http://hl7.org/fhir/sid/icd",
    "http://terminology.hl7.org/",
    "urn:oid:2.16.840.1.113883.6.",
    "http://unitsofmeasure.org",
    "urn:iso:std:iso:",
    "http://www.whocc.no/atc",
    "http://hl7.org/fhir/sid/cvx",
    "http://www.nlm.nih.gov/research/umls/rxnorm",
)
PSEUDED_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
_GLUED_NAME_MIN = 5  # shorter names glued into words are everywhere ("Ann" in "PlanAnnual")
_NL_POSTCODE_JOINED = re.compile(r"[1-9][0-9]{3}[a-z]{2}")
_CAMEL_PART = re.compile(r"[A-Z]?[a-z]+")


@cache
def _fhir_words() -> frozenset[str]:
    """The words FHIR's element names are made of ("valueCodeableConcept": value, codeable, concept): a
    patient named "Value" glued into one of them is structure, not a leak."""
    names = fhir_element_names()
    return frozenset(part.lower() for name in names for part in _CAMEL_PART.findall(name))


_DIGITS = re.compile(r"\d+")
_PHONE_GROUPS = 12  # "+ 3 1 6 1 2 3 4 5 6 7 8": a phone is a dozen groups at most
_MAX_GROUPS = 64  # a longer run is compared whole only: its windows would cost seconds (a re-probe's 4 MB)


def _holds_phone(run: str, phones: Collection[str]) -> bool:
    """A run of digit groups is, or holds, one of ``phones`` as whole groups: a run also takes in the numbers
    next to it ("bed 3 06-88228822", "06-88228822 / 020-1234567"; a review found them passed), but a phone's
    digits inside a longer number ("0031688228822123") are not it."""
    if phone_digits(run) in phones:
        return True
    digits = _NOT_DIGIT.sub("", run)
    if not any(p[1:] in digits for p in phones):  # a phone's digits after its 0 (+31 folds to that)
        return False
    return any(phone_digits(window) in phones for window in _group_windows(run, _PHONE_GROUPS))


def _holds_number(run: str, numbers: Collection[str]) -> bool:
    """A run of digit groups is, or holds as whole groups, one of an input's identifiers of seven digits or
    more ("MRN 765 4321 12-03-2024"); a six-digit one only as the whole run: "150-400" or "250.000" is how
    lab ranges and thousands are written (a re-probe's false findings)."""
    digits = _NOT_DIGIT.sub("", run)
    if digits in numbers:
        return True
    if not any(len(n) >= 7 and n in digits for n in numbers):
        return False
    windows = (_NOT_DIGIT.sub("", w) for w in _group_windows(run, _PHONE_GROUPS))
    return any(len(w) >= 7 and w in numbers for w in windows)


def _group_windows(run: str, most: int) -> Iterator[str]:
    """The pieces of ``run`` from one digit group to another, at most ``most`` groups long (with a "+" before
    the first); none for a run of more than `_MAX_GROUPS` groups."""
    groups = list(_DIGITS.finditer(run))
    if len(groups) > _MAX_GROUPS:
        return
    for i, first in enumerate(groups):
        start = first.start() - 1 if first.start() > 0 and run[first.start() - 1] == "+" else first.start()
        for last in groups[i : i + most]:
            yield run[start : last.end()]


def phone_digits(value: str) -> str | None:
    """The digits of a telephone number written with separators, Dutch international prefixes folded to
    the national form (+31 6 / 0031 6 / +31 (0)6 → 06); None for anything that is not such a number."""
    text = value.strip()
    if not text or text.strip("0123456789 .()/-+"):
        return None  # letters (an e-mail address, "tel:" URIs are rare in FHIR telecom values)
    digits = "".join(c for c in text if c.isdigit())
    if text.startswith(("+31", "0031")):
        rest = digits[2:] if text.startswith("+") else digits[4:]
        digits = "0" + rest[1:] if rest.startswith("0") else "0" + rest
    return digits if 9 <= len(digits) <= 15 else None


_MONTHS_NL = (
    "januari", "februari", "maart", "april", "mei", "juni", "juli", "augustus", "september", "oktober",
    "november", "december",
)  # fmt: skip
_MONTHS_EN = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december",
)  # fmt: skip


_MONTH_NUMBER = {
    name: n + 1
    for months in (_MONTHS_NL, _MONTHS_EN)
    for n, month in enumerate(months)
    for name in (month, month[:3])
} | {"mrt": 3, "okt": 10, "sept": 9} | {
    roman: n + 1  # 14.VII.1961
    for n, roman in enumerate(["i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x", "xi", "xii"])
}
# a day, also as an ordinal ("14th", "14e") or the start of a date-time token ("14t10")
_DAY = re.compile(r"(\d{1,2})(?:st|nd|rd|th|e|de|ste|t\d.*)?")


_DATE_SEP = r"[-./' ]+"


@cache
def _short_date_patterns(day: int, month: int, yy: str) -> frozenset[re.Pattern[str]]:
    """Day-first forms of a date with a two-digit year (14-7-61, 14/07/'61, 14 juli 61, 14e jul. 61), one
    pattern per way of writing the day, each starting with it: a literal start lets the regex engine skip
    ahead, where anchoring on the two-digit year would stop at every "01" of a date. What precedes the day
    is checked by ``_short_date_in``."""
    forms = {str(month), f"{month:02d}"} | {n for n, m in _MONTH_NUMBER.items() if m == month}
    months = "|".join(sorted(forms, key=len, reverse=True))
    tail = rf"(?:st|nd|rd|th|e|de|ste)?{_DATE_SEP}(?:{months})\.?{_DATE_SEP}{yy}(?![0-9])"
    return frozenset(re.compile(re.escape(d) + tail) for d in {str(day), f"{day:02d}"})


def _short_date_in(low: str, patterns: Collection[re.Pattern[str]]) -> bool:
    """Does a two-digit-year birth date stand in ``low`` (case-folded), not glued to a digit before it? A
    match glued to a digit is passed by one character, not by its length: the date may start inside it
    ("501 01 01 01" holds 01-01-01; a review found it hidden)."""
    for pattern in patterns:
        match = pattern.search(low)
        while match is not None:
            if match.start() == 0 or not low[match.start() - 1].isdigit():
                return True
            match = pattern.search(low, match.start() + 1)
    return False


def compact_dates(iso: str) -> tuple[str, str]:
    """19610714 and 14071961: a date written without separators is one token."""
    y, m, d = iso.split("-")
    return f"{y}{m}{d}", f"{d}{m}{y}"


def _number(token: str | None, pattern: re.Pattern[str] = _DAY) -> int | None:
    match = pattern.fullmatch(token) if token is not None else None
    return int(match.group(1)) if match else None


def date_around(tokens: list[str], i: int, dates: Collection[tuple[int, int]]) -> bool:
    """Is the year ``tokens[i]`` part of one of ``dates`` ((month, day) of that year) as people write it:
    1961-07-14, 14-07-1961 (any separators), 14-7-1961, 7/14/1961, 14 juli 1961, July 14, 1961?"""

    def month(token: str | None) -> int | None:
        return _MONTH_NUMBER.get(token) if token in _MONTH_NUMBER else _number(token)

    after = tokens[i + 1 : i + 3] + [None, None]
    before = [None, None] + tokens[max(0, i - 2) : i]
    return (
        (month(after[0]), _number(after[1])) in dates  # year first
        or (month(before[-1]), _number(before[-2])) in dates  # day, month, year
        or (month(before[-2]), _number(before[-1])) in dates  # month, day, year
    )


def _event_date_key(key: str) -> bool:
    return key in _EVENT_DATE_KEYS or (
        not key.startswith("value") and key.endswith(("Date", "DateTime", "Instant", "Period"))
    )


def bsn_valid(digits: str) -> bool:
    """The BSN 11-proef: sum(d_i * (9 - i)) for the first 8 digits minus the last digit is divisible by 11."""
    if len(digits) != 9 or not digits.isdigit() or digits == "000000000":
        return False
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0


@dataclass(frozen=True)
class Finding:
    path: str  # e.g. Bundle.entry[3].resource.note[0].text
    kind: str  # name | telecom | address | postcode | identifier | patient-id | patient-fullUrl | bsn


@dataclass
class SensitiveSet:
    """Token sequences indexed by their first token, plus exact patient ids and fullUrls."""

    by_first: dict[str, list[tuple[tuple[str, ...], str]]] = field(default_factory=dict)
    patient_ids: set[str] = field(default_factory=set)
    patient_urls: set[str] = field(default_factory=set)
    phones: set[str] = field(default_factory=set)  # telephone numbers as digits, however they are written
    digit_ids: set[str] = field(default_factory=set)  # identifiers of 6+ digits, however they are grouped
    # full birth dates by year: the year is the anchor of every notation, and rare in a document
    birth_dates: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    glued: set[tuple[str, str]] = field(default_factory=set)  # (case-folded value, kind) sought inside words
    surnames: set[str] = field(default_factory=set)  # case-folded words of surnames: sought in terms too
    # a birth date with a two-digit year, day first ("14-07-61"): its patterns for case-folded text, by
    # (day, two-digit year)
    short_dates: dict[tuple[int, str], frozenset[re.Pattern[str]]] = field(default_factory=dict)

    def short_date_patterns(self, digit_runs: Collection[str] | None = None) -> Collection[re.Pattern[str]]:
        """Those patterns; with the document's ``digit_runs`` (`_digit_runs`), only those whose day and
        two-digit year it has. Not by its tokens: the day is often no token of its own ("14th", "geb14"),
        nor the year ("61e"), and the glance then said clean where the walk found the date (a review: "14th
        July 61" passed the gate of any Bundle of more than a few patients). A match's day and year are
        whole runs of digits: each stands between a non-digit and a non-digit."""
        if digit_runs is None:
            return self._all_short_date_patterns
        return [
            pattern
            for (day, yy), patterns in self.short_dates.items()
            if yy in digit_runs and (str(day) in digit_runs or f"{day:02d}" in digit_runs)
            for pattern in patterns
        ]

    @cached_property
    def _all_short_date_patterns(self) -> frozenset[re.Pattern[str]]:
        # the walk asks per string; built once the set is complete (add_birth_date drops it)
        return frozenset().union(*self.short_dates.values())

    def add_birth_date(self, iso: str) -> None:
        y, m, d = iso.split("-")
        self.birth_dates.setdefault(y, set()).add((int(m), int(d)))
        for compact in (*compact_dates(iso), f"{d}{m}{y[2:]}"):  # also 140761
            self.add(compact, "birth-date")
        self.short_dates[(int(d), y[2:])] = self.short_dates.get((int(d), y[2:]), frozenset()) | (
            _short_date_patterns(int(d), int(m), y[2:])
        )
        self.__dict__.pop("_all_short_date_patterns", None)

    def add(self, value: Any, kind: str, *, glued: bool = True) -> None:
        """``glued``: also seek the value run into other words (and joined: "vanPutten")."""
        if type(value) is not str:
            return
        value = fold(value)  # as the output is compared (gateway/deid/fold.py)
        if kind == "telecom":
            digits = phone_digits(value)
            if digits is not None:
                self.phones.add(digits)
        tokens = tuple(_TOKEN.findall(value.casefold()))
        if not tokens:
            return
        joined = "".join(tokens)
        always = kind == "postcode"
        digits_only = joined.isdigit()
        minimum = MIN_LEN.get(kind, 4) + (1 if kind == "identifier" and digits_only else 0)
        if not always and len(joined) < minimum:
            return  # too short to tell from ordinary text
        if kind == "identifier" and digits_only and joined.startswith("0") and len(joined.lstrip("0")) >= 6:
            self.add(joined.lstrip("0"), kind)  # 012345611 is also written 12345611 (as a number, surely)
        if kind == "identifier" and digits_only and len(joined.lstrip("0")) >= 6:
            # 7654321 is also written 765-4321 or 7.654.321 (not 00000001: its digits are in every timestamp)
            self.digit_ids.add(joined)
        if kind == "identifier" and len(tokens) > 2 and tokens[0].isalpha():
            self.add(" ".join(tokens[1:]), kind)  # "MRN-CANARY-4711" is also written without its "MRN"
        prefixed = _LETTERS_THEN_DIGITS.fullmatch(joined) if kind == "identifier" else None
        if prefixed is not None and len(prefixed.group(1).lstrip("0")) >= 6:
            self.add(prefixed.group(1), kind)  # "MRN7788123" is also written 7788123 (a probe's number)
        entry = (tokens, kind)
        bucket = self.by_first.setdefault(tokens[0], [])
        if entry not in bucket:
            bucket.append(entry)
        if not glued:
            return
        self._add_glued(tokens, joined, kind)
        if kind == "name" and value.lower() != value.casefold():
            # run-in names are sought in lower-cased text, where "ß" stays "ß" (case-folded it is "ss")
            lowered = tuple(_TOKEN.findall(value.lower()))
            self._add_glued(lowered, "".join(lowered), kind)
        if kind == "postcode" and len(tokens) == 2:
            self.add(joined, "postcode-joined")  # "1012 NX" is also written "1012NX"
        elif kind in ("identifier", "name") and len(tokens) > 1 and len(joined) >= 8:
            self.add(joined, kind)  # "MRN-CANARY-77" is also written "MRNCANARY77", "van Putten" "vanPutten"

    def _add_glued(self, tokens: tuple[str, ...], joined: str, kind: str) -> None:
        if kind == "name":
            words = _fhir_words()
            for t in tokens:
                if len(t) >= _GLUED_NAME_MIN and t.isalpha() and t not in words:
                    self.glued.add((t, "name"))
        elif kind in ("postcode", "postcode-joined") and _NL_POSTCODE_JOINED.fullmatch(joined):
            self.glued.add((joined, "postcode"))

    def __len__(self) -> int:
        literals = len(self.patient_ids) + len(self.patient_urls) + len(self.phones) + len(self.birth_dates)
        return sum(len(v) for v in self.by_first.values()) + literals


# ── collect from the input ─────────────────────────────────────────────────────────────────────────────────


def _resources(bundle: Any) -> Iterator[dict[str, Any]]:
    """Every resource of the input: entries, nested Bundles' entries, and what each of them contains (a
    probe had an Encounter's contained RelatedPerson, never sought, whose name and street a delivered
    Location carried to the registry)."""
    if not isinstance(bundle, dict):
        return
    if bundle.get("resourceType") != "Bundle":
        yield bundle
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(res, dict):
            yield res
            yield from _resources(res) if res.get("resourceType") == "Bundle" else _contained(res)
    yield from _contained(bundle)


def _contained(res: dict[str, Any]) -> list[dict[str, Any]]:
    contained = res.get("contained")
    return [c for c in contained if isinstance(c, dict)] if isinstance(contained, list) else []


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _ext_strings(element: Any) -> Iterator[str]:
    """valueString of extensions on a primitive's ``_x`` (nl-core own-name, streetName...)."""
    items = element if isinstance(element, list) else [element]
    for item in items:
        exts = item.get("extension") if isinstance(item, dict) else None
        for ext in exts if isinstance(exts, list) else []:
            if not isinstance(ext, dict):
                continue
            # voorvoegsels ("van", "de", "van der") are the commonest words of Dutch, not identifying alone
            if isinstance(ext.get("valueString"), str) and not str(ext.get("url")).endswith("-prefix"):
                yield ext["valueString"]


# voorvoegsels (and those of other languages common in Dutch names), as they lead a family name
_SURNAME_PREFIXES = frozenset(
    {"van", "de", "der", "den", "het", "t", "te", "ten", "ter", "in", "op", "onder", "aan", "bij", "uit"}
    | {"over", "voor", "vd", "v", "d", "l", "la", "le", "les", "lo", "los", "von", "vom", "zu", "zum", "zur"}
    | {"da", "del", "della", "dello", "di", "do", "dos", "du", "des", "el", "al"}
)


def surname_cores(family: str) -> list[str]:
    """The parts of a family name people also write alone: each part of a double name ("de Boer-Smit":
    "de Boer", "Smit"; any dash) and each without its voorvoegsels ("van der Berkhout": "Berkhout",
    "d'Ancona": "Ancona"). A plain R4 name has no nl-core own-name part saying which that is."""
    cores: list[str] = []
    family = fold(family)
    parts = [part.strip() for part in family.split("-")]
    for part in parts if len(parts) > 1 else [family]:
        words = part.split()
        while len(words) > 1 and words[0].casefold().strip("'.") in _SURNAME_PREFIXES:
            words.pop(0)
        head, apostrophe, rest = words[0].partition("'") if words else ("", "", "")
        if apostrophe and rest and head.casefold() in _SURNAME_PREFIXES:  # d'Ancona, l'Ecluse
            words[0] = rest
        cores += [c for c in {part, " ".join(words)} if c and c != family]
    return cores


def _words(text: str) -> list[str]:
    """The words of a name written in one string ("Hendrik Smulders", given "Hendrikus Johannes"): each may
    be written alone. Voorvoegsels and initials are not names by themselves."""
    words = [w.strip(".,'") for w in fold(text).split()]
    kept = [w for w in words if len(w) > 2 and w.casefold() not in _SURNAME_PREFIXES]
    return kept if len(words) > 1 else []


def _names(names: Any, out: SensitiveSet, *, own: bool = False) -> None:
    """``own``: a Patient's names, whose surname alone is sought in a terminology's display too."""
    for name in names if isinstance(names, list) else [names]:
        if not isinstance(name, dict):
            continue
        text = name.get("text")
        out.add(text, "name")
        for word in _words(text) if type(text) is str else ():
            out.add(word, NAME_PART)
        family = name.get("family")
        out.add(family, "name")
        cores = surname_cores(family) if type(family) is str else []
        for core in cores:
            out.add(core, NAME_PART)
        own_names = list(_ext_strings(name.get("_family")))  # nl-core own name, partner name
        for value in own_names:
            out.add(value, "name")
        surnames = cores + own_names
        if own:
            _surname_words([family, *surnames] if type(family) is str else surnames, out)
        for given in _list(name.get("given")):
            out.add(given, "name")
            for word in _words(given) if type(given) is str else ():
                out.add(word, NAME_PART)
            if type(given) is not str or type(family) is not str:
                continue
            out.add(f"{given} {family}", "name")  # and so also glued: "JohannaPutten"
            # whole names, which are sought in a terminology's display too: by the own or partner name of an
            # nl-core "van Jansen-Pietersen" ("Klaasje Jansen"); not sought run into other words, where two
            # words of FHIR ("Value Quantity") would be found in its element names. Not surname first: that is
            # how eponyms are written ("Hand-Schüller-Christian disease", a re-probe's false finding)
            for surname in surnames:
                out.add(f"{given} {surname}", "name", glued=False)


# A surname alone is sought in a terminology's display from this length: the commonest Dutch surnames are
# words of Dutch terms ("de Jong", "de Groot", "Klein", "de Wit", "Lang": jong, groot, klein, wit, lang).
TERM_SURNAME_MIN = 6


def _surname_words(surnames: list[str], out: SensitiveSet) -> None:
    """Each word of a patient's surname, as the walk compares it (case-folded) and as the glued search does
    (lower-cased: "straßburger"); each sought alone too, so that the whole-document check sends a display
    holding a surname's second word ("Kwakkelsteen Oosterhout", "O'Callaghan") to the walk (a re-probe)."""
    for surname in surnames:
        if type(surname) is not str:
            continue
        folded = fold(surname)
        for words in (_TOKEN.findall(folded.casefold()), _TOKEN.findall(folded.lower())):
            for word in words:
                if len(word) >= TERM_SURNAME_MIN and word.isalpha() and word not in out.surnames:
                    out.surnames.add(word)
                    out.add(word, NAME_PART)


def _telecoms(telecoms: Any, out: SensitiveSet) -> None:
    for tel in telecoms if isinstance(telecoms, list) else []:
        if isinstance(tel, dict):
            out.add(tel.get("value"), "telecom")


def _addresses(addresses: Any, out: SensitiveSet) -> None:
    for addr in addresses if isinstance(addresses, list) else [addresses]:
        if not isinstance(addr, dict):
            continue
        for line in _list(addr.get("line")):
            out.add(line, "address")
        for value in _ext_strings(_list(addr.get("_line"))):
            out.add(value, "address")
        out.add(addr.get("text"), "address")
        out.add(addr.get("postalCode"), "postcode")


def _identifiers(value: Any, out: SensitiveSet) -> None:
    """Every ``identifier`` / ``*Identifier`` value anywhere inside a resource (e.g. Reference.identifier)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if isinstance(sub, (dict, list)):  # an identifier is a dict or a list of them; scalars hold none
                if key == "identifier" or key.endswith("Identifier"):
                    for ident in sub if isinstance(sub, list) else [sub]:
                        if isinstance(ident, dict):
                            out.add(ident.get("value"), "identifier")
                _identifiers(sub, out)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)):
                _identifiers(item, out)


def _resource_identifiers(res: dict[str, Any], out: SensitiveSet) -> None:
    """``_identifiers`` for one resource, skipped when its serialisation has no ``…dentifier":`` key at all
    (one C-level dump and search instead of a Python walk of a resource that holds no identifier)."""
    try:
        if b'dentifier":' not in orjson.dumps(res):
            return
    except (TypeError, orjson.JSONEncodeError):
        pass  # not plain JSON: walk it
    _identifiers(res, out)


def _person(res: dict[str, Any], out: SensitiveSet) -> None:
    _names(res.get("name"), out, own=res.get("resourceType") == "Patient")
    _telecoms(res.get("telecom"), out)
    _addresses(res.get("address"), out)
    _contacts(res, out)
    for extension in _list(res.get("extension")):
        url = extension.get("url") if isinstance(extension, dict) else None
        if url == _MOTHERS_MAIDEN_NAME:  # a family name of the person's family (on every Synthea patient)
            _names({"family": extension.get("valueString")}, out)
        elif url == _BIRTH_PLACE:
            _addresses(extension.get("valueAddress"), out)


_MOTHERS_MAIDEN_NAME = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
_BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"


def _practitioner(res: dict[str, Any], kept: Collection[str], out: SensitiveSet) -> None:
    # a professional's address is the workplace, i.e. an Organization's address that may be delivered
    if "name" not in kept:
        _names(res.get("name"), out)
    if "telecom" not in kept:
        _telecoms(res.get("telecom"), out)
    if "identifier" not in kept:
        _resource_identifiers(res, out)


def _contacts(res: dict[str, Any], out: SensitiveSet) -> None:
    for contact in _list(res.get("contact")):
        if isinstance(contact, dict):
            _names(contact.get("name"), out)
            _telecoms(contact.get("telecom"), out)
            _addresses(contact.get("address"), out)


def sensitive_values(
    bundle: Any, *, practitioner_kept: Collection[str] = (), birth_dates: bool = True
) -> SensitiveSet:
    """Identifying values of the input bundle (or single resource).

    ``practitioner_kept``: the parts of professionals' data the profile delivers (``name``, ``identifier``,
    ``telecom``; see ``Plan.practitioner_kept``); those are not collected, else every one would be reported.
    ``birth_dates``: collect the patients' full birth dates (when the profile generalises them); they are
    sought outside event-date elements only (``_event_date_key``).
    """
    out = SensitiveSet()
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if (
            isinstance(res, dict)
            and res.get("resourceType") == "Patient"
            and isinstance(entry.get("fullUrl"), str)
        ):
            out.patient_urls.add(fold(entry["fullUrl"]))
            bare = entry["fullUrl"][9:] if entry["fullUrl"].lower().startswith("urn:uuid:") else ""
            if _UUID.fullmatch(bare):  # the uuid alone identifies it too, in either case (a review's passed)
                out.patient_urls.update((fold(bare.lower()), fold(bare.upper())))
    resources = list(_resources(bundle))  # walked three times: here and twice in _drop_public
    for res in resources:
        rtype = res.get("resourceType")
        practitioner = rtype in PRACTITIONER_TYPES
        if rtype in PERSON_TYPES:
            _person(res, out)
        elif rtype == "Organization":
            _contacts(res, out)  # a contact is a person (a place's own telecom and address are its own)
        elif practitioner:
            _practitioner(res, practitioner_kept, out)
        if rtype == "Patient" and isinstance(res.get("id"), str):
            out.patient_ids.add(fold(res["id"]))
            out.add(res["id"], "patient-id")
        if birth_dates and rtype in PERSON_TYPES and _FULL_DATE.fullmatch(str(res.get("birthDate"))):
            out.add_birth_date(res["birthDate"])
        if rtype not in PUBLIC_TYPES and not practitioner:
            _resource_identifiers(res, out)
    _drop_public(resources, out)
    return out


def _drop_public(resources: list[dict[str, Any]], out: SensitiveSet) -> None:
    """A value the input publishes as an organisation's or location's own data (a hospital in the patient's
    postcode area, a GP practice phone number) is not personal: delivering that Organization is no leak."""
    public = SensitiveSet()
    words: set[str] = set()  # every word of the places' cities and streets
    homes = person_homes(resources)
    for res in resources:
        # a place at a patient's home publishes nothing; an Organization's contact is a person, not the place
        if res.get("resourceType") in PUBLIC_TYPES and not at_home(res, homes):
            _telecoms(res.get("telecom"), public)
            _addresses(res.get("address"), public)
            words.update(_place_words(res))
    for first, entries in public.by_first.items():
        mine = out.by_first.get(first)
        if mine:
            public_seqs = {seq for seq, _ in entries}
            # a person's street address stays sensitive even where a Location or Organization carries it:
            # that Location is the patient's home (a home visit), not a public place
            out.by_first[first] = [e for e in mine if e[0] not in public_seqs or e[1] == "address"]
    # a part of a person's name or a street name alone that is also a word of a place's city or street ("van
    # Delft" and a hospital in Delft, "UMC Utrecht" in Utrecht, the street a hospital is on): the place's
    # own, delivered with it; the whole name and the whole address line stay sensitive
    for word in words.intersection(out.by_first):
        out.by_first[word] = [
            e for e in out.by_first[word] if not (len(e[0]) == 1 and e[1] in (NAME_PART, "address"))
        ]
    out.phones -= public.phones


def _place_words(res: dict[str, Any]) -> set[str]:
    """The words of a place's city, district and street: geography, not a place's name (a home visit's
    Location may be named after the family: "Woning fam. Berkhout")."""
    texts: list[Any] = []
    for address in _list(res.get("address")):
        if isinstance(address, dict):
            texts += [address.get("city"), address.get("district"), *_list(address.get("line"))]
    return {w for t in texts if isinstance(t, str) for w in _TOKEN.findall(fold(t).casefold())}


# ── scan the output ────────────────────────────────────────────────────────────────────────────────────────


def _path(parts: list[str]) -> str:
    return "".join(parts)


def _is_code(parent: Mapping[str, Any], key: str) -> bool:
    system = parent.get("system")
    return key == "code" and isinstance(system, str) and system.startswith(TERMINOLOGY_PREFIXES)


def _is_pseudonym(parent: Mapping[str, Any]) -> bool:
    # our own pseudonym identifiers (type PSEUDED) are opaque base64url and may contain 9-digit runs
    coding = (parent.get("type") or {}).get("coding") if isinstance(parent.get("type"), dict) else None
    return isinstance(coding, list) and any(
        isinstance(c, dict) and c.get("code") == "PSEUDED" and c.get("system") == PSEUDED_SYSTEM
        for c in coding
    )


class _Scanner:
    def __init__(self, sensitive: SensitiveSet | None):
        self.sens = sensitive
        self.findings: list[Finding] = []
        self.part_of: dict[Any, str] = {}  # key -> ".key" (or ".(key)"), computed once per distinct key
        literals = len(sensitive.patient_urls) + len(sensitive.patient_ids) if sensitive is not None else 0
        # many sensitive values (multi-patient bundles): a token lookup per string instead of the alternation
        self.many = sensitive is not None and len(sensitive.by_first) + literals > _PROBE_LIMIT
        # set by the whole-document check when it saw a written-out BSN or a patient's phone number in some
        # other notation; until then (or when the document cannot be serialised) every string is checked
        self.split_bsn = self.phones = True
        # likewise for a name or postcode run into another word: only the values the document check saw
        # glued somewhere (``glued_in_document``); until it has looked, every one
        self.glued: Collection[tuple[str, str]] = sensitive.glued if sensitive is not None else ()
        self.glued_decided = False
        self.decided: dict[str, bool] = {}  # needs_check's answer per distinct string of the document
        self.in_value = False  # inside a value[x] (valuePeriod), where no date is an event either
        self.in_patient = False  # inside a Patient no date is an event: a full birth date there is a leak
        # set by the whole-document check when a birth date was its only suspicion: then only the parts of the
        # document that hold one need the walk
        self.only_birth_dates = False

    @cached_property
    def quick(self) -> re.Pattern[str]:
        """One C-level search per string decides whether it needs the exact (Python) checks: any 9-digit run,
        any first token of a sensitive sequence, any patient fullUrl or id. Most strings do not. Built only
        when the document is walked (compiling it costs more than the whole-document check)."""
        others: list[str] = []
        sensitive = self.sens
        if sensitive is not None:
            firsts = sorted(set(sensitive.by_first) | set(sensitive.birth_dates), key=len, reverse=True)
            if firsts:
                others.append(r"(?<![^\W_])(?:" + "|".join(map(re.escape, firsts)) + r")(?![^\W_])")
            others += [re.escape(u) for u in sensitive.patient_urls | sensitive.patient_ids]
        return re.compile("|".join([_NINE.pattern, *others]), re.IGNORECASE)

    @cached_property
    def lookup(self) -> tuple[frozenset[str], Mapping[str, tuple[str, ...]], tuple[str, ...]]:
        """For ``many``: (tokens that make a string worth checking, literals without such a token by a
        substring each holds, all literals). A string can only be reported for a sequence if it holds the
        sequence's first token, for a patient fullUrl / id if it holds the literal's anchor
        (``_required_tokens``: whole in any string the exact check reports), and for one without an anchor
        if it holds the literal's longest token as a substring (lower-cased; "" for a literal of none)."""
        sens = self.sens
        assert sens is not None
        keys = set(sens.by_first) | set(sens.birth_dates)
        plain: dict[str, list[str]] = {}
        literals = [(u, True) for u in sens.patient_urls] + [(i, False) for i in sens.patient_ids]
        for lit, substring in literals:
            required = _required_tokens(lit, substring=substring)
            if required is None:
                edges = _anchor_tokens(lit)
                plain.setdefault(_longest(edges)[0] if edges else "", []).append(lit)
            else:
                keys.add(_longest(required)[0])
        by_substring = MappingProxyType({k: tuple(v) for k, v in plain.items()})
        return frozenset(keys), by_substring, tuple(lit for lit, _ in literals)

    def needs_check(self, s: str) -> bool:
        """Whether ``s`` needs the exact checks; it does not depend on where ``s`` is, so each distinct
        string is decided once per document (codes, systems and references repeat in every resource)."""
        needs = self.decided.get(s)
        if needs is None:
            needs = self.decided[s] = self._needs_check(s)
        return needs

    def _needs_check(self, s: str) -> bool:
        if self.split_bsn and (_SPLIT_BSN.search(s) or _GLUED_BSN.search(s)):
            return True
        if self.phones and _PHONE_RUN.search(s):
            return True
        if self.glued and _glued_kind(s, self.glued) is not None:
            return True
        short_dates = self.sens.short_dates if self.sens is not None else None
        if short_dates and _short_date_in(s.casefold(), self.sens.short_date_patterns()):  # type: ignore[union-attr]
            return True
        if not self.many:
            # IGNORECASE covers ASCII; other text is case-folded first, as the sensitive tokens were (and a
            # 9-digit run is sought before: folding "111222333ß" to "...ss" would glue a letter onto it)
            if s.isascii():
                return self.quick.search(s) is not None
            # as written too: a literal (a fullUrl with "ß") is sought as it is, and folding changes it
            quick = self.quick.search(s) is not None or self.quick.search(s.casefold()) is not None
            return quick or _NINE.search(s) is not None
        if _NINE.search(s) is not None:
            return True
        keys, plain, literals = self.lookup
        if s.isascii():
            low = s.lower()
            if not keys.isdisjoint(_TOKEN.findall(low)):
                return True
            # a patient's 2,500 relative fullUrls were each sought in every string (seconds; a probe's)
            return any(part in low and any(lit in s for lit in lits) for part, lits in plain.items())
        # the anchors are ASCII tokens of the literals; for other text, search every literal as text() does
        return not keys.isdisjoint(_TOKEN.findall(s.casefold())) or any(lit in s for lit in literals)

    def text(self, s: str, key: str, parent: Mapping[str, Any], parts: list[str]) -> None:
        """Every check of one string; at most one finding of the sensitive values per string."""
        kind = self._bsn(s, key, parent)
        if kind is not None:
            self.findings.append(Finding(_path(parts), kind))
        sens = self.sens
        if sens is None:
            return
        self.findings += [Finding(_path(parts), k) for k in self._literals(s, key, sens)]
        if (key == "value" and self.in_patient and _is_pseudonym(parent)) or _OPAQUE_ID.fullmatch(s):
            # ciphertext of the TTP, a keyed hash of ours: a random token in it can equal a short name ("jan")
            return
        # a terminology's own display ("Iris structure", "Post-operative ...") is the term, not about a
        # person: only whole names of two words or more are sought there
        term = key == "display" and str(parent.get("system")).startswith(TERMINOLOGY_PREFIXES)
        kind = self._value_of_the_input(s, key, sens, names=not term)
        if kind is None and self.glued and not term:
            # run into a term's word, a value may be the term's own ("Parkinsonism", "2x1000mg" for a patient
            # in 1000 MG: a re-probe's false finding)
            kind = _glued_kind(s, self.glued)
        if kind is None and term and sens.surnames:
            kind = self._surname_in_term(s, sens)
        if kind is not None:
            self.findings.append(Finding(_path(parts), kind))

    def _surname_in_term(self, s: str, sens: SensitiveSet) -> str | None:
        """A patient's surname alone in a terminology's display, as a word or run into one at a change of case
        ("Kwakkelsteen tumour", "KwakkelsteenSyndrome": a probe saw both delivered). An eponym that is the
        patient's own surname stops the Bundle too: removing the display only then told the registry the
        name was a word of the term (a re-probe). A given name alone is a term's word ("Iris structure")."""
        if any(token in sens.surnames for token in _TOKEN.findall(s.casefold())):
            return "name"
        glued = self._glued_surnames
        return _glued_kind(s, glued) if glued else None

    @cached_property
    def _glued_surnames(self) -> list[tuple[str, str]]:
        surnames = self.sens.surnames if self.sens is not None else set()
        return [(value, kind) for value, kind in self.glued if kind == "name" and value in surnames]

    def _bsn(self, s: str, key: str, parent: Mapping[str, Any]) -> str | None:
        if _is_code(parent, key) or (key == "value" and self.in_patient and _is_pseudonym(parent)):
            return None  # a terminology code, our own pseudonym: 9-digit runs are not BSNs there
        if key == "value" and parent.get("system") in NOT_BSN_SYSTEMS:
            return None  # an organisation's or professional's number (RSIN, URA, UZI) passes the 11-proef too
        if _NINE.search(s) is not None and any(bsn_valid(m.group(0)) for m in _NINE.finditer(s)):
            return "bsn"
        return "bsn" if self.split_bsn and _written_bsn_in(s) else None

    def _literals(self, s: str, key: str, sens: SensitiveSet) -> list[str]:
        found = []
        if key in ("reference", "id", "fullUrl", "url") and s.rsplit("/", 1)[-1] in sens.patient_ids:
            found.append("patient-id")
        if any(url in s for url in sens.patient_urls):
            found.append("patient-fullUrl")
        return found

    def _value_of_the_input(self, s: str, key: str, sens: SensitiveSet, *, names: bool = True) -> str | None:
        """A phone number in any notation, a birth date in any notation, or a whole token sequence (of a
        name only when ``names``)."""
        if self.phones and sens.phones and any(
            _holds_phone(m.group(0), sens.phones) for m in _PHONE_RUN.finditer(s)
        ):
            return "telecom"
        if self.phones and sens.digit_ids and any(
            _holds_number(m.group(0), sens.digit_ids) for m in _PHONE_RUN.finditer(s)
        ):
            return "identifier"
        tokens = _TOKEN.findall(s.casefold())
        dates_count = self.in_patient or self.in_value or not _event_date_key(key)
        dates = sens.birth_dates
        anchored = (i for i, t in enumerate(tokens) if t in dates)
        if dates_count and any(date_around(tokens, i, dates[tokens[i]]) for i in anchored):
            return "birth-date"
        if dates_count and sens.short_dates and _short_date_in(s.casefold(), sens.short_date_patterns()):
            return "birth-date"
        by_first = sens.by_first
        for i, tok in enumerate(tokens):
            for seq, kind in by_first.get(tok, ()):
                # in a terminology's display a name part may be a term's word ("Parkinson"), a whole name
                # of two words or more ("Maria Visser") is no term's
                if (kind == "birth-date" and not dates_count) or (
                    not names and (kind == NAME_PART or (kind == "name" and len(seq) < 2))
                ):
                    continue
                if len(seq) == 1 or tuple(tokens[i : i + len(seq)]) == seq:
                    return "name" if kind == NAME_PART else kind.replace("-joined", "")
        return None

    def part(self, key: Any) -> str:
        part = self.part_of.get(key)
        if part is None:
            # paths name FHIR elements; a key that is not an element name could itself be a value
            part = "." + key if type(key) is str and _ELEMENT_NAME.match(key) else ".(key)"
            self.part_of[key] = part
        return part

    def value(self, value: Any, key: str, parent: Mapping[str, Any], parts: list[str]) -> None:
        t = type(value)
        if t is str:
            if self.needs_check(value):
                self.text(value, key, parent, parts)
        elif t is dict:
            outer, outer_value = self.in_patient, self.in_value
            self.in_patient = outer or value.get("resourceType") == "Patient"
            # a Period or a date inside a value[x] is a value, not when something happened: valuePeriod.start
            self.in_value = outer_value or (type(key) is str and key.startswith("value"))
            for k, v in value.items():
                tv = type(v)
                if tv is str and not self.needs_check(v):
                    continue  # the common case, decided without building a path
                if tv is str or tv is dict or tv is list or tv is int or tv is float:
                    parts.append(self.part(k))
                    self.value(v, k, value, parts) if tv is not str else self.text(v, k, value, parts)
                    parts.pop()
            self.in_patient, self.in_value = outer, outer_value
        elif t is list:
            for i, v in enumerate(value):
                parts.append(f"[{i}]")
                self.value(v, key, parent, parts)
                parts.pop()
        elif t is int and 100_000_000 <= value <= 999_999_999 and bsn_valid(str(value)):
            self.findings.append(Finding(_path(parts), "bsn"))
        elif t is int and self.sens is not None and (kind := self._whole_number(value)) is not None:
            self.findings.append(Finding(_path(parts), kind))  # the input has it as identifier, birth date
        elif t is float and value.is_integer() and value < 1e15:  # 999911120.0, 19610714.0, 7.788123e6
            whole = int(value)
            if 100_000_000 <= whole <= 999_999_999 and bsn_valid(str(whole)):
                self.findings.append(Finding(_path(parts), "bsn"))
            elif self.sens is not None and (kind := self._whole_number(whole)) is not None:
                self.findings.append(Finding(_path(parts), kind))

    def _whole_number(self, value: int) -> str | None:
        assert self.sens is not None
        for seq, kind in self.sens.by_first.get(str(value), ()):
            if len(seq) == 1 and kind in ("identifier", "birth-date"):  # 19610714 as a JSON number
                return kind
        # a phone number as a number lost its 0 (612345678) or kept its country code (31612345678)
        digits = str(value)
        national = ("0" + digits, "0" + digits[2:]) if digits.startswith("31") else ("0" + digits,)
        return "telecom" if any(n in self.sens.phones for n in national) else None


def _glued_kind(
    text: str, candidates: Collection[tuple[str, str]], lowered: str | None = None
) -> str | None:
    """The kind of a sensitive value run into another word somewhere in ``text`` (see the module docstring),
    or None. One lower-cased copy (``lowered``, if the caller has it: ASCII only, where it is the casefold)
    and a C-level search per value; the same function decides for the whole document and for one string, so
    the document check and the walk agree."""
    if not candidates:
        return None
    lowered = lowered if lowered is not None else text.lower()
    if len(lowered) != len(text):  # a few letters grow when lower-cased ("İ"): keep them, keep positions
        lowered = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    for value, kind in candidates:
        at = lowered.find(value)
        while at >= 0:
            if _glued_at(text, at, at + len(value), kind):
                return kind
            at = lowered.find(value, at + 1)
    return None


def _glued_values(
    text: str, candidates: Collection[tuple[str, str]], lowered: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The candidates run into another word somewhere in ``text``: for the whole document, the only ones
    the walk has to look for in each string (a string of the document is a piece of its text, between
    delimiters that are not letters or digits, so a value glued in a string is glued in the document)."""
    if not candidates:
        return ()
    lowered = lowered if lowered is not None else text.lower()
    return tuple(c for c in candidates if c[0] in lowered and _glued_kind(text, (c,), lowered) is not None)


def glued_in_document(raw: bytes, candidates: Collection[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``_glued_values`` of a serialised document, its JSON escapes read as the separators they are."""
    if b"\\" in raw:
        raw = _JSON_ESCAPE.sub(b" ", raw)
    return _glued_values(raw.decode(), candidates)


def _glued_at(text: str, start: int, end: int, kind: str) -> bool:
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if kind == "postcode":
        return before.isalnum() or after.isalnum()  # a whole token is the ordinary check's
    first, last = text[start], text[end - 1]
    run_on = first.isupper() and (before.islower() or before.isdigit())  # "PompJansen", "dm2Jansen"
    run_into = not before.isalnum() and last.islower() and after.isupper()  # "JansenPomp"
    return run_on or run_into


def _written_bsn_in(s: str) -> bool:
    """A BSN with separators (1234.56.789) or glued to a word (bsn999911120)."""
    return any(bsn_valid(re.sub(r"\D", "", m.group(1))) for m in _SPLIT_BSN.finditer(s)) or any(
        not _HEX_LETTERS.issuperset(m.group(1)) and bsn_valid(m.group(2)) for m in _GLUED_BSN.finditer(s)
    )


def _suspicions(raw: bytes, marks: bytes, scanner: _Scanner) -> None:
    """Whole-document pre-checks (C-level) that decide whether the walk must look for a BSN written with
    separators, or for a patient's phone number in another notation (separators dropped, +31 folded).

    ``marks`` is ``raw`` with digits as "0", ASCII letters as "a", all else " ", framed by spaces: a written
    BSN the walk would report is one of the two shapes below there, and only those places are read exactly
    (a regex over the whole document would cost more than the rest of the gate)."""
    scanner.split_bsn = any(_split_bsn_at(raw, marks, shape) for shape in _SPLIT_SHAPES) or _glued_bsn_at(
        raw, marks
    )
    phones = scanner.sens.phones if scanner.sens is not None else ()
    digit_ids = scanner.sens.digit_ids if scanner.sens is not None else ()
    if phones or digit_ids:
        glued = raw.translate(None, _PHONE_SEPARATORS)  # "+31 (0)6-1234 5678" -> "3106123 45678" -> ...
        scanner.phones = any(p[1:].encode() in glued for p in phones) or any(  # after a phone's leading 0
            d.encode() in glued for d in digit_ids
        )
    else:
        scanner.phones = False


_SPLIT_SHAPES = (b" 0000 00 000 ", b" 000 000 000 ", b" 00 00 00 000 ")


def _split_bsn_at(raw: bytes, marks: bytes, shape: bytes) -> bool:
    at = marks.find(shape)
    while at >= 0:
        # marks[i + 1] is raw[i]: the shape's leading space is raw[at - 1], its digits start at raw[at]
        window = raw[max(0, at - 1) : at + len(shape) + 1]
        found = _SPLIT_BSN_BYTES.finditer(window)
        if any(bsn_valid(re.sub(rb"\D", b"", m.group(1)).decode()) for m in found):
            return True
        at = marks.find(shape, at + 1)
    return False


def _glued_bsn_at(raw: bytes, marks: bytes) -> bool:
    at = marks.find(b"a000000000 ")
    while at >= 0:
        # marks[at] is the letter before the digits, raw[at - 1]; the word may start up to 8 letters earlier
        for m in _GLUED_BSN_BYTES.finditer(raw[max(0, at - 10) : at + 10]):
            if not _HEX_LETTERS.issuperset(m.group(1).decode()) and bsn_valid(m.group(2).decode()):
                return True
        at = marks.find(b"a000000000 ", at + 1)
    return False


_PROBE_LIMIT = 24  # more sensitive first tokens + patient literals than this: tokenise the document once


def _required_tokens(literal: str, *, substring: bool) -> list[tuple[str, int]] | None:
    """Tokens that must be whole tokens of a document holding ``literal`` where the walk would report it, or
    None if there are none to rely on (then a substring search decides).

    ``substring`` (a patient fullUrl, found anywhere inside a string): only the tokens with a separator on
    both sides *inside the literal*; the first and last may be glued to neighbouring text. Otherwise (a
    patient id, found as a whole string or the tail after the last "/"): the string starts after '"' or '/'
    and ends at '"', so every token of the literal is whole. ASCII literals only (the ASCII document is
    tokenised by a byte translation). Each token comes with its offset in the literal.
    """
    if not literal.isascii():
        return None
    matches = list(_TOKEN.finditer(literal))
    if substring:
        matches = [m for m in matches if m.start() > 0 and m.end() < len(literal)]
    return [(m.group(0).lower(), m.start()) for m in matches] or None


def _longest(tokens: list[tuple[str, int]]) -> tuple[str, int]:
    """The longest of (token, offset) pairs: the rarest to search for, as a rule."""
    return max(tokens, key=lambda r: len(r[0]))


def _anchor_tokens(literal: str) -> list[tuple[str, int]]:
    """Every token of an ASCII literal (lower-cased) with its offset: where the literal occurs, each of them
    occurs as a substring at that offset (glued to its neighbours or not)."""
    if not literal.isascii():
        return []
    return [(m.group(0).lower(), m.start()) for m in _TOKEN.finditer(literal)]


def _literal_found(escaped: bytes, literals: list[tuple[str, bool]], tokens: set[str] | None) -> bool:
    """Does any patient fullUrl / id occur (JSON-escaped) in the document? False means the walk cannot report
    one. ``tokens``: the ASCII document's token set, or None (then every literal is a substring search).

    With the token set, a literal whose required tokens are not all present is skipped; the others are
    anchored on their longest required token: one search per distinct anchor, and at each of its positions
    one set lookup per (offset, length) shape. So 200 fullUrls of the same shape cost one search, not 200
    (their tokens, "fhir", "patient", "uuid" and the like, are all present in any document)."""
    direct: list[str] = []
    anchored: dict[str, dict[tuple[int, int], set[str]]] = {}
    for lit, substring in literals:
        esc = orjson.dumps(lit).decode()[1:-1]
        required = _required_tokens(lit, substring=substring) if tokens is not None else None
        if required is None and tokens is not None and esc == lit and (edges := _anchor_tokens(lit)):
            # a fullUrl whose every token is at an edge (`Patient/q7`): its tokens may be glued to the text
            # around it, so none is required whole, but each still marks where it is: anchored, unfiltered
            # (2,500 relative fullUrls were 2,500 searches of the whole document, seconds; a probe's)
            anchor, offset = _longest(edges)
            anchored.setdefault(anchor, {}).setdefault((offset, len(lit)), set()).add(lit)
            continue
        if required is None or esc != lit:
            if required is None or all(t in tokens for t, _ in required):  # type: ignore[operator]
                direct.append(esc)
            continue
        if not all(t in tokens for t, _ in required):  # type: ignore[operator]
            continue  # the walk cannot report it: a token it needs is absent from the whole document
        anchor, offset = _longest(required)
        anchored.setdefault(anchor, {}).setdefault((offset, len(lit)), set()).add(lit)
    if not direct and not anchored:
        return False
    text = escaped.decode()
    if any(esc in text for esc in direct):
        return True
    lowered = text.lower()  # ASCII (the token set is only built for ASCII documents): same positions
    for anchor, shapes in anchored.items():
        budget = 64 * (1 + sum(map(len, shapes.values())))  # then the plain searches are cheaper
        at = lowered.find(anchor)
        while at >= 0:
            for (offset, length), lits in shapes.items():
                start = at - offset
                if start >= 0 and text[start : start + length] in lits:
                    return True
            budget -= 1
            if budget < 0:
                if any(lit in text for lits in shapes.values() for lit in lits):
                    return True
                break
            at = lowered.find(anchor, at + 1)
    return False


_CODING_HEAD = re.compile(rb'\{"system":"([^"\\]*)","code":"\Z')


def _coding_code_at(raw: bytes, at: int) -> bool:
    """Is the 9-digit run at ``raw[at:at + 9]`` the whole ``code`` of a Coding whose ``system`` is a
    terminology, written as ``{"system":"<terminology>","code":"<9 digits>"``? The walk does not check such a
    value for a BSN (``_is_code``). ``raw`` has had its JSON escapes replaced by spaces: every '"' left in it
    is a string delimiter, so this byte pattern is exactly an object whose first key is "system" (a string)
    and whose second is "code", the run being that whole string. The prefixes hold no character that JSON
    escapes, so the escape-free system starts with one exactly if the real one does. Any other layout (key
    order, a system past 512 bytes): not exempt, walk.
    """
    if raw[at + 9 : at + 10] != b'"':
        return False
    head = _CODING_HEAD.search(raw, max(0, at - 512), at)
    return head is not None and head.group(1).decode().startswith(TERMINOLOGY_PREFIXES)


def _clean_at_a_glance(output: Any, scanner: _Scanner, serialized: bytes | None = None) -> bool:
    """Most outputs are clean: one serialisation and C-level passes over the whole document prove it without
    walking it in Python. Any hit (or anything orjson cannot serialise) means: walk and check.

    Every string the walk checks is one JSON string of the document, delimited by '"' and with separators
    only JSON-escaped, so each token the walk sees in a string is a whole token of the document too (the
    document's tokens are a superset: keys and numbers included). With few sensitive tokens each is sought
    by a substring search; with many (multi-patient bundles) the document is tokenised once into a set and
    each is looked up, so the cost no longer grows with tokens x document size.

    ``serialized``: ``orjson.dumps(output)`` when the caller has it already. Exactly that text: the literal
    search relies on orjson's escaping (another serialiser may write ``\\/`` or ``\\u00e9``).
    """
    if serialized is not None:
        raw = serialized
    else:
        try:
            raw = orjson.dumps(output)
        except (TypeError, orjson.JSONEncodeError):
            return False
    escaped = raw
    if b"\\" in raw:
        # a JSON escape (\n, \t, \u0007...) is a separator inside the string; left alone, its letter would
        # glue onto the next token ("\n111222333" -> "n111222333") and hide it
        raw = _JSON_ESCAPE.sub(b" ", raw)
    # 9-digit runs are common (SNOMED codes); only one that passes the 11-proef needs a closer look. Digits
    # become "0", ASCII letters "a", all else " ": a " 000000000 " is then exactly a match of _NINE.
    marks = b" " + raw.translate(_DIGIT_MARKS) + b" "
    _suspicions(raw, marks, scanner)
    if scanner.split_bsn or scanner.phones:
        return False
    at = marks.find(b" 000000000 ")
    while at >= 0:
        if bsn_valid(raw[at : at + 9].decode()) and not _coding_code_at(raw, at):
            return False
        at = marks.find(b" 000000000 ", at + 10)
    sens = scanner.sens
    if sens is None:
        return True
    by_first = sens.by_first
    literals = [(u, True) for u in sens.patient_urls] + [(i, False) for i in sens.patient_ids]
    ascii_doc = raw.isascii()
    tokens: set[str] | None = None
    if len(by_first) + len(literals) > _PROBE_LIMIT:
        # Each distinct piece between two '"' once (keys, codes, references repeat): with the escapes gone
        # every '"' left delimits a string, so no token, and no sequence within one string, crosses one; the
        # window of _sequence_at may join unrelated pieces, which only errs towards the walk. (With few
        # values to seek, probing the whole document is cheaper than this.)
        raw = b" ".join(dict.fromkeys(raw.split(b'"')))
        text = raw.decode()
        low = text.casefold()
        # ASCII: [^\W_] is [A-Za-z0-9] and casefold() is lower(): a C-level translate + split tokenises
        tokens = set(raw.translate(_LOWER_RUNS).decode().split() if ascii_doc else _TOKEN.findall(low))
    else:
        text = raw.decode()
        low = text.casefold()
    # decided first: when another check sends the document to the walk, it looks only for these
    scanner.glued = _glued_values(text, sens.glued, low if ascii_doc else None)
    scanner.glued_decided = True
    if scanner.glued:
        return False
    if literals and _literal_found(escaped, literals, tokens if ascii_doc else None):
        return False
    # a birth date also written as an event's date (a group of many patients often has one) is a leak only
    # where the walk counts dates: decided last, so that it alone sends only its entries to the walk
    birth_date_seen = bool(sens.birth_dates) and _birth_date_seen(low, sens.birth_dates, tokens)
    # many patients' dates: filtered by the digit runs the document has (one pass instead of one per pattern:
    # a re-probe's 1,000-patient Bundle spent 0.4 s here)
    runs = _digit_runs(low) if len(sens.short_dates) > _FILTER_DATES_FROM else None
    if sens.short_dates and _short_date_in(low, sens.short_date_patterns(runs)):
        return False
    firsts = by_first if tokens is None else tokens.intersection(by_first)
    for first in firsts:
        candidates = by_first[first]
        if tokens is not None:
            candidates = [e for e in candidates if all(t in tokens for t in e[0][1:])]
            if not candidates:
                continue  # the rest of every sequence starting with it is absent from the whole document
            if any(len(seq) == 1 for seq, _ in candidates):
                return False
        elif first not in low:  # C substring search; most tokens never occur at all
            continue
        for m in re.finditer(re.escape(first) + r"(?![^\W_])", low):
            start = m.start()
            if (start == 0 or not low[start - 1].isalnum()) and _sequence_at(low, start, candidates):
                return False
    scanner.only_birth_dates = birth_date_seen
    return not birth_date_seen


_FILTER_DATES_FROM = 20
_DIGIT_RUNS = re.compile(r"[0-9]+")


def _digit_runs(text: str) -> set[str]:
    return set(_DIGIT_RUNS.findall(text))


def _birth_date_seen(low: str, by_year: Mapping[str, Collection[tuple[int, int]]], tokens: Any) -> bool:
    """Is a birth date written anywhere, in any notation? Each one is anchored on its year (one substring
    search; a year occurs a few times at most), whose neighbouring tokens are then compared."""
    for year, dates in by_year.items():
        if (tokens is not None and year not in tokens) or year not in low:
            continue
        at = low.find(year)
        while at >= 0:  # str.find, not a regex with a look-behind: that would try every position
            end = at + len(year)
            whole = (at == 0 or not low[at - 1].isalnum()) and (end == len(low) or not low[end].isalnum())
            if whole:
                # whole tokens however far: the walk joins a string's tokens across any separators (a
                # review's 40 spaces between "28 april" and "1934" hid the date here)
                before = _tokens_before(low, at, 2)
                after = [m.group(0) for m in itertools.islice(_TOKEN.finditer(low, end), 2)]
                if date_around([*before, year, *after], len(before), dates):
                    return True
            at = low.find(year, end)
    return False


def _tokens_before(low: str, at: int, count: int) -> list[str]:
    """The ``count`` whole tokens before position ``at`` (fewer at the start), however many separators
    stand between them."""
    found: list[str] = []
    i = at
    while len(found) < count:
        while i > 0 and not (low[i - 1].isalnum()):
            i -= 1
        end = i
        while i > 0 and low[i - 1].isalnum():
            i -= 1
        if i == end:
            break
        found.insert(0, low[i:end])
    return found


def _sequence_at(low: str, start: int, candidates: Any) -> bool:
    """Does a whole sensitive sequence start here? A kept PC4 ("3511") is the first token of the full
    postcode ("3511 ab") but not a leak by itself. The tokens are taken however far apart (the walk joins a
    string's tokens across any separators: a review's 520 spaces in a postcode hid it here); they may run
    across JSON strings ("3511","ab"), which only errs towards the exact walk."""
    longest = max(len(seq) for seq, _ in candidates)
    tokens = tuple(m.group(0) for m in itertools.islice(_TOKEN.finditer(low, start), longest))
    return any(len(seq) == 1 or tokens[: len(seq)] == seq for seq, _ in candidates)


def scan(
    output: Any, sensitive: SensitiveSet | None = None, *, serialized: bytes | None = None
) -> list[Finding]:
    """Findings (path, kind) in ``output``; empty when clean. Without ``sensitive`` (no original to compare
    with, e.g. at the registry) BSNs are sought, and the elements of a person that hold direct identifiers
    (``person_elements``). ``serialized``: exactly ``orjson.dumps(output)`` if the caller has it already."""
    root = output.get("resourceType", "Resource") if isinstance(output, dict) else "$"
    root = str(root) if isinstance(root, str) and root.isalpha() else "Resource"
    findings = person_elements(output, root)
    output, serialized, merged = folded(output, serialized)
    if merged:
        # two keys that fold alike ("text" and "ｔｅｘｔ"): the folded document lost one; the schema refuses
        # such keys at the gateway, so only a hand-made document gets here, and it is not passed
        findings.append(Finding(root, "folded-keys"))
    scanner = _Scanner(sensitive)
    if _clean_at_a_glance(output, scanner, serialized):
        return findings
    if scanner.only_birth_dates and root == "Bundle" and isinstance(output.get("entry"), list):
        _walk_where_birth_dates(output, scanner, root)
        return findings + scanner.findings
    if scanner.glued and not scanner.glued_decided and serialized is not None:
        # the document check stopped before it looked (not plain JSON: every glued value is sought)
        scanner.glued = glued_in_document(serialized, scanner.glued)
    scanner.value(output, "", {}, [root])
    return findings + scanner.findings


def _walk_where_birth_dates(bundle: dict[str, Any], scanner: _Scanner, root: str) -> None:
    """The walk, over only the entries (and the Bundle's own elements) whose text holds a patient's birth
    date. Every other check of the whole-document glance passed, and whatever the walk reports lies within
    one string, so the walk of an entry without a birth date in its text would report nothing: a group of
    many patients is then walked for its few dated entries, not whole."""
    assert scanner.sens is not None
    dates = scanner.sens.birth_dates
    own = {k: v for k, v in bundle.items() if k != "entry"}
    if _holds_birth_date(own, dates):
        scanner.value(own, "", {}, [root])
    entry_part = scanner.part("entry")
    for i, entry in enumerate(bundle["entry"]):
        if _holds_birth_date(entry, dates):
            scanner.value(entry, "entry", bundle, [root, entry_part, f"[{i}]"])


def _holds_birth_date(part: Any, dates: Mapping[str, Collection[tuple[int, int]]]) -> bool:
    raw = orjson.dumps(part)
    if b"\\" in raw:
        raw = _JSON_ESCAPE.sub(b" ", raw)
    return _birth_date_seen(raw.decode().casefold(), dates, None)


def folded(output: Any, serialized: bytes | None) -> tuple[Any, bytes | None, bool]:
    """The output as the gate compares it, with every string folded (``fold``), its serialisation, and
    whether folding made two keys of an object one (then one of them is gone)."""
    try:
        raw = serialized if serialized is not None else orjson.dumps(output)
    except (TypeError, orjson.JSONEncodeError):
        return output, None, False  # not plain JSON: walked as it is
    again = fold_document(raw)
    if again is None:
        return output, raw, False
    # '":' ends a key in orjson's text (a quote inside a string is escaped), so fewer of them: keys merged
    return again[0], again[1], again[1].count(b'":') != raw.count(b'":')


# Elements of a Patient, RelatedPerson or Person that hold direct identifiers: never in pseudonymised output
_PERSON_ELEMENTS = {"name": "name", "telecom": "telecom", "photo": "photo", "contact": "contact"}


def person_elements(doc: Any, root: str = "Bundle") -> list[Finding]:
    """Direct identifiers by structure, with nothing to compare against: a person resource (also inside
    ``contained``) with a name, telecom, photo, contact, an address with street lines or text, or an
    identifier that is not one of our pseudonyms. Finds them in raw exports too (``fhir-gateway scan``)."""
    found: list[Finding] = []
    entries = doc.get("entry") if isinstance(doc, dict) else None
    if isinstance(entries, list):
        for i, entry in enumerate(entries):
            res = entry.get("resource") if isinstance(entry, dict) else None
            _person_resource(res, f"{root}.entry[{i}].resource", found)
    else:
        _person_resource(doc, root, found)
    return found


def _person_resource(res: Any, path: str, found: list[Finding]) -> None:
    if not isinstance(res, dict):
        return
    for n, inner in enumerate(_list(res.get("contained"))):
        _person_resource(inner, f"{path}.contained[{n}]", found)
    if res.get("resourceType") not in PERSON_TYPES:
        return
    for key, kind in _PERSON_ELEMENTS.items():
        if res.get(key):
            found.append(Finding(f"{path}.{key}", kind))
    for n, addr in enumerate(_list(res.get("address"))):
        if isinstance(addr, dict) and (addr.get("line") or addr.get("text")):
            found.append(Finding(f"{path}.address[{n}]", "address"))
    for n, ident in enumerate(_list(res.get("identifier"))):
        if isinstance(ident, dict) and ident.get("value") and not _is_pseudonym(ident):
            found.append(Finding(f"{path}.identifier[{n}]", "identifier"))
