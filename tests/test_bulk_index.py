"""Pass 1 (gateway/bulk/index.py): the index built by worker processes over byte ranges of the files is the
index a single sequential scan builds (same rows, ids, line numbers, owners, groups)."""

from __future__ import annotations

import bisect
import contextlib
import pickle
import sqlite3
from pathlib import Path

import orjson
import pytest

from gateway.bulk import index as ix
from gateway.bulk.synth import SynthSpec, patient_id, write_export

MAX_LINE = 2_000
KW = {"group_size": 7, "max_group_resources": 300, "max_line_bytes": MAX_LINE}


def _note(rtype: str, size: int, fill: bytes = b"x") -> bytes:
    """A line of exactly `size` bytes (before its line break)."""
    head, tail = b'{"resourceType":"' + rtype.encode() + b'","note":"', b'"}'
    return head + fill * (size - len(head) - len(tail)) + tail


def _append(path: Path, lines: list[bytes]) -> list[int]:
    """Append `lines` (each with its own line break, if any); their line numbers."""
    first = path.read_bytes().count(b"\n") + 1
    with path.open("ab") as f:
        f.write(b"".join(lines))
    return list(range(first, first + len(lines)))


_UUID = "3f2b6c1e-9a4d-4c2b-8e1f-0a1b2c3d4e5f"


def _export(folder: Path) -> tuple[list[ix.SourceFile], dict[str, int]]:
    """A synthetic export with invalid, over-long and blank lines; the line numbers of the odd ones."""
    spec = SynthSpec(patients=60, invalid_lines={"Observation": [3, 17], "Encounter": [1]}, orphans=4)
    write_export(folder, spec)
    obs = {"resourceType": "Observation", "status": "final"}
    subject = {"subject": {"reference": f"Patient/{patient_id(1)}"}}
    two = {
        "subject": {"reference": f"Patient/{patient_id(2)}"},
        "focus": [{"reference": "Patient/pat0000004"}],
    }
    absent = {"reference": "Patient/nobody"}
    not_a_uuid = {"reference": f"urn:uuid:{patient_id(5)}"}
    lines = {
        "blank": b"\n",
        "spaces": b"   \n",
        "crlf-blank": b"\r\n",
        "long": _note("Observation", 3 * MAX_LINE) + b"\n",  # read in bounded pieces, never whole
        "after-long": orjson.dumps(obs | {"id": "after"} | subject) + b"\n",
        "long-crlf": _note("Observation", MAX_LINE + 1, b"y") + b"\r\n",
        "one-over": _note("Observation", MAX_LINE + 1) + b"\n",  # read whole, then found too long
        "at-max": _note("Observation", MAX_LINE) + b"\r\n",  # just fits
        "blank-2": b"\n",
        "duplicate": orjson.dumps({"resourceType": "Patient", "id": patient_id(2)}) + b"\n",
        "no-id": orjson.dumps({"resourceType": "Patient", "identifier": [{"value": "a"}]}) + b"\n",
        "two": orjson.dumps(obs | {"id": "two"} | two) + b"\n",
        "not-a-resource": b'["not", "a", "resource"]\n',
        "urn-nobody": orjson.dumps(obs | {"id": "u1", "subject": {"reference": "urn:uuid:nobody"}}) + b"\n",
        # a urn:uuid names a Patient whose id is that UUID (in either case), never one with another id
        "uuid-patient": orjson.dumps({"resourceType": "Patient", "id": _UUID}) + b"\n",
        "urn-match": orjson.dumps(obs | {"id": "u2", "subject": {"reference": f"urn:uuid:{_UUID.upper()}"}})
        + b"\n",
        "urn-not-uuid": orjson.dumps(obs | {"id": "u4", "subject": not_a_uuid}) + b"\n",
        "absent": orjson.dumps(obs | {"id": "u3", "subject": {"reference": "urn:uuid:x"}, "focus": [absent]})
        + b"\n",
        "via": orjson.dumps(obs | {"id": "via", "encounter": {"reference": "Encounter/enc-x"}}) + b"\n",
        "last-long": _note("Observation", 2 * MAX_LINE, b"z"),  # the last line, no line break
    }
    numbers = dict(zip(lines, _append(folder / "Observation.ndjson", list(lines.values())), strict=True))
    enc = {
        "enc-long": _note("Encounter", 5 * MAX_LINE) + b"\n",
        "enc-x": orjson.dumps({"resourceType": "Encounter", "id": "enc-x"} | subject) + b"\n",
        "enc-blank": b"\n",
    }
    numbers |= dict(zip(enc, _append(folder / "Encounter.ndjson", list(enc.values())), strict=True))
    return [ix.SourceFile(p, None) for p in sorted(folder.glob("*.ndjson"))], numbers


def _snapshot(conn: sqlite3.Connection) -> dict:
    groups = ix.group_count(conn)
    lines = [ix.group_lines(conn, g) for g in range(groups)]
    snap = {
        "groups": conn.execute(
            "SELECT id, first, last, patients, resources FROM groups ORDER BY id"
        ).fetchall(),
        "lines": lines,
        "not_delivered": sorted(ix.not_delivered(conn)),
        "invalid": ix.invalid_lines(conn, 10_000),
        "files": ix.file_names(conn),
        "rows": conn.execute(
            "SELECT id, file, off, len, line, rtype, is_patient, owner, state FROM resources ORDER BY id"
        ).fetchall(),
    }
    for group in range(0, groups, 2):
        ix.mark_sent(conn, [line.id for line in lines[group] if line.owner is None])
    snap["shared_unsent"] = sorted(ix.shared_unsent(conn))
    return snap


def _build(tmp: Path, name: str, files: list[ix.SourceFile], **kw: object) -> tuple[ix.IndexStats, dict]:
    (tmp / name).mkdir()
    conn = ix.open_index(tmp / name / "index.db")
    stats = ix.build_index(conn, files, ix.Keyer(), **KW, **kw)
    snap = _snapshot(conn)
    conn.close()
    return stats, snap


def test_the_index_from_worker_ranges_equals_the_sequential_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, at = _export(tmp_path / "export")
    copied: list[int] = []
    copy_range = ix._copy_range
    monkeypatch.setattr(ix, "_copy_range", lambda *a: copied.append(1) or copy_range(*a))
    done: list[int] = []
    here_stats, here = _build(tmp_path, "here", files, workers=1)
    assert not copied  # in this process, straight into the index
    par_stats, par = _build(tmp_path, "par", files, workers=2, chunk_bytes=20_000, progress=done.append)
    total = sum(f.path.stat().st_size for f in files)
    assert len(copied) > 3 * len(files)  # the big files were cut into several ranges each
    assert done and done[-1] == total and done == sorted(done)
    assert par_stats == here_stats
    for key in here:
        assert par[key] == here[key], key
    blank = 5  # lines, not resources
    assert here_stats == ix.IndexStats(
        files=len(files),
        bytes=total,
        lines=here_stats.resources + blank,
        resources=here_stats.resources,
        patients=62,
        invalid=9,
    )
    assert len(here["groups"]) > 3 and all(here["lines"])
    name = here["files"]
    assert [(name[f], line, reason) for f, line, reason in here["invalid"]] == [
        ("Encounter.ndjson", 1, "malformed-json"),
        ("Encounter.ndjson", at["enc-long"], "line-too-long"),
        ("Observation.ndjson", 3, "malformed-json"),
        ("Observation.ndjson", 17, "malformed-json"),
        ("Observation.ndjson", at["long"], "line-too-long"),
        ("Observation.ndjson", at["long-crlf"], "line-too-long"),
        ("Observation.ndjson", at["one-over"], "line-too-long"),
        ("Observation.ndjson", at["not-a-resource"], "no-resource-type"),
        ("Observation.ndjson", at["last-long"], "line-too-long"),
    ]
    assert here["not_delivered"] == [
        ("duplicate-patient", "Patient", 1),
        ("patient-absent", "Observation", 7),
    ]
    obs, enc = (
        next(n for n, f in enumerate(files) if f.path.stem == t) for t in ("Observation", "Encounter")
    )
    rows = {(r[1], r[4]): r for r in here["rows"]}  # (file, line) -> row
    assert rows[(obs, at["at-max"])][3] == MAX_LINE
    # an Observation of two patients brings them together (one travels as the other's), and goes with them
    assert rows[(obs, at["two"])][8] == "ok" and rows[(obs, at["two"])][7] is not None
    # the Observation that points only at an Encounter travels with that Encounter's patient
    assert rows[(obs, at["via"])][7] == rows[(enc, at["enc-x"])][7] == rows[(obs, at["after-long"])][7]
    assert rows[(obs, at["via"])][7] is not None
    # a subject by a urn:uuid that matches no Patient is an orphan, like a strict one (it was shared, went
    # with whatever group referred to it, and was rejected there); a matched one owns
    assert [rows[(obs, at[k])][8] for k in ("urn-nobody", "urn-match", "absent", "urn-not-uuid")] == [
        "patient-absent",
        "ok",
        "patient-absent",
        "patient-absent",  # `urn:uuid:pat0000005`: the chain resolves it to nothing, and so does the index
    ]
    assert rows[(obs, at["urn-match"])][7] == rows[(obs, at["uuid-patient"])][0]
    # every range's scratch file is gone; nothing from the export in clear in the index
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == ["index.db"]
    dump = "\n".join(sqlite3.connect(tmp_path / "par" / "index.db").iterdump())
    assert patient_id(1) not in dump and "enc-x" not in dump


def test_a_small_export_is_scanned_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = _export(tmp_path / "export")

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("no worker processes for an export smaller than one range")

    monkeypatch.setattr(ix, "ProcessPoolExecutor", no_workers)
    stats, _ = _build(tmp_path, "small", files, workers=2)  # default range size: one range
    assert stats.patients == 62


def test_ranges_start_at_line_starts_tile_the_file_and_know_their_first_line(tmp_path: Path) -> None:
    path = tmp_path / "f.ndjson"
    data = b"".join(b"x" * (n % 37) + b"\n" for n in range(60_000)) + b"y" * 300 + b"\n\n" + b"tail"
    assert len(data) > 1 << 20  # boundaries across the 1 MiB blocks read
    path.write_bytes(data)
    newlines = [at for at, byte in enumerate(data) if byte == ord("\n")]
    for chunk in (1, 10, 64, 299, 1000, 1 << 16, 1 << 20, len(data) - 1, len(data), 10 * len(data)):
        ranges = list(ix._ranges(path, chunk))
        starts = [start for start, _, _ in ranges]
        assert starts[0] == 0 and all(data[s - 1 : s] == b"\n" for s in starts[1:])
        assert [end for _, end, _ in ranges] == starts[1:] + [None]
        assert all(b - a >= chunk for a, b in zip(starts, starts[1:], strict=False))
        assert [before for _, _, before in ranges] == [bisect.bisect_left(newlines, s) for s in starts]
    lone = tmp_path / "one-line.ndjson"
    lone.write_bytes(b"z" * 100_000)  # no newline at all: one range
    assert list(ix._ranges(lone, 1000)) == [(0, None, 0)]
    ends_with_newline = tmp_path / "nl.ndjson"
    ends_with_newline.write_bytes(b"a\nb\n")
    assert list(ix._ranges(ends_with_newline, 2)) == [(0, 2, 0), (2, 4, 1)]
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    assert list(ix._ranges(empty, 2)) == [(0, None, 0)]


def test_keyers_with_one_key_agree_and_a_keyer_is_never_pickled() -> None:
    key = bytes(range(32))
    one, two = ix.Keyer(key), ix.Keyer(key)
    assert one("Patient/a") == two("Patient/a") == one.fresh("Patient/a") != ix.Keyer()("Patient/a")
    assert 0 <= one("Patient/a") < 1 << 63
    with pytest.raises(TypeError):
        pickle.dumps(one)


def test_an_export_bigger_than_one_range_is_indexed_in_a_child_process(tmp_path: Path) -> None:
    """build_index_file: the same index and stats as building here, progress relayed from the child, and
    the job process never opens the index until it is finished."""
    files, _ = _export(tmp_path / "export")
    here_stats, here = _build(tmp_path, "here", files, workers=1)
    done: list[int] = []
    path = tmp_path / "child" / "index.db"
    path.parent.mkdir()
    stats = ix.build_index_file(path, files, **KW, progress=done.append, chunk_bytes=20_000)
    assert stats == here_stats
    assert done and done[-1] == sum(f.path.stat().st_size for f in files)
    conn = ix.reopen_index(path)
    try:
        child = _snapshot(conn)
    finally:
        conn.close()
    for key in here:
        assert child[key] == here[key], key


def test_an_error_in_the_indexing_child_is_raised_in_the_job(tmp_path: Path) -> None:
    big = tmp_path / "Observation.ndjson"
    with big.open("wb") as handle:
        handle.truncate(ix.MAX_FILE_BYTES)  # sparse: nothing is written
    with pytest.raises(ValueError, match="cannot be indexed"):
        ix.build_index_file(tmp_path / "index.db", [ix.SourceFile(big, None)], **KW, chunk_bytes=20_000)


def test_a_bulk_run_killed_while_indexing_leaves_no_indexing_processes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.processes import alive, descendants

    write_export(tmp_path / "export", SynthSpec(patients=1500, resources_per_patient=100))  # > one range
    args = ["--registry", "example-generic", "--to-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path)]
    cli = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "bulk", str(tmp_path / "export"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        tree: set[int] = set()
        # the indexing child and its two scanners (and multiprocessing's resource trackers) are up
        while len(tree) < 3 and time.monotonic() < deadline and cli.poll() is None:
            tree = alive(descendants(cli.pid))
            time.sleep(0.02)
        assert len(tree) >= 3 and not list((tmp_path / "out").glob("*.json")), "the run should be indexing"
        # batch work: the indexing process and its scanners run at the workers' niceness (+10)
        assert sum(_niceness(pid) >= 10 for pid in tree) >= 2  # the indexing process and a scanner
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(tree), "indexing processes outlived the bulk run"
        # killed with the run, not after finishing a scan for no one: the index never got all 150,000 lines
        index = tmp_path / "index.db"
        indexed = 0
        if index.exists():
            with contextlib.closing(sqlite3.connect(index)) as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "resources" in tables:
                    indexed = conn.execute("SELECT COUNT(*) FROM resources").fetchone()[0]
        assert indexed < 150_000
    finally:
        if cli.poll() is None:
            cli.kill()


def _niceness(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, IndexError, ValueError):
        return 0
