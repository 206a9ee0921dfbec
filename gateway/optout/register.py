"""The gateway's own objection register: HMAC digests of (provider, patient number), never the numbers.

The storage belongs to `gateway/store` (add / withdraw / lookup on hex digests); this module needs only the
small `ObjectionLookup` protocol. Digest: `HMAC-SHA-256(hash_key, "<provider>|<patient number>")` as
lower-case hex, the patient number trimmed of surrounding whitespace. The key is per deployment and kept
like the other source keys: without it a digest cannot be tested against guessed patient numbers.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from gateway.optout.base import Decision, PatientRef, Reason, visible

log = logging.getLogger(__name__)

PATIENT_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-/]{0,63}")
CSV_COLUMNS = ("patient_number", "patientnummer")
ALL_REGISTRIES = "*"


def objection_digest(hash_key: bytes, provider: str, patient_number: str) -> str:
    """Hex HMAC-SHA-256 of `provider|patient number`; stable across releases (tests pin a vector)."""
    if len(hash_key) < 16:
        raise ValueError("hash_key must be at least 16 bytes")
    if not provider or "|" in provider:
        raise ValueError("provider must be non-empty and must not contain '|'")
    number = patient_number.strip()
    if not number:
        raise ValueError("empty patient number")
    return hmac.new(hash_key, f"{provider}|{number}".encode(), hashlib.sha256).hexdigest()


class ObjectionLookup(Protocol):
    async def lookup(self, provider: str, registry: str, digest_hex: str) -> bool | None:
        """True: an objection is registered; False: none; None: the register cannot answer now."""
        ...


@dataclass
class InMemoryObjectionRegister:
    """For tests and demos. Objections are per (provider, registry); registry "*" means every registry."""

    objections: set[tuple[str, str, str]] = field(default_factory=set)
    available: bool = True  # set False to simulate an outage (lookup answers None)

    def add(self, provider: str, registry: str, digest_hex: str) -> None:
        self.objections.add((provider, registry, digest_hex))

    def withdraw(self, provider: str, registry: str, digest_hex: str) -> None:
        self.objections.discard((provider, registry, digest_hex))

    async def lookup(self, provider: str, registry: str, digest_hex: str) -> bool | None:
        if not self.available:
            return None
        return any((provider, r, digest_hex) in self.objections for r in (registry, ALL_REGISTRIES))


class RegisterOptOut:
    """Opt-out source over the objection register, keyed by the patient's number at the provider (MRN)."""

    def __init__(self, store_lookup: ObjectionLookup | Callable, hash_key: bytes) -> None:
        # Accept the protocol object or a bare async callable with the same signature.
        self._lookup = getattr(store_lookup, "lookup", store_lookup)
        objection_digest(hash_key, "check", "key")  # validate the key once, at construction
        self._hash_key = hash_key

    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        return {p.key: await self._check_one(p) for p in patients}

    async def _check_one(self, patient: PatientRef) -> Decision:
        if not patient.mrn or not patient.mrn.strip():
            # Without the patient number the register cannot be asked: fail closed.
            return Decision("unknown", Reason.NO_PATIENT_NUMBER)
        answers = []
        for number in _spellings((patient.mrn, *patient.other_mrns)):  # any of their numbers holds
            try:
                digest = objection_digest(self._hash_key, patient.provider, number)
                answers.append(await self._lookup(patient.provider, patient.registry, digest))
            except Exception as exc:  # any store failure means "cannot answer"
                log.warning("objection register lookup failed (%s)", type(exc).__name__)
                answers.append(None)
        if any(answers):
            return Decision("objected", Reason.REGISTER_OBJECTION)
        if None in answers:
            return Decision("unknown", Reason.REGISTER_UNAVAILABLE)
        return Decision("allowed", Reason.REGISTER_NO_OBJECTION)


def registered_form(patient_number: str) -> str:
    """How a number is registered: upper-cased, so that a record numbered in any case finds it (a lookup
    asks each number as given, upper- and lower-cased: objections registered before are found too), and
    without invisible characters (a zero-width space copied along with a number: a probe's was delivered)."""
    return visible(patient_number).upper()


def stored_forms(patient_number: str) -> list[str]:
    """The forms an objection for this number may be stored under: as registered now, and as given (how
    objections were registered before numbers were upper-cased)."""
    return list(dict.fromkeys((registered_form(patient_number), patient_number.strip())))


def _spellings(numbers: Sequence[str]) -> list[str]:
    """Each number as given and without invisible characters, upper- and lower-cased: an objection registered
    as P0001234 holds for a record numbered p0001234 (a probe delivered it). Numbers of digits only are asked
    once."""
    forms = (form for n in numbers for form in (n, visible(n)))
    return list(dict.fromkeys(v for form in forms for v in (form, form.upper(), form.lower())))


class ObjectionCsvError(ValueError):
    """A bad row: names the line number and what is wrong, never the row's content."""

    def __init__(self, line_no: int, problem: str) -> None:
        super().__init__(f"objection CSV line {line_no}: {problem}")
        self.line_no = line_no
        self.problem = problem


def read_objection_csv(
    path: str | Path, *, on_error: Callable[[ObjectionCsvError], None] | None = None
) -> Iterator[str]:
    """Yield patient numbers from a provider's objection list.

    Format: UTF-8 (a BOM is fine), delimiter `,` or `;` (detected from the header), a header row with a
    column `patient_number` (or `patientnummer`); other columns (date, registry, remarks) are ignored. Blank
    lines and lines starting with `#` are skipped. A patient number is 1-64 characters: letters, digits and
    `.-/`, starting with a letter or digit, surrounding spaces trimmed. A bad row raises ObjectionCsvError
    (line number + problem), or is passed to `on_error` and skipped when given.
    """
    with Path(path).open("rb") as handle:
        lines = _numbered_lines(handle)
        header_line = next(lines, None)
        if header_line is None:
            raise ObjectionCsvError(1, "empty file (a header row is required)")
        line_no, header_text = header_line
        delimiter = ";" if header_text.count(";") > header_text.count(",") else ","
        header = [h.strip().lower() for h in next(csv.reader([header_text], delimiter=delimiter))]
        column = next((header.index(c) for c in CSV_COLUMNS if c in header), None)
        if column is None:
            raise ObjectionCsvError(line_no, "header has no patient_number column")
        for line_no, text in lines:
            try:
                yield _patient_number(line_no, text, delimiter, column, len(header))
            except ObjectionCsvError as err:
                if on_error is None:
                    raise
                on_error(err)


def _numbered_lines(handle: BinaryIO) -> Iterator[tuple[int, str]]:
    """Lines decoded one by one, so that a byte that is not UTF-8 is reported on its own line (the
    decoder's message quotes bytes of the file: only where is said)."""
    for line_no, raw in enumerate(handle, 1):
        try:
            text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ObjectionCsvError(line_no, "not valid UTF-8 (export the list as UTF-8)") from None
        stripped = text.rstrip("\r\n")
        if stripped.strip() and not stripped.lstrip().startswith("#"):
            yield line_no, stripped


def _patient_number(line_no: int, text: str, delimiter: str, column: int, width: int) -> str:
    try:
        row = next(csv.reader([text], delimiter=delimiter, strict=True))
    except csv.Error:
        raise ObjectionCsvError(line_no, "malformed CSV row") from None
    if len(row) != width:
        raise ObjectionCsvError(line_no, f"expected {width} columns, found {len(row)}")
    number = row[column].strip()
    if not number:
        raise ObjectionCsvError(line_no, "empty patient number")
    if not PATIENT_NUMBER.fullmatch(number):
        raise ObjectionCsvError(line_no, "patient number has invalid characters or is longer than 64")
    return number
