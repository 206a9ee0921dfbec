"""Bytes → dict for FHIR JSON, at the speed of orjson, with every limit checked and no input echoed.

Decisions (see also the table in `gateway/pipeline/__init__.py`):

- Encoding: UTF-8 only (FHIR JSON is UTF-8). A leading UTF-8 BOM is *stripped and accepted*: RFC 8259 §8.1
  allows a parser to ignore it, it carries no data, and some EHR stacks (.NET) emit it. UTF-16/UTF-32 (by BOM
  or by the NUL-byte pattern of the first bytes) → 415 `not-supported`; any other invalid UTF-8 (Latin-1,
  CP-1252, lone surrogates) → 400 `structure` with the byte offset.
- Depth: orjson.loads refuses more than 1024 levels by itself (in C: 10,000 levels end as a clean 400, no
  RecursionError). max_depth (default 100, so that later Python code can never hit the recursion limit) is
  enforced by orjson.dumps, which stops at a fixed depth (254): the parsed value wrapped in
  `254 - max_depth` one-item lists fails to serialise exactly when it is deeper than max_depth. That dump is
  the one the duplicate-key check needs anyway, so the depth check costs nothing extra.
- Duplicate keys (FHIR forbids them; orjson silently keeps the last one): detected by comparing the number of
  object keys in the text with the number in the parsed tree, both counted in C (`bytes.count` over the
  re-serialised tree and in the body: colons). Only when they differ does the exact stdlib pass run, to
  confirm and name the duplicated property. Costs about one `orjson.dumps` of the body.
- Numbers: orjson rejects literals that overflow a double (`1e400`) and turns integers outside the 64-bit
  range into lossy floats; a C-speed pre-filter (a float >= 1e18 in the re-serialised tree) triggers an
  exact stdlib check, and such integers are rejected (400 `value`): forwarding a silently changed number is
  worse than refusing it.
  Known limitation (not detected): orjson parses every FHIR decimal as a double, so re-serialising changes
  its lexical form: `80.10` → `80.1`, `1e2` → `100.0`, more than 17 significant digits are rounded.

Nothing in an error names a value from the body: only byte offsets, fixed texts and (for duplicate keys) the
property name when it looks like a FHIR element name.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from gateway.outcome import FhirError

UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
_WHITESPACE = b" \t\r\n"
# A property name may be named in an error only if it is structure, not data: an element name of FHIR (R4B,
# R5, STU3, a few DSTU2; any case, so the typo `birthdate` is named). Any other word ("zyxwortel", or
# "vanDijk": a surname with its prefix) or anything with digits ("bsn999911120") is shown as `?`. An optional
# leading "_" is a primitive's extension.
_ELEMENT_NAMES_FILE = Path(__file__).resolve().parent.parent / "data" / "fhir-element-names.txt"
# orjson turns an integer literal outside the 64-bit range into a float of magnitude >= 9.2e18, which it
# serialises with an exponent (`-9.223372036854776e+18`). The regex has a literal prefix, so it runs as a
# fast substring search; base64 or media types containing "e+" do not match the digits after it.
_BIG_FLOAT = re.compile(rb"e\+(?:1[89]|[2-9][0-9]|[0-9]{3})")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def _nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = [value]
    return value


def _measure_dumps_depth_limit() -> int:
    """orjson.dumps' fixed nesting limit (254 so far), measured at import rather than assumed."""
    lo, hi = 1, 4096
    while lo < hi:  # largest depth that still serialises
        mid = (lo + hi + 1) // 2
        try:
            orjson.dumps(_nested(mid))
            lo = mid
        except orjson.JSONEncodeError:
            hi = mid - 1
    return lo


DUMPS_DEPTH_LIMIT = _measure_dumps_depth_limit()
ORJSON_LOADS_DEPTH_LIMIT = 1024  # orjson.loads refuses deeper documents itself ("depth limit exceeded")


def safe_name(name: object) -> str | None:
    """The property name if it may appear in an error text (it is structure, see above), else None."""
    if not isinstance(name, str) or len(name) > 65:
        return None
    # only FHIR's own names: camelCase text may be data too (`vanDijk`, `deVries`: a surname with its prefix)
    if name.lstrip("_").lower() in _fhir_element_names():
        return name
    return None


@functools.cache
def fhir_element_names() -> tuple[str, ...]:
    """As written (`valueCodeableConcept`); see gateway/data/README.md (gateway.data._gen_element_names)."""
    return tuple(_ELEMENT_NAMES_FILE.read_text(encoding="utf-8").split())


@functools.cache
def _fhir_element_names() -> frozenset[str]:
    return frozenset(name.lower() for name in fhir_element_names())


def parse_json(
    body: bytes, *, max_bytes: int, max_depth: int = 100, check_duplicates: bool = True, resource: bool = True
) -> dict:
    """Parse one FHIR JSON resource (`resource=False`: any JSON object, e.g. an objection, read as strictly).
    Raises FhirError (4xx OperationOutcome) on anything unacceptable."""
    if len(body) > max_bytes:
        raise FhirError.single(413, "too-costly", f"request body exceeds the limit of {max_bytes} bytes")
    if not body.strip(_WHITESPACE):
        raise FhirError.single(400, "required", "request body is empty")
    if not 1 <= max_depth <= DUMPS_DEPTH_LIMIT:
        raise ValueError("max_depth must be between 1 and orjson's serialisation depth limit")
    start = check_encoding_prefix(body)
    value = _loads(body, start, max_depth)  # orjson itself refuses more than 1024 levels, in C
    if not isinstance(value, dict):
        raise FhirError.single(400, "structure", "the JSON document must be an object (a FHIR resource)")
    # Every level of nesting opens with a `{` or `[` in the text (brackets inside strings only raise this
    # bound), so a body with few brackets (an NDJSON line) cannot be too deep: two C-level counts.
    dumped = _dumps_within_depth(value, max_depth, body.count(b"{") + body.count(b"["))
    if check_duplicates:
        _check_duplicate_keys(body, start, value, dumped)
    if _BIG_FLOAT.search(dumped):  # C-speed pre-filter over the serialised tree
        _check_integer_range(body, start)
    # orjson writes a tab, line feed or carriage return as \t \n \r and any other control character as
    # \b, \f or \u00XX (a written backslash before a b or f matches too: the walk decides). Most bundles
    # hold no backslash at all: a memchr; three `in` searches cost a quarter of parse_json (measured).
    if b"\\" in dumped and _ESCAPED_CONTROL.search(dumped):
        _check_control_characters(value)
    return _check_resource_type(value) if resource else value


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_ESCAPED_CONTROL = re.compile(rb"\\(?:u00|[bf])")


def _check_control_characters(value: dict) -> None:
    """FHIR strings hold no control characters but tab, line feed and carriage return (R4 datatypes: a
    NUL in a code reached the registry, which may refuse the whole Bundle). Names where, never what."""
    stack: list[tuple[Any, str]] = [(value, str(value.get("resourceType") or "$"))]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if _CONTROL.search(node):
                text = "a string holds a control character (only tab, line feed and carriage return may)"
                raise FhirError.single(400, "invalid", text, where)
        elif isinstance(node, dict):
            for key, item in node.items():
                name = safe_name(key) if not _CONTROL.search(key) else None
                stack.append((item, f"{where}.{name or '?'}"))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{n}]") for n, item in enumerate(node))


_GZIP = b"\x1f\x8b"


def check_encoding_prefix(body: bytes) -> int:
    """Return the offset where the JSON text starts (after a UTF-8 BOM); reject UTF-16/32 up front."""
    if body.startswith(UTF8_BOM):
        return len(UTF8_BOM)
    if body.startswith(_GZIP):
        raise FhirError.single(
            415, "not-supported", "body is gzip-compressed; send it uncompressed (no Content-Encoding)"
        )
    # JSON text starts with an ASCII character, so NUL bytes among the first four mean UTF-16/UTF-32.
    if body.startswith(_UTF16_32_BOMS) or b"\x00" in body[:4]:
        raise FhirError.single(415, "not-supported", "body is not UTF-8 (UTF-16/UTF-32 detected); send UTF-8")
    return 0


def _loads(body: bytes, start: int, max_depth: int) -> Any:
    error: tuple[str, int] | None = None
    try:
        return orjson.loads(memoryview(body)[start:] if start else body)
    except orjson.JSONDecodeError as exc:
        # Keep only the message kind and position: the exception carries the whole document and must not
        # be chained into the FhirError (tracebacks, logs).
        error = (exc.msg, exc.pos)
    raise _decode_error(body, error[0], error[1], start, max_depth)


def _dumps_within_depth(value: dict, max_depth: int, depth_bound: int | None = None) -> bytes:
    """Serialise `value` (needed anyway for the duplicate check) and enforce max_depth on the way:
    orjson.dumps stops at a fixed depth, so `DUMPS_DEPTH_LIMIT - max_depth` one-item lists around the value
    make it stop at max_depth. All in C, no recursion in Python; the padding adds no colons, so the output
    needs no stripping for the colon count. `depth_bound` (the body's bracket count) at most max_depth: the
    value cannot be too deep, and the padding (~2 us per dump, the cost of a small NDJSON line) is skipped."""
    wrapped: Any = value
    if depth_bound is None or depth_bound > max_depth:
        for _ in range(DUMPS_DEPTH_LIMIT - max_depth):
            wrapped = [wrapped]
    try:
        return orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        pass
    raise FhirError.single(400, "too-costly", f"JSON nesting deeper than {max_depth} levels")


def _decode_error(body: bytes, msg: str, char_pos: int, start: int, max_depth: int) -> FhirError:
    text = body[start:]
    size = len(body)
    if "UTF-8" in msg or "surrogate" in msg:
        try:
            text.decode("utf-8")
            offset = _byte_offset(text, char_pos) + start
        except UnicodeDecodeError as exc:
            offset = exc.start + start
            return FhirError.single(400, "structure", f"body is not valid UTF-8 (byte offset {offset})")
        # valid UTF-8, so a \ud800-style escape of half a character (JSON allows none alone)
        text = f"a string escapes a lone surrogate (\\uD800-\\uDFFF), no character (byte offset {offset})"
        return FhirError.single(400, "structure", text)
    offset = min(size, _byte_offset(text, char_pos) + start)
    if "depth" in msg:
        text = f"JSON nesting deeper than {max_depth} levels (byte offset {offset})"
        return FhirError.single(400, "too-costly", text)
    if "infinity" in msg:  # a literal beyond the double range (1e400, 400 digits)
        return FhirError.single(400, "value", f"number out of range (byte offset {offset})")
    if offset >= size:
        return FhirError.single(
            400, "structure", f"JSON ends unexpectedly; body truncated? (byte offset {offset})"
        )
    return FhirError.single(400, "structure", f"malformed JSON (byte offset {offset})")


def _byte_offset(data: bytes, char_pos: int) -> int:
    """orjson reports positions in characters; convert to bytes (error path only)."""
    return len(data.decode("utf-8", "surrogateescape")[:char_pos].encode("utf-8", "surrogateescape"))


def _check_duplicate_keys(body: bytes, start: int, value: dict, dumped: bytes) -> None:
    # Every object key is followed by one `:` in the text. orjson drops the earlier of two duplicate keys
    # (with its value), so the re-serialised tree then has fewer colons than the body. String contents
    # contribute the same colons to both sides unless the body spells one as `\u003a`: then (and when the
    # counts differ) the exact, slower stdlib pass decides. Two single-byte counts run at ~2.5 GB/s.
    if dumped.count(b":") == body.count(b":", start) and not _escaped_colon(body, start):
        return
    name = _find_duplicate_key(body[start:])
    if name is None:
        return
    shown = safe_name(name)
    where = f" '{shown}'" if shown else ""
    raise FhirError.single(
        400, "structure", f"duplicate JSON property{where} in an object (FHIR forbids them)"
    )


def _escaped_colon(body: bytes, start: int) -> bool:
    """Whether the body spells a colon as `\\u003a`. Other `\\u003x` escapes (.NET writes `<` as `\\u003C`)
    do not matter and must not send every such body down the slow path."""
    pos = body.find(b"\\u003", start)
    while pos >= 0:
        if body[pos + 5 : pos + 6] in (b"a", b"A"):
            return True
        pos = body.find(b"\\u003", pos + 5)
    return False


def _find_duplicate_key(text: bytes) -> str | None:
    """The exact (slower) check, run only when the fast count disagrees."""
    found: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs) and not found:
            seen: set[str] = set()
            found.extend(k for k, _ in pairs if k in seen or seen.add(k))
        return result

    try:
        json.loads(text, object_pairs_hook=pairs_hook)  # depth already bounded: no RecursionError
    except ValueError:
        # orjson accepted the text, so this cannot happen for valid JSON; never let the stdlib error (which
        # carries the document) escape.
        return None
    return found[0] if found else None


class _OutOfRange(Exception):
    """Raised from the stdlib parser's int hook; carries no value."""


def _check_integer_range(body: bytes, start: int) -> None:
    def parse_int(literal: str) -> int:
        number = int(literal)
        if not _INT64_MIN <= number <= _UINT64_MAX:
            raise _OutOfRange
        return number

    out_of_range = False
    try:
        json.loads(body[start:], parse_int=parse_int)
    except _OutOfRange:
        out_of_range = True
    except ValueError:
        return  # see _find_duplicate_key
    if out_of_range:
        raise FhirError.single(400, "value", "integer outside the 64-bit range (would lose precision)")


def _check_resource_type(value: dict) -> dict:
    rtype = value.get("resourceType")
    if rtype is None:
        raise FhirError.single(400, "required", "missing resourceType", "resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError.single(400, "structure", "resourceType must be a non-empty string", "resourceType")
    return value


# --- NDJSON (bulk export) ---------------------------------------------------------------------------------


def iter_ndjson(
    stream: BinaryIO | Iterable[bytes],
    *,
    max_line_bytes: int,
    max_depth: int = 100,
    chunk_size: int = 1 << 16,
) -> Iterator[tuple[int, dict | FhirError]]:
    """Yield `(line_no, resource | FhirError)` per non-blank line; memory stays below ~2 × max_line_bytes.

    `stream` is a binary file object or any iterable of byte chunks (e.g. an HTTP response body). A bad line
    is reported and skipped; it never stops the stream. Lines are numbered from 1, blank lines included.
    """
    for line_no, line in _lines(_chunks(stream, chunk_size), max_line_bytes):
        if line is None:
            yield line_no, FhirError.single(413, "too-costly", f"NDJSON line exceeds {max_line_bytes} bytes")
            continue
        if not line.strip(_WHITESPACE):
            continue
        try:
            yield line_no, parse_json(line, max_bytes=max_line_bytes, max_depth=max_depth)
        except FhirError as err:
            yield line_no, err


def _chunks(stream: BinaryIO | Iterable[bytes], chunk_size: int) -> Iterator[bytes]:
    read = getattr(stream, "read", None)
    if read is None:
        yield from stream  # type: ignore[misc]
        return
    while chunk := read(chunk_size):
        yield chunk


def _lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Split on LF (dropping a CR before it); an over-long line yields None and is skipped to its end."""
    buffer = bytearray()
    line_no = 0
    skipping = False
    for chunk in chunks:
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line_no += 1
            if skipping:
                skipping = False
            else:
                yield line_no, _line(buffer[:newline], max_line_bytes)
            del buffer[: newline + 1]
        if len(buffer) > max_line_bytes + 1:
            # The current line is already too long: report it once and discard its bytes as they arrive.
            if not skipping:
                yield line_no + 1, None
                skipping = True
            buffer.clear()
    if buffer and not skipping:
        yield line_no + 1, _line(buffer, max_line_bytes)


def _line(raw: bytearray, max_line_bytes: int) -> bytes | None:
    line = bytes(raw[:-1] if raw.endswith(b"\r") else raw)
    return None if len(line) > max_line_bytes else line
