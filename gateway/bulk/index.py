"""Pass 1 of a bulk delivery: stream every NDJSON file once and build an on-disk index of who owns what.

The index is a SQLite database in the job's work dir. It holds, per resource line: file number, byte offset,
length, line number, resource type and opaque 63-bit keys; never a value from the export. Keys are a keyed
hash (HMAC-SHA-256, truncated) of `Type/id`, of Patient identifiers and of the references found, under a
random key that lives only in this process's memory: once the run ends the index is useless to anyone, and a
resumed run simply re-indexes (deterministic: same files, same patient order, same groups).

Ownership (which patient a resource travels with):
- a Patient owns itself;
- a resource that references a Patient (`Patient/<id>`, an absolute URL ending in it, `urn:uuid:<id>`,
  `Patient?identifier=[system|]value`) belongs to that Patient; if the Patient is not in the export it is an
  *orphan* (reported, not delivered); if it names two different Patients it is reported, not delivered (it
  cannot be put in one patient's group without leaving a dangling patient reference);
- a resource without patient references that references an owned resource (an Observation pointing only at
  an Encounter) inherits the owner, up to `INHERIT_ROUNDS` hops;
- everything else (Organization, Practitioner, Location, Medication, ...) is *shared*: it is sent along with
  every group that references it (the de-identified id is a keyed hash of `Type/id`, so the copies are the
  same resource at the registry: an idempotent upsert), and never on its own.
"""

from __future__ import annotations

import functools
import hmac
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl

import orjson

INHERIT_ROUNDS = 3
BATCH_ROWS = 20_000
# A reference value in the raw NDJSON text. Inside a JSON string every quote is escaped, so an unescaped
# `"reference"` followed by `:` is a property name; whitespace around the colon is allowed (pretty exporters).
_REFERENCE = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")

SCHEMA = """
CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE resources (
    id INTEGER PRIMARY KEY, file INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    line INTEGER NOT NULL, rtype TEXT NOT NULL, self_key INTEGER, is_patient INTEGER NOT NULL DEFAULT 0,
    owner INTEGER, state TEXT NOT NULL DEFAULT 'pending', sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE pkeys (key INTEGER NOT NULL, patient INTEGER NOT NULL);
CREATE TABLE prefs (res INTEGER NOT NULL, key INTEGER NOT NULL, strict INTEGER NOT NULL);
CREATE TABLE edges (res INTEGER NOT NULL, key INTEGER NOT NULL);
CREATE TABLE invalid (file INTEGER NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE groups (id INTEGER PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL,
                     patients INTEGER NOT NULL, resources INTEGER NOT NULL);
"""
# Built after the bulk inserts: building an index once is much cheaper than maintaining it row by row.
INDEXES = """
CREATE INDEX pkeys_key ON pkeys (key);
CREATE INDEX prefs_res ON prefs (res);
CREATE INDEX edges_res ON edges (res);
CREATE INDEX resources_self ON resources (self_key);
CREATE INDEX resources_owner ON resources (owner);
"""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    type_hint: str | None  # from the file name or the manifest; the line's resourceType decides


@dataclass
class IndexStats:
    files: int = 0
    bytes: int = 0
    lines: int = 0
    resources: int = 0
    patients: int = 0
    invalid: int = 0


class Keyer:
    """63-bit opaque keys: HMAC-SHA-256 under a key that is never written anywhere (see module docstring).

    One-shot `hmac.digest` (C, no Python HMAC object) plus a small LRU: an export names the same patient
    in every line of that patient's resources, so most references repeat within a few lines."""

    def __init__(self, key: bytes | None = None, cache: int = 1 << 16) -> None:
        secret = key or os.urandom(32)

        def fresh(text: str) -> int:
            digest = hmac.digest(secret, text.encode("utf-8", "surrogatepass"), "sha256")
            return int.from_bytes(digest[:8], "big") >> 1  # SQLite INTEGER is signed 64-bit

        # `fresh` for texts seen once (a line's own Type/id: a cache would only churn), the cached one for
        # references.
        self.fresh = fresh
        self._keyed = functools.lru_cache(maxsize=cache)(fresh)
        # The same reference text recurs line after line (the patient, their encounter, a few
        # practitioners): classify each distinct text once.
        self.classify = functools.lru_cache(maxsize=cache)(lambda raw: _classify(raw, self))

    def __call__(self, text: str) -> int:
        return self._keyed(text)


def open_index(path: Path) -> sqlite3.Connection:
    if path.exists():
        path.unlink()  # the index of an earlier run is keyed under a key that is gone: rebuild it
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # The index is scratch data (rebuilt on resume): no fsync, no journal to pay for.
    conn.executescript(
        "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;PRAGMA cache_size=-32768;"
    )
    conn.executescript(SCHEMA)
    return conn


def build_index(
    conn: sqlite3.Connection,
    files: list[SourceFile],
    keyer: Keyer,
    *,
    group_size: int,
    max_group_resources: int,
    max_line_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> IndexStats:
    """Index every file, resolve owners, cut patient groups. `progress(bytes_done)` after each batch."""
    stats = IndexStats(files=len(files))
    writer = _Writer(conn)
    for number, source in enumerate(files):
        size = source.path.stat().st_size
        conn.execute("INSERT INTO files (id, name, size) VALUES (?, ?, ?)", (number, source.path.name, size))
        for row in _scan_file(source.path, number, keyer, max_line_bytes, stats):
            writer.add(row)
            if progress and writer.pending == 0:
                progress(stats.bytes)
        writer.flush()
        if progress:
            progress(stats.bytes)
    conn.executescript(INDEXES)
    _resolve_owners(conn)
    stats.patients = conn.execute("SELECT COUNT(*) FROM resources WHERE is_patient = 1").fetchone()[0]
    _cut_groups(conn, group_size, max_group_resources)
    return stats


# -- scanning ---------------------------------------------------------------------------------------------
@dataclass
class _Row:
    file: int
    off: int
    length: int
    line: int
    rtype: str | None  # None: invalid line, `reason` says why
    self_key: int | None = None
    patient_keys: tuple[int, ...] = ()  # for a Patient: its aliases (Type/id, identifiers)
    prefs: tuple[tuple[int, int], ...] = ()  # (key, strict)
    edges: tuple[int, ...] = ()
    reason: str = ""


def _scan_file(
    path: Path, number: int, keyer: Keyer, max_line_bytes: int, stats: IndexStats
) -> Iterator[_Row]:
    offset = 0
    with path.open("rb", buffering=1 << 20) as handle:
        for line_no, raw, length in _raw_lines(handle, max_line_bytes):
            stats.bytes += length
            stats.lines += 1
            if raw is None:  # longer than max_line_bytes: never held in memory whole
                stats.resources += 1
                stats.invalid += 1
                yield _Row(number, offset, length, line_no, None, reason="line-too-long")
            else:
                body = raw.rstrip(b"\r\n")
                if body.strip():
                    stats.resources += 1
                    row = _scan_line(body, number, offset, line_no, keyer, max_line_bytes)
                    if row.rtype is None:
                        stats.invalid += 1
                    yield row
            offset += length


def _raw_lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line or None when too long, length in bytes), reading at most max_line_bytes + 2 bytes
    of any line at a time: an export without newlines cannot make pass 1 read it into memory whole."""
    line_no = 0
    while True:
        raw = handle.readline(max_line_bytes + 2)
        if not raw:
            return
        line_no += 1
        if raw.endswith(b"\n") or len(raw) <= max_line_bytes:
            yield line_no, raw, len(raw)
            continue
        length = len(raw)
        while not raw.endswith(b"\n"):
            raw = handle.readline(1 << 20)
            if not raw:
                break
            length += len(raw)
        yield line_no, None, length


def _scan_line(
    body: bytes, number: int, offset: int, line_no: int, keyer: Keyer, max_line_bytes: int
) -> _Row:
    row = _Row(number, offset, len(body), line_no, None)
    if len(body) > max_line_bytes:
        row.reason = "line-too-long"
        return row
    try:
        resource = orjson.loads(body)
    except orjson.JSONDecodeError:
        row.reason = "malformed-json"
        return row
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str) or not rtype.isalpha():
        row.reason = "no-resource-type"
        return row
    row.rtype = rtype
    rid = resource.get("id")
    if isinstance(rid, str) and _ID.fullmatch(rid):
        row.self_key = keyer.fresh(f"{rtype}/{rid}")
    if rtype == "Patient":
        row.patient_keys = tuple(_patient_aliases(resource, rid, keyer))
    prefs: set[tuple[int, int]] = set()
    edges: set[int] = set()
    classify = keyer.classify
    for raw_ref in _REFERENCE.findall(body):
        found_prefs, found_edges = classify(raw_ref)
        prefs.update(found_prefs)
        edges.update(found_edges)
    row.prefs, row.edges = tuple(prefs), tuple(edges)
    return row


def _patient_aliases(resource: dict, rid: object, keyer: Keyer) -> Iterator[int]:
    if isinstance(rid, str) and rid:
        yield keyer.fresh(f"Patient/{rid}")
        yield keyer.fresh(f"urn:uuid:{rid}")
    idents = resource.get("identifier")
    for ident in idents if isinstance(idents, list) else ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else ""
            yield keyer.fresh(f"ident|{system}|{ident['value']}")
            yield keyer.fresh(f"ident-any|{ident['value']}")


def _classify(raw: bytes, keyer: Keyer) -> tuple[list[tuple[int, int]], list[int]]:
    """Patient-candidate references go to `prefs`, the rest (as `Type/id`) to `edges`."""
    ref = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8", "replace")
    prefs: list[tuple[int, int]] = []
    edges: list[int] = []
    _classify_into(ref, keyer, prefs, edges)
    return prefs, edges


def _classify_into(ref: str, keyer: Keyer, prefs: list[tuple[int, int]], edges: list[int]) -> None:
    if ref.startswith("#"):
        return
    if ref.startswith("urn:uuid:"):
        # Could be a Patient (resolved against Patient ids) or anything else: record both ways.
        prefs.append((keyer(ref), 0))
        edges.append(keyer(ref))
        return
    if ref.startswith("Patient?"):
        for name, token in parse_qsl(ref[8:], keep_blank_values=True):
            if name == "identifier":
                system, sep, value = token.rpartition("|")
                prefs.append((keyer(f"ident|{system}|{value}") if sep else keyer(f"ident-any|{value}"), 1))
        return
    tail = _TAIL.search(ref)
    if tail is None:
        return
    rtype, rid = tail.group(1), tail.group(2)
    if rtype == "Patient":
        prefs.append((keyer(f"Patient/{rid}"), 1))
    else:
        edges.append(keyer(f"{rtype}/{rid}"))


class _Writer:
    """Batched inserts (executemany) in explicit transactions: row-by-row autocommit would be 100x slower."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.rows: list[_Row] = []
        self.pending = 0
        self.next_id = 1

    def add(self, row: _Row) -> None:
        self.rows.append(row)
        self.pending = len(self.rows)
        if self.pending >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        resources, invalid, pkeys, prefs, edges = [], [], [], [], []
        for row in self.rows:
            if row.rtype is None:
                invalid.append((row.file, row.line, row.reason))
                continue
            rid = self.next_id
            self.next_id += 1
            patient = 1 if row.patient_keys else 0
            resources.append(
                (
                    rid,
                    row.file,
                    row.off,
                    row.length,
                    row.line,
                    row.rtype,
                    row.self_key,
                    patient,
                    rid if patient else None,
                )
            )
            pkeys.extend((key, rid) for key in row.patient_keys)
            prefs.extend((rid, key, strict) for key, strict in row.prefs)
            edges.extend((rid, key) for key in row.edges)
        c = self.conn
        c.execute("BEGIN")
        c.executemany(
            "INSERT INTO resources (id, file, off, len, line, rtype, self_key, is_patient, owner) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            resources,
        )
        c.executemany("INSERT INTO invalid (file, line, reason) VALUES (?, ?, ?)", invalid)
        c.executemany("INSERT INTO pkeys (key, patient) VALUES (?, ?)", pkeys)
        c.executemany("INSERT INTO prefs (res, key, strict) VALUES (?, ?, ?)", prefs)
        c.executemany("INSERT INTO edges (res, key) VALUES (?, ?)", edges)
        c.execute("COMMIT")
        self.rows = []
        self.pending = 0


# -- owners and groups ------------------------------------------------------------------------------------
def _resolve_owners(conn: sqlite3.Connection) -> None:
    c = conn
    c.execute("BEGIN")
    # A Patient id seen twice: the later line is a duplicate, reported and not delivered.
    c.execute("""UPDATE resources SET state = 'duplicate-patient', owner = NULL, is_patient = 0
                 WHERE is_patient = 1 AND self_key IN (SELECT self_key FROM resources WHERE is_patient = 1
                 GROUP BY self_key HAVING COUNT(*) > 1) AND id NOT IN (SELECT MIN(id) FROM resources
                 WHERE is_patient = 1 GROUP BY self_key)""")
    c.execute(
        "DELETE FROM pkeys WHERE patient IN (SELECT id FROM resources WHERE state = 'duplicate-patient')"
    )
    c.execute("UPDATE resources SET state = 'ok' WHERE is_patient = 1")
    # `strict` references name a Patient for sure (Patient/x, Patient?identifier=); `urn:uuid:` ones only
    # count when they match a Patient, so an unmatched urn:uuid does not make a resource an orphan.
    c.execute("""CREATE TEMP TABLE matched AS
                 SELECT p.res AS res, COUNT(DISTINCT k.patient) AS n, MIN(k.patient) AS owner,
                        MAX(p.strict) AS strict
                 FROM prefs p LEFT JOIN pkeys k ON k.key = p.key GROUP BY p.res""")
    c.execute("""UPDATE resources SET owner = CASE WHEN m.n = 1 THEN m.owner END,
                 state = CASE WHEN m.n = 1 THEN 'ok' ELSE 'several-patients' END
                 FROM matched m WHERE m.res = resources.id AND resources.state = 'pending' AND m.n >= 1""")
    c.execute("""UPDATE resources SET state = 'patient-absent'
                 FROM matched m WHERE m.res = resources.id AND resources.state = 'pending'
                 AND m.n = 0 AND m.strict = 1""")
    for _ in range(INHERIT_ROUNDS):
        changed = c.execute("""UPDATE resources SET owner = t.owner, state = 'ok'
                 FROM (SELECT e.res AS res, MIN(r2.owner) AS owner FROM edges e
                       JOIN resources r2 ON r2.self_key = e.key AND r2.owner IS NOT NULL AND r2.state = 'ok'
                       GROUP BY e.res) t
                 WHERE t.res = resources.id AND resources.state = 'pending'""").rowcount
        if not changed:
            break
    c.execute("UPDATE resources SET state = 'shared' WHERE state = 'pending'")
    c.execute("DROP TABLE matched")
    c.execute("COMMIT")


def _cut_groups(conn: sqlite3.Connection, group_size: int, max_group_resources: int) -> None:
    """Consecutive patients (export order) into groups of at most `group_size` patients and, unless a single
    patient is bigger, `max_group_resources` resources: a bounded TTP batch and a bounded memory footprint."""
    rows = conn.execute("""SELECT r.id,
                             (SELECT COUNT(*) FROM resources o WHERE o.owner = r.id AND o.state = 'ok')
                           FROM resources r WHERE r.is_patient = 1 AND r.state = 'ok' ORDER BY r.id""")
    groups: list[tuple[int, int, int, int, int]] = []
    first = last = None
    patients = resources = 0
    for pid, owned in rows:
        if first is not None and (patients >= group_size or resources + owned > max_group_resources):
            groups.append((len(groups), first, last, patients, resources))
            first, patients, resources = None, 0, 0
        if first is None:
            first = pid
        last, patients, resources = pid, patients + 1, resources + owned
    if first is not None:
        groups.append((len(groups), first, last, patients, resources))
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO groups (id, first, last, patients, resources) VALUES (?, ?, ?, ?, ?)", groups
    )
    conn.execute("COMMIT")


# -- reading back -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    id: int
    file: int
    off: int
    length: int
    line: int
    rtype: str
    owner: int | None  # the patient's row id; None for a shared resource


def group_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0]


def group_lines(conn: sqlite3.Connection, group: int) -> list[Line]:
    """The lines of one group: its patients' resources, then the shared resources they reference (with the
    shared resources those reference, a few hops deep), each once, in export order."""
    first, last = conn.execute("SELECT first, last FROM groups WHERE id = ?", (group,)).fetchone()
    owned = conn.execute(
        """SELECT id, file, off, len, line, rtype, owner FROM resources
                            WHERE owner BETWEEN ? AND ? AND state = 'ok' ORDER BY id""",
        (first, last),
    ).fetchall()
    shared: dict[int, tuple] = {}
    frontier = [r[0] for r in owned]
    for _ in range(INHERIT_ROUNDS):
        found = _shared_targets(conn, frontier, shared)
        if not found:
            break
        frontier = list(found)
    rows = owned + [shared[k] for k in sorted(shared)]
    return [Line(*row) for row in rows]


def _shared_targets(conn: sqlite3.Connection, sources: list[int], seen: dict[int, tuple]) -> set[int]:
    new: set[int] = set()
    for start in range(0, len(sources), 900):  # SQLite's bound-parameter limit
        chunk = sources[start : start + 900]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"""SELECT DISTINCT r.id, r.file, r.off, r.len, r.line, r.rtype, NULL FROM edges e
                                    JOIN resources r ON r.self_key = e.key AND r.state = 'shared'
                                    WHERE e.res IN ({marks})""",
            chunk,
        ):
            if row[0] not in seen:
                seen[row[0]] = row
                new.add(row[0])
    return new


def not_delivered(conn: sqlite3.Connection) -> Iterable[tuple[str, str, int]]:
    """(reason, resource type, count) of what pass 1 already excludes."""
    return conn.execute("""SELECT state, rtype, COUNT(*) FROM resources
                           WHERE state NOT IN ('ok', 'shared') GROUP BY state, rtype""").fetchall()


def mark_sent(conn: sqlite3.Connection, lines: list[Line]) -> None:
    """Remember which shared resources went out with some group (for the summary's accounting)."""
    ids = [(line.id,) for line in lines if line.owner is None]
    conn.execute("BEGIN")
    conn.executemany("UPDATE resources SET sent = 1 WHERE id = ?", ids)
    conn.execute("COMMIT")


def shared_unsent(conn: sqlite3.Connection) -> Iterable[tuple[str, int]]:
    """Shared resources that no delivered group referred to: nothing links them to a patient, so they are
    never sent (a registry gets no free-floating Organizations or Practitioners)."""
    return conn.execute("""SELECT rtype, COUNT(*) FROM resources WHERE state = 'shared' AND sent = 0
                           GROUP BY rtype""").fetchall()


def invalid_lines(conn: sqlite3.Connection, limit: int) -> list[tuple[str, int, str]]:
    return conn.execute(
        """SELECT f.name, i.line, i.reason FROM invalid i JOIN files f ON f.id = i.file
                           ORDER BY i.file, i.line LIMIT ?""",
        (limit,),
    ).fetchall()


def file_names(conn: sqlite3.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT id, name FROM files").fetchall())
