"""parse_json and iter_ndjson: every limit, clean 4xx FhirErrors, no input echoed, no exception chaining."""

from __future__ import annotations

import io
import json
import traceback
from pathlib import Path

import pytest

from gateway.outcome import FhirError
from gateway.pipeline.parse import DUMPS_DEPTH_LIMIT, iter_ndjson, parse_json

CORPUS = Path("/work/shared/corpus")
SECRET = "Vermeulen-Oosterhuis"
PATIENT = (
    f'{{"resourceType": "Patient", "name": [{{"family": "{SECRET}"}}], "birthDate": "1961-07-23"}}'.encode()
)


def rejected(body: bytes, **kw) -> FhirError:
    with pytest.raises(FhirError) as info:
        parse_json(body, max_bytes=kw.pop("max_bytes", 1 << 20), **kw)
    err = info.value
    assert 400 <= err.status < 500
    rendered = json.dumps(err.outcome()) + str(err)
    assert SECRET not in rendered and "1961-07-23" not in rendered
    # The FhirError must not drag the parser's exception (which holds the document) along.
    assert err.__cause__ is None
    assert err.__context__ is None or not str(err.__context__)
    assert SECRET not in "".join(traceback.format_exception(err))
    return err


def code_of(err: FhirError) -> str:
    return err.issues[0].code


def test_valid_resource() -> None:
    assert parse_json(PATIENT, max_bytes=1000)["name"][0]["family"] == SECRET


def test_corpus_files_parse() -> None:
    for path in CORPUS.rglob("*.json"):
        assert parse_json(path.read_bytes(), max_bytes=10 << 20)["resourceType"]


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n\t"])
def test_empty(body: bytes) -> None:
    err = rejected(body)
    assert (err.status, code_of(err)) == (400, "required")


def test_over_size_is_413_before_parsing() -> None:
    err = rejected(b"{" * 2000, max_bytes=1000)  # malformed too, but the size decides first
    assert (err.status, code_of(err)) == (413, "too-costly")
    assert parse_json(PATIENT, max_bytes=len(PATIENT))


def test_utf8_bom_is_stripped() -> None:
    assert parse_json(b"\xef\xbb\xbf" + PATIENT, max_bytes=1000)["resourceType"] == "Patient"


def test_double_bom_is_malformed() -> None:
    err = rejected(b"\xef\xbb\xbf\xef\xbb\xbf" + PATIENT)
    assert (err.status, code_of(err)) == (400, "structure")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_utf16_utf32_are_415(encoding: str) -> None:
    err = rejected(PATIENT.decode().encode(encoding))
    assert (err.status, code_of(err)) == (415, "not-supported")


def test_a_compressed_body_and_a_lone_surrogate_are_named_for_what_they_are() -> None:
    """A probe: a gzip body without Content-Encoding was "not UTF-8 (UTF-16/UTF-32 detected)", and a
    `\\ud800` escape in valid UTF-8 "not valid UTF-8": neither says what to fix."""
    import gzip

    err = rejected(gzip.compress(PATIENT))
    assert err.status == 415 and "gzip" in err.issues[0].diagnostics
    body = PATIENT.replace(b'"Patient"', b'"Patient", "x": "\\ud800"')
    err = rejected(body)
    assert err.status == 400 and "surrogate" in err.issues[0].diagnostics
    assert "not valid UTF-8" not in err.issues[0].diagnostics


def test_latin1_reports_byte_offset_not_content() -> None:
    body = PATIENT.decode().replace("Oosterhuis", "Oosterhüis").encode("latin-1")
    err = rejected(body)
    assert (err.status, code_of(err)) == (400, "structure")
    offset = body.index("ü".encode("latin-1"))
    assert f"byte offset {offset}" in err.issues[0].diagnostics


def test_malformed_reports_byte_offset_in_bytes() -> None:
    body = '{"resourceType": "Patient", "name": [{"family": "Ëëëëë" x}]}'.encode()
    err = rejected(body)
    assert f"byte offset {body.index(b' x') + 1}" in err.issues[0].diagnostics


def test_truncated_says_so() -> None:
    err = rejected(PATIENT[:-10])
    assert (err.status, code_of(err)) == (400, "structure")
    assert "truncated" in err.issues[0].diagnostics


@pytest.mark.parametrize(
    "body",
    [
        PATIENT + b"x",
        PATIENT + PATIENT,
        b'{"resourceType": "Patient"}],[{"resourceType": "Patient"}',
        b'{"resourceType": "Patient", "a": NaN}',
        b"{'resourceType': 'Patient'}",
        b'{"resourceType": "Patient", "a": "\\ud800"}',
        b'{"resourceType": "Patient", "a": "x\x01"}',
    ],
)
def test_malformed_json(body: bytes) -> None:
    assert (rejected(body).status, code_of(rejected(body))) == (400, "structure")


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    inner = depth - 1  # the outer object counts as one level
    return b'{"resourceType": "Bundle", "x": ' + open_ * inner + close * inner + b"}"


def test_depth_limit_is_exact() -> None:
    assert parse_json(nested(100), max_bytes=1 << 20, max_depth=100)
    err = rejected(nested(101), max_depth=100)
    assert (err.status, code_of(err)) == (400, "too-costly")
    assert parse_json(nested(20), max_bytes=1 << 20, max_depth=20)
    assert rejected(nested(21), max_depth=20).status == 400


@pytest.mark.parametrize("depth", [1025, 10_000, 100_000])
def test_very_deep_nesting_is_a_clean_400(depth: int) -> None:
    for body in (nested(depth), nested(depth, b'{"a":', b"}").replace(b'{"a":}', b'{"a":1}')):
        err = rejected(body)
        assert (err.status, code_of(err)) == (400, "too-costly")


def test_max_depth_must_fit_orjson() -> None:
    with pytest.raises(ValueError):
        parse_json(PATIENT, max_bytes=1000, max_depth=DUMPS_DEPTH_LIMIT + 1)


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "Patient", "gender": "male", "gender": "female"}',
        b'{"resourceType": "Patient", "resourceType": "Bundle"}',
        b'{"resourceType": "Patient", "name": [{"family": "a", "family": "b"}]}',
        b'{"resourceType": "Patient", "gender": "male", "gen\\u0064er": "male"}',
        b'{"resourceType": "Patient", "a": 1, "a": 2, "s": "\\u003a"}',
    ],
)
def test_duplicate_keys(body: bytes) -> None:
    err = rejected(body)
    assert (err.status, code_of(err)) == (400, "structure")
    assert "duplicate" in err.issues[0].diagnostics


def test_duplicate_key_name_not_echoed_unless_element_like() -> None:
    err = rejected(b'{"resourceType": "Patient", "Jansen": 1, "Jansen": 2}')
    assert "Jansen" not in json.dumps(err.outcome())


def test_duplicate_check_can_be_disabled() -> None:
    body = b'{"resourceType": "Patient", "gender": "male", "gender": "female"}'
    assert parse_json(body, max_bytes=1000, check_duplicates=False)["gender"] == "female"


def test_colons_in_strings_and_whitespace_are_not_duplicates() -> None:
    body = b'{ "resourceType" : "Observation" ,\n "effectiveDateTime" :"2026-01-02T10:00:00+01:00",'
    body += b' "note": [{"text": "a \\" : b \\\\ : \\u00e9 http://x"}] }'
    assert parse_json(body, max_bytes=1000)["resourceType"] == "Observation"


@pytest.mark.parametrize(
    "literal", [b"1e400", b"-1e400", b"18446744073709551616", b"-9223372036854775809", b"9" * 400]
)
def test_numbers_out_of_range(literal: bytes) -> None:
    err = rejected(b'{"resourceType": "Observation", "v": ' + literal + b"}")
    assert (err.status, code_of(err)) == (400, "value")


def test_numbers_in_range_and_long_digit_strings() -> None:
    body = b'{"resourceType": "Observation", "a": 18446744073709551615, "b": -9223372036854775808,'
    body += b' "c": "12345678901234567890123", "d": 0.1}'
    parsed = parse_json(body, max_bytes=1000)
    assert parsed["a"] == 2**64 - 1 and parsed["b"] == -(2**63) and parsed["c"].startswith("1234")


@pytest.mark.parametrize("body", [b"[]", b"[{}]", b'"Patient"', b"42", b"null", b"true"])
def test_top_level_must_be_object(body: bytes) -> None:
    err = rejected(body)
    assert (err.status, code_of(err)) == (400, "structure")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"id": "x"}', "required"),
        (b'{"resourceType": null}', "required"),
        (b'{"resourceType": 1}', "structure"),
        (b'{"resourceType": ""}', "structure"),
        (b'{"resourceType": ["Patient"]}', "structure"),
    ],
)
def test_resource_type(body: bytes, code: str) -> None:
    err = rejected(body)
    assert (err.status, code_of(err), err.issues[0].expression) == (400, code, ("resourceType",))


def test_slow_paths_stay_off_for_ordinary_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact stdlib passes (2-3x slower than orjson) run only when the C-speed pre-checks hit."""
    import gateway.pipeline.parse as parse_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(parse_module, "_find_duplicate_key", must_not_run)
    monkeypatch.setattr(parse_module, "_check_integer_range", must_not_run)
    for path in [*CORPUS.rglob("*.json")]:
        parse_json(path.read_bytes(), max_bytes=10 << 20)
    dotnet_style = (
        b'{"resourceType": "Patient", "text": {"status": "generated", "div": "\\u003Cdiv xmlns=\\u0022'
    )
    dotnet_style += b'http://www.w3.org/1999/xhtml\\u0022\\u003EJansen\\u003C/div\\u003E"}}'
    assert parse_json(dotnet_style, max_bytes=1000)["text"]["div"].startswith("<div")
    with pytest.raises(AssertionError):
        parse_json(b'{"resourceType": "Patient", "a": 1, "a": 2}', max_bytes=100)


# --- NDJSON ----------------------------------------------------------------------------------------


def test_ndjson_corpus_file() -> None:
    path = CORPUS / "ndjson/sample-bulk-10-patients/Condition.000.ndjson"
    with path.open("rb") as handle:
        items = list(iter_ndjson(handle, max_line_bytes=1 << 20))
    assert len(items) == 555
    assert all(isinstance(r, dict) and r["resourceType"] == "Condition" for _, r in items)
    assert [n for n, _ in items] == list(range(1, 556))


def test_ndjson_bad_lines_are_reported_and_skipped() -> None:
    lines = [
        PATIENT,
        b"",
        b"{not json " + SECRET.encode(),
        b"x" * 500,
        PATIENT + b"\r",
        b"   ",
        b"[1]",
        PATIENT,
    ]
    stream = io.BytesIO(b"\n".join(lines))
    items = list(iter_ndjson(stream, max_line_bytes=200, chunk_size=7))
    kinds = [(n, r.status if isinstance(r, FhirError) else r["resourceType"]) for n, r in items]
    assert kinds == [(1, "Patient"), (3, 400), (4, 413), (5, "Patient"), (7, 400), (8, "Patient")]
    assert all(SECRET not in str(r) for _, r in items if isinstance(r, FhirError))


def test_ndjson_over_long_line_memory_is_bounded() -> None:
    """A 50 MB line arriving in chunks is skipped without being held in memory."""
    seen_chunks = 0

    def chunks():
        nonlocal seen_chunks
        yield PATIENT + b"\n"
        for _ in range(800):
            seen_chunks += 1
            yield b"y" * 65536
        yield b"\n" + PATIENT

    import tracemalloc

    tracemalloc.start()
    items = list(iter_ndjson(chunks(), max_line_bytes=10_000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen_chunks == 800
    assert [(n, isinstance(r, FhirError)) for n, r in items] == [(1, False), (2, True), (3, False)]
    assert peak < 2_000_000


def test_ndjson_last_line_without_newline_and_iterable_input() -> None:
    items = list(iter_ndjson([PATIENT[:10], PATIENT[10:] + b"\n" + PATIENT], max_line_bytes=1000))
    assert [n for n, _ in items] == [1, 2]


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        (r"8867\u00004", True),  # a NUL in a code reached the registry (a probe)
        (r"bell\u0007", True),
        (r"form\ffeed", True),
        (r"back\bspace", True),
        (r"tab\tline\ncarriage\r", False),
        (r"C:\\bin\\fhir", False),  # a written backslash before b or f is no control character
    ],
)
def test_control_characters_in_strings_are_refused_by_path(text: str, refused: bool) -> None:
    body = b'{"resourceType":"Observation","status":"final","note":[{"text":"' + text.encode() + b'"}]}'
    if not refused:
        assert parse_json(body, max_bytes=10_000)["note"][0]["text"]
        return
    with pytest.raises(FhirError) as err:
        parse_json(body, max_bytes=10_000)
    assert err.value.status == 400
    assert err.value.outcome()["issue"][0]["expression"] == ["Observation.note[0].text"]
