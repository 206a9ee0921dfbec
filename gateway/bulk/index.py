"""Pass 1 of a bulk delivery: stream every NDJSON file once and build an on-disk index of who owns what.

The index is a SQLite database in the job's work dir. It holds, per resource line: file number, byte offset,
length, line number, resource type and opaque 63-bit keys; never a value from the export. Keys are a keyed
hash (keyed BLAKE2b, 64 bits, shifted to 63) of `Type/id`, of Patient identifiers and of the references
found, under a random key that lives only in memory (this process's and, while pass 1 runs, its scanning
workers', which get it through the pool's pipe): once the run ends the index is useless to anyone, and a
resumed run simply re-indexes (deterministic: same files, same patient order, same groups).

Scanning (JSON parsing, keys, references) runs in worker processes on byte ranges of the files (cut at line
starts, so uneven files still keep every core busy); each range is written into its own SQLite file in the
work dir, copied into the index and deleted. A row's id is its file number and byte offset, its line number
counts the newlines before it: the index is the one a single sequential scan builds (small exports are
scanned in this process). `build_index_file` runs all of pass 1 in a child process for exports bigger than
one range (the key then lives only there): the job's own process stays small for pass 2.

Ownership (which patient a resource travels with):
- a Patient owns itself;
- a resource that references a Patient (`Patient/<id>`, an absolute URL ending in it, `urn:uuid:<id>`,
  `Patient?identifier=[system|]value`) belongs to that Patient; if the Patient is not in the export it is an
  *orphan* (reported, not delivered); if it names two different Patients it is reported, not delivered (it
  cannot be put in one patient's group without leaving a dangling patient reference);
- a resource without patient references that references an owned resource (an Observation pointing only at
  an Encounter) inherits the owner, however many hops away; a resource that reaches two patients this way
  (directly or through what it references) is reported, not delivered, like one that names two;
- everything else (Organization, Practitioner, Location, Medication, ...) is *shared*: it is sent along with
  every group that references it (the de-identified id is a keyed hash of `Type/id`, so the copies are the
  same resource at the registry: an idempotent upsert), and never on its own. A shared Location or
  Organization at a patient's home (`gateway/deid/homes.py`) is recorded in `home_of`: every group that
  carries it also reads that patient (a *bystander*), so that its address is generalised, and their values
  sought by the leak gate, in every copy, whichever group the patient is in.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
import multiprocessing
import os
import queue
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl

import orjson

from gateway.children import end_with_parent
from gateway.deid.r4 import r4
from gateway.identity import person_identifier

INHERIT_ROUNDS = 3
# Patients joined by their resources (a mother and her newborns) travel together up to this many; rounds of
# joining, each followed by working out the owners again, for references that reach a patient further away.
MAX_FAMILY = 8
FAMILY_ROUNDS = 3
BATCH_ROWS = 20_000
# Byte ranges scanned by one worker task: small enough that uneven files spread over the workers and the
# last range does not leave a core idle for long, big enough that the per-range cost (a SQLite file, a copy)
# does not matter. An export no bigger than one range is scanned in this process (no worker start-up).
CHUNK_BYTES = 16 << 20
MAX_WORKERS = 4
# A row's id is (file number << 40) | byte offset of its line: unique, in export order (file order, then
# byte order, the order groups are cut in) and known to whoever scans the line, without coordination.
_OFFSET_BITS = 40
MAX_FILE_BYTES = 1 << _OFFSET_BITS
# A reference value in the raw NDJSON text. Inside a JSON string every quote is escaped, so an unescaped
# `"reference"` followed by `:` is a property name; whitespace around the colon is allowed (pretty exporters).
_REFERENCE = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
RESOURCE_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR id
_BOM = b"\xef\xbb\xbf"
_IDENTIFIER_OBJECT = re.compile(rb'"identifier"\s*:\s*\{')  # a Reference's (a resource's own is a list)
_R4_TYPES = r4().resources

# What scanning writes (the index itself, or one range's file in a worker).
SCAN_SCHEMA = """
CREATE TABLE resources (
    id INTEGER PRIMARY KEY, file INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    line INTEGER NOT NULL, rtype TEXT NOT NULL, self_key INTEGER, is_patient INTEGER NOT NULL DEFAULT 0,
    owner INTEGER, state TEXT NOT NULL DEFAULT 'pending', sent INTEGER NOT NULL DEFAULT 0);
CREATE TABLE pkeys (key INTEGER NOT NULL, patient INTEGER NOT NULL);
CREATE TABLE persons (key INTEGER NOT NULL, patient INTEGER NOT NULL, link INTEGER NOT NULL,
                      loose INTEGER NOT NULL);
CREATE TABLE prefs (res INTEGER NOT NULL, key INTEGER NOT NULL, strict INTEGER NOT NULL);
CREATE TABLE edges (res INTEGER NOT NULL, key INTEGER NOT NULL);
CREATE TABLE invalid (file INTEGER NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL,
                      consent INTEGER NOT NULL DEFAULT 0);
"""
_SCAN_TABLES = ("resources", "pkeys", "persons", "prefs", "edges", "invalid")
SCHEMA = (
    SCAN_SCHEMA
    + """
CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE groups (id INTEGER PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL,
                     patients INTEGER NOT NULL, resources INTEGER NOT NULL);
CREATE TABLE home_of (place INTEGER NOT NULL, patient INTEGER NOT NULL);
CREATE TABLE named (id INTEGER PRIMARY KEY);
"""
)
# Built after the bulk inserts: building an index once is much cheaper than maintaining it row by row. The
# joins of pass 1 and of `group_lines` read every column they need from these (covering indexes), instead of
# looking each row up again in its table: a tenth of `_resolve_owners` on a million resources.
INDEXES = """
CREATE INDEX pkeys_key ON pkeys (key, patient);
CREATE INDEX persons_key ON persons (key);
CREATE INDEX prefs_res ON prefs (res, key, strict);
CREATE INDEX edges_res ON edges (res, key);
CREATE INDEX resources_self ON resources (self_key);
"""
# After the owners are resolved (which sets `owner` on nearly every row, and `state` for good). Every group's
# references are looked up among the few shared resources only (`_shared_targets`), not among all rows.
OWNER_INDEX = """
CREATE INDEX resources_owner ON resources (owner);
CREATE INDEX resources_shared ON resources (self_key) WHERE state = 'shared';
"""
_PRAGMAS = (
    "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE; PRAGMA cache_size=-32768;"
)


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
    """63-bit opaque keys: keyed BLAKE2b (a MAC, one C call) under a key that is never written anywhere (see
    module docstring), plus a small LRU: an export names the same patient in every line of that patient's
    resources, so most references repeat within a few lines. Keyers made with the same key agree (pass 1's
    workers)."""

    def __init__(self, key: bytes | None = None, cache: int = 1 << 16) -> None:
        secret = key or os.urandom(32)
        if len(secret) > hashlib.blake2b.MAX_KEY_SIZE:
            secret = hashlib.blake2b(secret).digest()
        self._secret = secret  # only ever handed to pass 1's workers, in memory
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes

        def fresh(text: str) -> int:
            digest = blake2b(text.encode("utf-8", "surrogatepass"), key=secret, digest_size=8).digest()
            return from_bytes(digest, "big") >> 1  # SQLite INTEGER is signed 64-bit

        # `fresh` for texts seen once (a line's own Type/id: a cache would only churn), the cached one for
        # references.
        self.fresh = fresh
        self._keyed = functools.lru_cache(maxsize=cache)(fresh)
        # The same reference text recurs line after line (the patient, their encounter, a few
        # practitioners): classify each distinct text once.
        self.classify = functools.lru_cache(maxsize=cache)(lambda raw: _classify(raw, self))

    def __call__(self, text: str) -> int:
        return self._keyed(text)

    def __reduce__(self) -> tuple:
        raise TypeError("a Keyer is not pickled (its key would end up wherever the pickle goes)")


def open_index(path: Path) -> sqlite3.Connection:
    if path.exists():
        path.unlink()  # the index of an earlier run is keyed under a key that is gone: rebuild it
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # The index is scratch data (rebuilt on resume): no fsync, no journal to pay for.
    conn.executescript(_PRAGMAS)
    conn.executescript(SCHEMA)
    return conn


def reopen_index(path: Path) -> sqlite3.Connection:
    """The finished index, for pass 2: a few rows per group, so a small page cache."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2048;")
    return conn


def build_index_file(
    path: Path,
    files: list[SourceFile],
    *,
    group_size: int,
    max_group_resources: int,
    max_line_bytes: int,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    nice: int = 0,
) -> IndexStats:
    """Build the index at `path` (any earlier one is replaced) with a fresh key, and return its stats.
    `nice` is added to the indexing process's niceness (and so its scanners'): batch work, like the chain.

    An export bigger than one range is indexed in a separate process: merging, sorting and resolving a
    million rows grows the heap by tens of MB, which a long-lived process keeps (the allocator does not
    return it), while the job's process stays small for pass 2. Smaller exports are indexed here."""
    options = {"group_size": group_size, "max_group_resources": max_group_resources}
    options["max_line_bytes"] = max_line_bytes
    if sum(source.path.stat().st_size for source in files) <= chunk_bytes:
        conn = open_index(path)
        try:
            return build_index(conn, files, Keyer(), progress=progress, chunk_bytes=chunk_bytes, **options)
        finally:
            conn.close()
    ctx = multiprocessing.get_context("spawn")  # not fork: the caller has threads (see pool.py)
    messages = ctx.Queue()
    child = ctx.Process(
        target=_index_main, args=(path, files, options, chunk_bytes, messages, os.getpid(), nice)
    )
    child.start()
    try:
        return _await_index(child, messages, progress)
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
        messages.close()


def _index_main(
    path: Path,
    files: list[SourceFile],
    options: dict,
    chunk_bytes: int,
    messages: multiprocessing.Queue,
    parent: int,
    nice: int,
) -> None:
    end_with_parent(parent)
    if nice:
        os.nice(nice)
    try:
        conn = open_index(path)
        try:
            stats = build_index(
                conn,
                files,
                Keyer(),
                progress=lambda done: messages.put(("progress", done)),
                chunk_bytes=chunk_bytes,
                **options,
            )
        finally:
            conn.close()
        messages.put(("done", stats))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        messages.put(("error", exc))


def _await_index(
    child: multiprocessing.process.BaseProcess,
    messages: multiprocessing.Queue,
    progress: Callable[[int], None] | None,
) -> IndexStats:
    while True:
        try:
            kind, value = messages.get(timeout=1.0)
        except queue.Empty:
            if not child.is_alive():
                text = f"the indexing process ended without a result (exit code {child.exitcode})"
                raise RuntimeError(text) from None
            continue
        if kind == "progress":
            if progress:
                progress(value)
        elif kind == "error":
            raise value
        else:
            return value


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def build_index(
    conn: sqlite3.Connection,
    files: list[SourceFile],
    keyer: Keyer,
    *,
    group_size: int,
    max_group_resources: int,
    max_line_bytes: int,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> IndexStats:
    """Index every file, resolve owners, cut patient groups. `progress(bytes_done)` as scanning goes on.

    `workers` scanning processes (default: the cores, at most MAX_WORKERS) on ranges of about `chunk_bytes`;
    with `workers` <= 1 or an export no bigger than one range, scanning runs in this process. Either way the
    index is the same."""
    stats = IndexStats(files=len(files))
    sizes = [source.path.stat().st_size for source in files]
    if any(size >= MAX_FILE_BYTES for size in sizes):
        raise ValueError(f"an export file of {MAX_FILE_BYTES} bytes or more cannot be indexed")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO files (id, name, size) VALUES (?, ?, ?)",
        [
            (number, source.path.name, size)
            for number, (source, size) in enumerate(zip(files, sizes, strict=True))
        ],
    )
    conn.execute("COMMIT")
    workers = default_workers() if workers is None else workers
    if workers > 1 and sum(sizes) > chunk_bytes:
        _scan_in_workers(conn, files, keyer, max_line_bytes, stats, progress, workers, chunk_bytes)
    else:
        _scan_here(conn, files, keyer, max_line_bytes, stats, progress)
    conn.executescript(INDEXES)
    _resolve_owners(conn)
    conn.executescript(OWNER_INDEX)
    _find_named_shared(conn)
    _find_home_places(conn, files)
    # records, as the chain counts them (two records of one person travel as one, and count as two)
    query = "SELECT COUNT(*) FROM resources WHERE rtype = 'Patient' AND state = 'ok'"
    stats.patients = conn.execute(query).fetchone()[0]
    _cut_groups(conn, group_size, max_group_resources)
    return stats


# -- scanning ---------------------------------------------------------------------------------------------
@dataclass
class _RangeStats:
    """What scanning one byte range found (small: the only thing a worker sends back)."""

    bytes: int = 0
    lines: int = 0
    resources: int = 0  # non-blank lines, valid or not
    invalid: int = 0

    def add_to(self, stats: IndexStats) -> None:
        stats.bytes += self.bytes
        stats.lines += self.lines
        stats.resources += self.resources
        stats.invalid += self.invalid


def _scan_here(
    conn: sqlite3.Connection,
    files: list[SourceFile],
    keyer: Keyer,
    max_line_bytes: int,
    stats: IndexStats,
    progress: Callable[[int], None] | None,
) -> None:
    """Every file as one range, straight into the index."""
    for number, source in enumerate(files):
        done = stats.bytes

        def flushed(n: int, done: int = done) -> None:
            if progress:
                progress(done + n)

        _scan_range(conn, source.path, number, 0, None, 0, keyer, max_line_bytes, flushed).add_to(stats)
        if progress:
            progress(stats.bytes)


def _scan_in_workers(
    conn: sqlite3.Connection,
    files: list[SourceFile],
    keyer: Keyer,
    max_line_bytes: int,
    stats: IndexStats,
    progress: Callable[[int], None] | None,
    workers: int,
    chunk_bytes: int,
) -> None:
    """Ranges scanned in `workers` processes, each into its own SQLite file that holds the final rows (ids
    from offsets, line numbers from the newlines before the range, counted here while the workers scan), and
    copied into the index in export order as they come in. A few ranges in flight at a time: the files
    waiting to be copied take bounded disk space."""
    plan = (
        (number, source.path, start, end, lines_before)
        for number, source in enumerate(files)
        for start, end, lines_before in _ranges(source.path, chunk_bytes)
    )
    with _scratch_dir(conn) as scratch:
        # spawn, not fork: the parent has threads (asyncio.to_thread, a server's loop), see pool.py.
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=end_with_parent,
            initargs=(os.getpid(),),
        )
        in_flight: collections.deque[tuple[Path, Future[_RangeStats]]] = collections.deque()

        def submit_next() -> None:
            for number, path, start, end, lines_before in itertools.islice(plan, 1):
                db = scratch / f"{number}-{start}.db"
                task = (str(db), str(path), number, start, end, lines_before, keyer._secret, max_line_bytes)
                in_flight.append((db, pool.submit(_scan_range_into, *task)))

        try:
            for _ in range(2 * workers):
                submit_next()
            while in_flight:
                db, future = in_flight.popleft()
                found = future.result()
                submit_next()
                _copy_range(conn, db)
                db.unlink()
                found.add_to(stats)
                if progress:
                    progress(stats.bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _scratch_dir(conn: sqlite3.Connection) -> Iterator[Path]:
    """A folder for the ranges' files next to the index (`<index>.ranges`, removed afterwards; one left by a
    run that was killed goes at the next run), or a temporary one for an index in memory."""
    main = next((file for _, name, file in conn.execute("PRAGMA database_list") if name == "main"), "")
    if not main:
        with tempfile.TemporaryDirectory(prefix="index-ranges-") as folder:
            yield Path(folder)
        return
    folder = Path(main + ".ranges")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ranges(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int | None, int]]:
    """(start, end, lines before start): byte ranges of at least `chunk_bytes` that start at a line start and
    end at one (end None: at the end of the file). One sequential read in bounded blocks; the lines before a
    range are the newlines before it (what `_raw_lines` counts: every line but the last ends in one)."""
    chunk_bytes = max(chunk_bytes, 1)
    start = lines_before = counted = pos = 0  # counted: newlines in [start, pos + at)
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            at = 0
            while True:
                # a newline at offset start + chunk_bytes - 1 or later ends the range
                search = max(start + chunk_bytes - 1 - pos, at)
                newline = block.find(b"\n", search) if search < len(block) else -1
                if newline < 0:
                    break
                counted += block.count(b"\n", at, newline + 1)
                end = pos + newline + 1
                yield start, end, lines_before
                start, lines_before, counted, at = end, lines_before + counted, 0, newline + 1
            counted += block.count(b"\n", at)
            pos += len(block)
    if start < pos or start == 0:
        yield start, None, lines_before


def _scan_range_into(
    db: str,
    path: str,
    number: int,
    start: int,
    end: int | None,
    lines_before: int,
    secret: bytes,
    max_line_bytes: int,
) -> _RangeStats:
    """In a worker: scan one range into a new SQLite file `db` (the index's tables, final rows)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.executescript(_PRAGMAS)
        conn.executescript(SCAN_SCHEMA)
        keyer = _worker_keyer(secret)
        return _scan_range(conn, Path(path), number, start, end, lines_before, keyer, max_line_bytes)
    finally:
        conn.close()


_keyers: dict[bytes, Keyer] = {}


def _worker_keyer(secret: bytes) -> Keyer:
    """One Keyer per key in a worker (its caches stay warm from one range to the next)."""
    if secret not in _keyers:
        _keyers.clear()
        _keyers[secret] = Keyer(secret)
    return _keyers[secret]


def _copy_range(conn: sqlite3.Connection, db: Path) -> None:
    """Append one range's rows to the index. Same tables, no expression and no index yet on the index's side:
    SQLite copies the records as they are (its transfer optimization), no row through Python."""
    conn.execute("ATTACH DATABASE ? AS part", (str(db),))
    try:
        conn.execute("BEGIN")
        for table in _SCAN_TABLES:
            conn.execute(f"INSERT INTO main.{table} SELECT * FROM part.{table}")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("DETACH DATABASE part")


def _scan_range(
    conn: sqlite3.Connection,
    path: Path,
    number: int,
    start: int,
    end: int | None,
    lines_before: int,
    keyer: Keyer,
    max_line_bytes: int,
    flushed: Callable[[int], None] | None = None,
) -> _RangeStats:
    """Scan the lines of `path` from byte `start` (a line start, `lines_before` lines into the file) to `end`
    (a line start; None: the end of the file) into `conn`. `flushed(bytes scanned)` after each batch."""
    out = _Writer(conn)
    offset = start
    lines = resources = invalid = pending = 0
    id_base = number << _OFFSET_BITS
    with path.open("rb", buffering=1 << 20) as handle:
        handle.seek(start)
        for lines, raw, length in _raw_lines(handle, max_line_bytes):
            line_no = lines_before + lines
            if isinstance(raw, int):  # longer than max_line_bytes: never held in memory whole
                out.invalid.append((number, line_no, "line-too-long", raw))
                resources += 1
                invalid += 1
                pending += 1
            else:
                body = raw.rstrip(b"\r\n")
                # a byte order mark before the first line (Windows tools write one) is not part of the JSON
                skip = len(_BOM) if offset == 0 and body.startswith(_BOM) else 0
                if body.strip():
                    resources += 1
                    row, body = id_base | offset, body[skip:]
                    valid = _scan_line(body, row, number, offset + skip, line_no, keyer, max_line_bytes, out)
                    invalid += not valid
                    pending += 1
            offset += length
            if pending >= BATCH_ROWS:
                out.flush()
                pending = 0
                if flushed:
                    flushed(offset - start)
            if end is not None and offset >= end:
                break
    out.flush()
    return _RangeStats(offset - start, lines, resources, invalid)


def _raw_lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | int, int]]:
    """(line number, line, length in bytes), reading at most max_line_bytes + 2 bytes of any line at a time:
    an export without newlines cannot make pass 1 read it into memory whole. A line too long comes as
    `_may_be_consent` of all its pieces instead (a Consent with a scanned form attached is such a line)."""
    line_no = 0
    while True:
        raw = handle.readline(max_line_bytes + 2)
        if not raw:
            return
        line_no += 1
        if raw.endswith(b"\n") or len(raw) <= max_line_bytes:
            yield line_no, raw, len(raw)
            continue
        length, consent = len(raw), _may_be_consent(raw)
        while not raw.endswith(b"\n"):
            tail = raw[-64:]  # the word split between two pieces (escaped, it is 42 bytes)
            raw = handle.readline(1 << 20)
            if not raw:
                break
            length += len(raw)
            consent = consent or _may_be_consent(tail + raw)
        yield line_no, consent, length


def _scan_line(
    body: bytes,
    row: int,
    number: int,
    offset: int,
    line_no: int,
    keyer: Keyer,
    max_line_bytes: int,
    out: _Writer,
) -> bool:
    """One non-blank line into `out`'s batch: a row in `resources` with its keys and references, or (False)
    a row in `invalid` with the reason."""
    if len(body) > max_line_bytes:
        out.invalid.append((number, line_no, "line-too-long", _may_be_consent(body)))
        return False
    try:
        resource = orjson.loads(body)
    except orjson.JSONDecodeError:
        out.invalid.append((number, line_no, "malformed-json", _may_be_consent(body)))
        return False
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(rtype, str) or not rtype.isalpha():
        out.invalid.append((number, line_no, "no-resource-type", _may_be_consent(body)))
        return False
    if rtype not in _R4_TYPES:  # any other text is stored nowhere: it may be anything (a name)
        out.invalid.append((number, line_no, "unknown-resource-type", _may_be_consent(body)))
        return False
    rid = resource.get("id")
    valid_id = isinstance(rid, str) and RESOURCE_ID.fullmatch(rid) is not None
    self_key = keyer.fresh(_self_text(rtype, rid)) if valid_id else None
    owner = None
    if rtype == "Patient":
        aliases = list(_patient_aliases(resource, rid, keyer))
        if aliases:  # a Patient without id and identifiers cannot be referenced: not a patient here
            owner = row
            out.pkeys.extend(zip(aliases, itertools.repeat(row)))
            out.persons.extend((key, row, link, loose) for key, link, loose in _person_keys(resource, keyer))
    out.resources.append((row, number, offset, len(body), line_no, rtype, self_key, owner is not None, owner))
    if rtype == "Consent":
        # whose objection it is is Consent.patient, whoever else it names (a parent signing as performer)
        patient = resource.get("patient")
        body = orjson.dumps({"patient": patient}) if isinstance(patient, dict) else b""
    refs = _REFERENCE.findall(body)
    whose = _subject_keys(resource, keyer)
    if whose:
        out.prefs.extend((row, key, 1) for key in whose)
    if rtype != "Consent" and _IDENTIFIER_OBJECT.search(body):  # a reference by identifier, however spaced
        out.prefs.extend((row, key, 0) for key in _logical_keys(resource, keyer))
    if refs:
        prefs: set[tuple[int, int]] = set()
        edges: set[int] = set()
        classify = keyer.classify
        for raw_ref in set(refs):
            found_prefs, found_edges = classify(raw_ref)
            if found_prefs:
                prefs.update(found_prefs)
            if found_edges:
                edges.update(found_edges)
        if prefs:
            out.prefs.extend([(row, key, strict) for key, strict in prefs])
        if edges:
            out.edges.extend(zip(itertools.repeat(row), edges))
    return True


_ASCII_ESCAPE = re.compile(rb"\\u00([2-7][0-9a-fA-F])")  # a printable ASCII character written as an escape


def _may_be_consent(line: bytes) -> int:
    """An unreadable line that mentions consent could be an objection: 1, so that the job stops (the
    word in any case, any of its letters written as a JSON escape)."""
    if b"onsent" in line or b"ONSENT" in line:
        return 1
    if b"\\u" not in line:
        return 0
    plain = _ASCII_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), line)
    return int(b"consent" in plain.lower())


UUID_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _self_text(rtype: str, rid: str) -> str:
    """What a resource's key is made of: `urn:uuid:<id>` for a UUID id (so that `urn:uuid:` references and
    `Type/<uuid>` ones find it alike: Synthea writes the former, servers the latter), else `Type/id`."""
    return f"urn:uuid:{rid.lower()}" if UUID_ID.fullmatch(rid) else f"{rtype}/{rid}"


def _subject_keys(resource: dict, keyer: Keyer) -> list[int]:
    """Strict patient keys of the `subject` or `patient` that `_REFERENCE` alone would not make strict:
    - given only by identifier (a Consent's `patient` often is): the resource is that patient's like one
      with a literal reference, so it travels (and, a Consent, is applied) with them;
    - a `urn:uuid:` that matches no Patient of the export: an orphan, like `Patient/x`."""
    keys = []
    for name in ("subject", "patient"):
        value = resource.get(name)
        for ref in value if isinstance(value, list) else (value,):
            if not isinstance(ref, dict):
                continue
            target, ident = ref.get("reference"), ref.get("identifier")
            if isinstance(target, str) and target.startswith("urn:uuid:"):
                keys.append(keyer(target.lower()))
            elif target is None and isinstance(ident, dict) and isinstance(ident.get("value"), str):
                keys.append(keyer(_ident_text(ident.get("system"), ident["value"])))
    return keys


def _person_keys(resource: dict, keyer: Keyer) -> Iterator[tuple[int, int, int]]:
    """(key, from a link, loose) of what makes two Patient records one person: an identifier with its
    system (spaces ignored; an EHR duplicate, which the TTP gives the same pseudonyms), or a `link` from one
    to the other (merged records) by reference or identifier. A value without its system is loose: it
    joins two records only through a link that names it so."""
    idents = resource.get("identifier")
    for ident in idents if isinstance(idents, list) else ():
        yield from _identifier_keys(ident, keyer, link=0)
    rid = resource.get("id")
    if isinstance(rid, str):
        yield keyer.fresh(f"person-record|{rid.lower()}"), 0, 0
    links = resource.get("link")
    for link in links if isinstance(links, list) else ():
        other = link.get("other") if isinstance(link, dict) else None
        if isinstance(other, dict):
            yield from _link_keys(other, keyer)


def _identifier_keys(ident: object, keyer: Keyer, *, link: int) -> Iterator[tuple[int, int, int]]:
    found = person_identifier(ident)
    if found is None:
        return
    system, value = found
    if system is not None:
        yield keyer.fresh(f"person|{system}|{value}"), link, 0
    if not link or system is None:
        yield keyer.fresh(f"person-value|{value}"), link, 1


def _link_keys(other: dict, keyer: Keyer) -> Iterator[tuple[int, int, int]]:
    target = other.get("reference")
    if isinstance(target, str):
        if target.startswith("urn:uuid:"):
            yield keyer.fresh(f"person-record|{target[9:].lower()}"), 1, 0
        elif target.startswith("Patient?"):
            for name, token in parse_qsl(target[8:], keep_blank_values=True):
                if name == "identifier":
                    system, _, value = token.rpartition("|")
                    yield from _identifier_keys({"system": system, "value": value}, keyer, link=1)
        elif (tail := _TAIL.search(target)) is not None and tail.group(1) == "Patient":
            yield keyer.fresh(f"person-record|{tail.group(2).lower()}"), 1, 0
    elif isinstance(other.get("identifier"), dict):
        yield from _identifier_keys(other["identifier"], keyer, link=1)


def _logical_keys(node: object, keyer: Keyer, top: bool = True) -> Iterator[int]:
    """Patient keys of every reference by identifier in the resource (`focus`, `performer`, ...), other than
    its subject or patient (`_subject_keys`): they tie the resource to a patient only when they
    match one, since most name a professional or an organisation."""
    if isinstance(node, dict):
        ident = node.get("identifier")
        value = ident.get("value") if isinstance(ident, dict) and "reference" not in node else None
        if not top and isinstance(value, str):
            yield keyer(_ident_text(ident.get("system"), value))
        for name, value in node.items():
            if not (top and name in ("subject", "patient")):
                yield from _logical_keys(value, keyer, top=False)
    elif isinstance(node, list):
        for item in node:
            yield from _logical_keys(item, keyer, top=False)


def _ident_text(system: object, value: str) -> str:
    """What a reference by identifier is keyed on: with its system, or by value alone (`ident-any`), the two
    forms a Patient is known under (`_patient_aliases`)."""
    return f"ident|{system}|{value}" if isinstance(system, str) else f"ident-any|{value}"


def _patient_aliases(resource: dict, rid: object, keyer: Keyer) -> Iterator[int]:
    if isinstance(rid, str) and rid:
        yield keyer.fresh(f"Patient/{rid}")
        if UUID_ID.fullmatch(rid):  # as the chain resolves it: `urn:uuid:pB` names no Patient `pB`
            yield keyer.fresh(f"urn:uuid:{rid.lower()}")
    idents = resource.get("identifier")
    for ident in idents if isinstance(idents, list) else ():
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system") if isinstance(ident.get("system"), str) else ""
            yield keyer.fresh(f"ident|{system}|{ident['value']}")
            yield keyer.fresh(f"ident-any|{ident['value']}")


def _classify(raw: bytes, keyer: Keyer) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Patient-candidate references go to `prefs`, the rest (as `Type/id`) to `edges`."""
    ref = orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8", "replace")
    prefs: list[tuple[int, int]] = []
    edges: list[int] = []
    _classify_into(ref, keyer, prefs, edges)
    return tuple(prefs), tuple(edges)


def _classify_into(ref: str, keyer: Keyer, prefs: list[tuple[int, int]], edges: list[int]) -> None:
    if ref.startswith("#"):
        return
    if ref.startswith("urn:uuid:"):
        # Could be a Patient (resolved against Patient ids) or anything else: record both ways.
        key = keyer(ref.lower())
        prefs.append((key, 0))
        edges.append(key)
        return
    if ref.startswith("Patient?"):
        for name, token in parse_qsl(ref[8:], keep_blank_values=True):
            if name == "identifier":
                system, sep, value = token.rpartition("|")
                prefs.append((keyer(_ident_text(system if sep else None, value)), 1))
        return
    tail = _TAIL.search(ref)
    if tail is None:
        return
    rtype, rid = tail.group(1), tail.group(2)
    if rtype == "Patient":
        prefs.append((keyer(f"Patient/{rid}"), 1))
    else:
        edges.append(keyer(_self_text(rtype, rid)))


class _Writer:
    """Batched inserts (executemany) in explicit transactions: row-by-row autocommit would be 100x slower."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.resources: list[tuple] = []
        self.invalid: list[tuple[int, int, str]] = []
        self.pkeys: list[tuple[int, int]] = []
        self.persons: list[tuple[int, int, int, int]] = []
        self.prefs: list[tuple[int, int, int]] = []
        self.edges: list[tuple[int, int]] = []

    def flush(self) -> None:
        c = self.conn
        c.execute("BEGIN")
        c.executemany(
            "INSERT INTO resources (id, file, off, len, line, rtype, self_key, is_patient, owner) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self.resources,
        )
        c.executemany("INSERT INTO invalid (file, line, reason, consent) VALUES (?, ?, ?, ?)", self.invalid)
        c.executemany("INSERT INTO pkeys (key, patient) VALUES (?, ?)", self.pkeys)
        c.executemany("INSERT INTO persons (key, patient, link, loose) VALUES (?, ?, ?, ?)", self.persons)
        c.executemany("INSERT INTO prefs (res, key, strict) VALUES (?, ?, ?)", self.prefs)
        c.executemany("INSERT INTO edges (res, key) VALUES (?, ?)", self.edges)
        c.execute("COMMIT")
        self.resources, self.invalid, self.pkeys, self.prefs, self.edges = [], [], [], [], []
        self.persons = []


# -- owners and groups ------------------------------------------------------------------------------------
def _resolve_owners(conn: sqlite3.Connection) -> None:
    c = conn
    c.execute("BEGIN")
    # A Patient id seen twice: the later line is a duplicate, reported and not delivered. (One pass over the
    # rows, NOT INDEXED: walking resources_self would look up every row; a Patient without an id, NULL
    # self_key, is never a duplicate.)
    c.execute("""UPDATE resources SET state = 'duplicate-patient', owner = NULL, is_patient = 0
                 WHERE id IN (SELECT id FROM (
                     SELECT id, ROW_NUMBER() OVER (PARTITION BY self_key ORDER BY id) AS nth
                     FROM resources NOT INDEXED WHERE is_patient = 1 AND self_key IS NOT NULL)
                   WHERE nth > 1)""")
    c.execute(
        "DELETE FROM pkeys WHERE patient IN (SELECT id FROM resources WHERE state = 'duplicate-patient')"
    )
    c.execute("UPDATE resources SET state = 'ok' WHERE is_patient = 1")
    _merge_records_of_one_person(c)
    _tie_to_patients(c)
    for _ in range(FAMILY_ROUNDS):
        if not _bring_families_together(c):
            break
        c.execute("""UPDATE resources SET state = 'pending', owner = NULL WHERE rtype != 'Patient'
                     AND state IN ('ok', 'several-patients', 'patient-absent')""")
        _tie_to_patients(c)
    c.execute("UPDATE resources SET state = 'shared' WHERE state = 'pending'")
    c.execute("COMMIT")


def _tie_to_patients(c: sqlite3.Connection) -> None:
    # `strict` references name a Patient for sure (Patient/x, Patient?identifier=); `urn:uuid:` ones only
    # count when they match a Patient, so an unmatched urn:uuid does not make a resource an orphan. Per
    # resource: no Patient matched (first IS NULL), exactly one (first = last) or several (first < last).
    c.execute("""UPDATE resources SET owner = CASE WHEN m.first = m.last THEN m.first END,
                 state = CASE WHEN m.first = m.last THEN 'ok' WHEN m.first IS NOT NULL THEN 'several-patients'
                              ELSE 'patient-absent' END
                 FROM (SELECT p.res AS res, MIN(k.patient) AS first, MAX(k.patient) AS last,
                              MAX(p.strict) AS strict
                       FROM prefs p LEFT JOIN pkeys k ON k.key = p.key GROUP BY p.res) m
                 WHERE m.res = resources.id AND resources.state = 'pending'
                 AND (m.first IS NOT NULL OR m.strict = 1)""")
    _follow_references(c)


def _bring_families_together(c: sqlite3.Connection) -> bool:
    """Patients joined by a resource of both (a newborn's Encounter `partOf` the mother's) travel together,
    as the earliest one's, in one slice, where the chain delivers that resource only if none of them objects
    (as in a posted Bundle). True when some were joined: the owners are then worked out again. A set bigger
    than `MAX_FAMILY` (a resource naming a whole ward) is left apart: such resources stay not delivered."""
    c.execute("DROP TABLE IF EXISTS temp.several")
    c.execute("CREATE TEMP TABLE several AS SELECT id FROM resources WHERE state = 'several-patients'")
    if not c.execute("SELECT 1 FROM temp.several LIMIT 1").fetchone():
        c.execute("DROP TABLE temp.several")
        return False
    c.execute("DROP TABLE IF EXISTS temp.reach")
    c.execute("""CREATE TEMP TABLE reach AS
                 SELECT p.res AS res, k.patient AS patient FROM temp.several s
                 JOIN prefs p ON p.res = s.id JOIN pkeys k ON k.key = p.key
                 UNION SELECT e.res, t.owner FROM temp.several s JOIN edges e ON e.res = s.id
                 JOIN resources t ON t.self_key = e.key AND t.id != e.res AND t.state = 'ok'
                 WHERE t.owner IS NOT NULL""")
    c.execute("DROP TABLE temp.several")
    c.execute("DROP TABLE IF EXISTS temp.pairs")
    c.execute("""CREATE TEMP TABLE pairs AS SELECT DISTINCT a.patient AS x, b.patient AS y
                 FROM temp.reach a JOIN temp.reach b ON a.res = b.res AND a.patient != b.patient""")
    c.execute("DROP TABLE temp.reach")
    _label_connected(c)
    # the size of a set counts every Patient record travelling as one of its members already (records of
    # one person, members joined in an earlier round), not only this round's
    c.execute(f"""DELETE FROM temp.label WHERE first IN (
                      SELECT m.first FROM (SELECT first, patient FROM temp.label
                                           UNION SELECT DISTINCT first, first FROM temp.label) m
                      JOIN resources r ON r.owner = m.patient AND r.rtype = 'Patient' AND r.state = 'ok'
                      GROUP BY m.first HAVING COUNT(*) > {MAX_FAMILY})""")
    return _join_to_first(c) > 0


# Per resource, what the resources it references are tied to: the lowest and highest patient owning one, and
# whether one is tied to several patients or to one absent from the export.
_TIES = """CREATE TEMP TABLE ties AS
    SELECT e.res AS res, MIN(t.owner) AS lo, MAX(t.owner) AS hi,
           MAX(t.state = 'several-patients') AS several, MAX(t.state = 'patient-absent') AS absent
    FROM edges e JOIN resources t ON t.self_key = e.key AND t.id != e.res
         AND t.state IN ('ok', 'several-patients', 'patient-absent')
    WHERE {where} GROUP BY e.res"""
_SEVERAL = """(ties.several OR (ties.lo IS NOT NULL AND (ties.lo != ties.hi
               OR (resources.owner IS NOT NULL AND ties.lo != resources.owner))))"""
_TIE = f"""UPDATE resources SET
    state = CASE WHEN {_SEVERAL} THEN 'several-patients'
                 WHEN resources.state = 'pending' AND ties.lo IS NOT NULL THEN 'ok'
                 WHEN resources.state = 'pending' AND ties.absent THEN 'patient-absent'
                 ELSE resources.state END,
    owner = CASE WHEN {_SEVERAL} THEN NULL
                 WHEN resources.state = 'pending' AND ties.lo IS NOT NULL THEN ties.lo
                 ELSE resources.owner END
    FROM ties WHERE ties.res = resources.id AND resources.is_patient = 0
    AND resources.state IN ('ok', 'pending')
    AND ({_SEVERAL} OR (resources.state = 'pending' AND (ties.lo IS NOT NULL OR ties.absent)))
    RETURNING resources.self_key"""


def _merge_records_of_one_person(c: sqlite3.Connection) -> None:
    """Patient records of one person (`_person_keys`: a shared identifier, a link) travel as the earliest
    record's, it and what refers to them, in one slice, where the chain applies an objection on any of them
    to all. Records join transitively (A and B share a BSN, B and C an MRN, or C links A and B)."""
    c.execute("DROP TABLE IF EXISTS temp.pairs")
    c.execute("""CREATE TEMP TABLE pairs AS
                 SELECT DISTINCT a.patient AS x, b.patient AS y FROM persons a
                 JOIN persons b ON a.key = b.key AND a.patient != b.patient
                      AND (a.loose = 0 OR a.link = 1 OR b.link = 1)
                 JOIN resources ra ON ra.id = a.patient AND ra.is_patient = 1
                 JOIN resources rb ON rb.id = b.patient AND rb.is_patient = 1""")
    _label_connected(c)
    _join_to_first(c)


def _label_connected(c: sqlite3.Connection) -> None:
    """`temp.label`: for each patient of `temp.pairs` (then dropped) that is not the lowest of its connected
    set, that lowest one (`first`)."""
    c.execute("DROP TABLE IF EXISTS temp.label")
    c.execute("""CREATE TEMP TABLE label AS SELECT x AS patient, MIN(MIN(y), x) AS first
                 FROM temp.pairs GROUP BY x""")
    # the lowest record of each connected set, passed along the pairs until nothing changes
    while c.execute("""UPDATE temp.label SET first = m.first FROM (
                           SELECT p.x AS patient, MIN(l.first) AS first FROM temp.pairs p
                           JOIN temp.label l ON l.patient = p.y GROUP BY p.x) m
                       WHERE m.patient = label.patient AND m.first < label.first""").rowcount:
        pass
    c.execute("DELETE FROM temp.label WHERE first = patient")
    c.execute("DROP TABLE temp.pairs")


def _join_to_first(c: sqlite3.Connection) -> int:
    """The patients of `temp.label` (then dropped) become the first one's: what names them is tied to it,
    and they travel as its resources. Returns how many were joined."""
    c.execute("""UPDATE pkeys SET patient = (SELECT first FROM temp.label WHERE patient = pkeys.patient)
                 WHERE patient IN (SELECT patient FROM temp.label)""")
    joined = c.execute("""UPDATE resources SET is_patient = 0, state = 'ok'
                          WHERE id IN (SELECT patient FROM temp.label)""").rowcount
    # every row travelling as a joined patient's goes along: its own, and the records joined to it before
    # (left behind, such a record travelled apart from the person's objection, or in no group at all)
    c.execute("""UPDATE resources SET owner = (SELECT first FROM temp.label WHERE patient = resources.owner)
                 WHERE owner IN (SELECT patient FROM temp.label)""")
    c.execute("DROP TABLE temp.label")
    return joined


def _follow_references(c: sqlite3.Connection) -> None:
    """A resource is tied to every patient it reaches through its references, however many hops (posted
    Bundles drop the same way: `resources_of_patient`): one that reaches none of its own inherits the owner
    of what it references (an Observation pointing only at an Encounter); one that reaches two patients is
    'several-patients' and not delivered, so an objecting patient's data cannot travel with another
    patient's group (a Condition of A whose evidence is B's Observation); one that reaches only a patient
    absent from the export is an orphan too. Rounds until nothing changes; after the first, only the
    resources that reference one changed in the round before are looked at again."""
    where = "1"
    while True:
        c.execute("DROP TABLE IF EXISTS temp.ties")
        c.execute(_TIES.format(where=where))
        changed = [(key,) for (key,) in c.execute(_TIE).fetchall() if key is not None]
        c.execute("DROP TABLE IF EXISTS temp.changed")
        c.execute("CREATE TEMP TABLE changed (key INTEGER PRIMARY KEY)")
        c.executemany("INSERT OR IGNORE INTO temp.changed (key) VALUES (?)", changed)
        if not changed:
            break
        where = "e.res IN (SELECT e2.res FROM edges e2 WHERE e2.key IN (SELECT key FROM temp.changed))"
    c.execute("DROP TABLE IF EXISTS temp.ties")
    c.execute("DROP TABLE IF EXISTS temp.changed")


_PLACE_TYPES = ("Location", "Organization")


def _find_named_shared(conn: sqlite3.Connection) -> None:
    """`named` rows: shared resources that another shared resource refers to and some patient's own
    resource names too. A group reaches those only through its own lines, never through a shared line:
    a Device of A's whose `parent` is B's implant must not carry the implant to A's group, where nothing
    shows it is B's (`gateway.linkage`, the same rule for a posted Bundle)."""
    conn.execute("BEGIN")
    conn.execute("DROP TABLE IF EXISTS temp.onward")
    conn.execute("""CREATE TEMP TABLE onward AS SELECT DISTINCT e.key AS key FROM resources s
                    JOIN edges e ON e.res = s.id WHERE s.state = 'shared'""")
    conn.execute("""INSERT OR IGNORE INTO named (id)
                    SELECT t.id FROM (SELECT DISTINCT e.key AS key FROM edges e
                                      JOIN resources r ON r.id = e.res AND r.state = 'ok'
                                      WHERE e.key IN (SELECT key FROM temp.onward)) k
                    JOIN resources t ON t.self_key = k.key AND t.state = 'shared'""")
    conn.execute("DROP TABLE temp.onward")
    conn.execute("COMMIT")


def _find_home_places(conn: sqlite3.Connection, files: list[SourceFile]) -> None:
    """`home_of` rows: a shared Location or Organization whose address is a patient's home (`same_home`).
    The places are few; every Patient is read once (by offset) only when one of them has an address."""
    from gateway.deid.homes import home_of, person_homes, same_home  # the scanning workers never need it

    marks = ",".join("?" * len(_PLACE_TYPES))
    rows = conn.execute(
        f"SELECT id, file, off, len FROM resources WHERE state = 'shared' AND rtype IN ({marks})",
        _PLACE_TYPES,
    ).fetchall()
    if not rows:
        return
    with _line_reader(files) as read:
        by_postcode: dict[str, list] = collections.defaultdict(list)
        by_number: dict[str, list] = collections.defaultdict(list)
        for place, *where in rows:
            addresses = _address_list(read(*where))
            for key in filter(None, map(home_of, addresses)):
                if key.postcode:
                    by_postcode[key.postcode].append((key, place))
                if key.number:
                    by_number[key.number].append((key, place))
        if not by_postcode and not by_number:
            return
        found: set[tuple[int, int]] = set()
        query = "SELECT id, file, off, len FROM resources WHERE rtype = 'Patient' AND state = 'ok'"
        for patient, *where in conn.execute(query):
            for home in person_homes([_parsed(read(*where))]):
                for key, place in by_postcode.get(home.postcode, []) + by_number.get(home.number, []):
                    if same_home(key, home):
                        found.add((place, patient))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO home_of (place, patient) VALUES (?, ?)", sorted(found))
    conn.execute("COMMIT")


def pread_files(paths: list[str]) -> tuple[Callable[[int, int, int], bytes], Callable[[], None]]:
    """read(file number, offset, length) by pread (no seek state: one descriptor per file serves every
    reader), and close."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]

    def read(file: int, off: int, length: int) -> bytes:
        return os.pread(fds[file], length, off)

    def close() -> None:
        for fd in fds:
            os.close(fd)

    return read, close


@contextlib.contextmanager
def _line_reader(files: list[SourceFile]) -> Iterator[Callable[[int, int, int], bytes]]:
    read, close = pread_files([str(source.path) for source in files])
    try:
        yield read
    finally:
        close()


def _parsed(line: bytes) -> dict:
    try:
        resource = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return resource if isinstance(resource, dict) else {}


def _address_list(line: bytes) -> list:
    address = _parsed(line).get("address")
    return address if isinstance(address, list) else [address]


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
    # a Patient of another group whose home a shared place of this group is: read for the leak gate and the
    # home check only, never delivered with this group nor offered to the TTP
    bystander: bool = False


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
    for hop in range(INHERIT_ROUNDS):
        found = _shared_targets(conn, frontier, shared, onward=hop > 0)
        if not found:
            break
        frontier = list(found)
    rows = owned + [shared[k] for k in sorted(shared)]
    places = [k for k, row in shared.items() if row[5] in _PLACE_TYPES]
    return [Line(*row) for row in rows] + _bystanders(conn, places)


def _bystanders(conn: sqlite3.Connection, places: list[int]) -> list[Line]:
    """The Patients whose home one of `places` is (see `home_of`), to be read beside the group."""
    found: dict[int, tuple] = {}
    for start in range(0, len(places), 900):  # SQLite's bound-parameter limit
        chunk = places[start : start + 900]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"""SELECT r.id, r.file, r.off, r.len, r.line, r.rtype, r.owner FROM home_of h
                JOIN resources r ON r.id = h.patient WHERE h.place IN ({marks})""",
            chunk,
        ):
            found[row[0]] = row
    return [Line(*found[k], bystander=True) for k in sorted(found)]


def _shared_targets(
    conn: sqlite3.Connection, sources: list[int], seen: dict[int, tuple], *, onward: bool
) -> set[int]:
    """Shared resources `sources` refer to; `onward` (the sources are shared themselves): not `named` ones."""
    new: set[int] = set()
    unnamed = "AND r.id NOT IN (SELECT id FROM named)" if onward else ""
    for start in range(0, len(sources), 900):  # SQLite's bound-parameter limit
        chunk = sources[start : start + 900]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"""SELECT DISTINCT r.id, r.file, r.off, r.len, r.line, r.rtype, NULL FROM edges e
                                    JOIN resources r ON r.self_key = e.key AND r.state = 'shared' {unnamed}
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


def mark_sent(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    """Remember which shared resources went out with some group (for the summary's accounting)."""
    conn.execute("BEGIN")
    conn.executemany("UPDATE resources SET sent = 1 WHERE id = ?", [(i,) for i in ids])
    conn.execute("COMMIT")


def mark_rejected(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    """Shared resources some slice rejected (reported so, not as never referenced, unless another sent it)."""
    conn.execute("BEGIN")
    conn.executemany("UPDATE resources SET sent = 2 WHERE id = ? AND sent = 0", [(i,) for i in ids])
    conn.execute("COMMIT")


def shared_unsent(conn: sqlite3.Connection) -> Iterable[tuple[str, int]]:
    """Shared resources that no delivered group referred to: nothing links them to a patient, so they are
    never sent (a registry gets no free-floating Organizations or Practitioners)."""
    return conn.execute("""SELECT rtype, COUNT(*) FROM resources WHERE state = 'shared' AND sent = 0
                           GROUP BY rtype""").fetchall()


def invalid_lines(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int, str]]:
    """(file number, line number, reason) of the lines that could not be read."""
    query = "SELECT file, line, reason FROM invalid ORDER BY file, line LIMIT ?"
    return conn.execute(query, (limit,)).fetchall()


def unattributed_consents(conn: sqlite3.Connection, consent_files: Iterable[int]) -> list[tuple[int, int]]:
    """(file, line) of the Consents no single patient of the export can be tied to (no followable patient
    reference, two, or one that matches no Patient of the export: a near miss, a BSN written otherwise, may
    be a patient who is there), and of the unreadable lines that hold a Consent or may (one of a Consent
    file, or one that mentions consent): whose objection such a line is cannot be known, so no patient can
    be delivered as not objecting."""
    found = conn.execute("""SELECT file, line FROM resources WHERE rtype = 'Consent'
                            AND state IN ('shared', 'several-patients', 'patient-absent')""").fetchall()
    found += conn.execute("SELECT file, line FROM invalid WHERE consent = 1").fetchall()
    numbers = sorted(set(consent_files))
    if numbers:
        marks = ",".join("?" * len(numbers))
        found += conn.execute(f"SELECT file, line FROM invalid WHERE file IN ({marks})", numbers).fetchall()
    return sorted(set(found))


def file_names(conn: sqlite3.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT id, name FROM files").fetchall())
