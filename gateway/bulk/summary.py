"""What a bulk job reports: counts per resource type and per reason, invalid lines by number. Never a value:
resource type names appear only when they are R4 type names, files by their base name."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gateway.bulk import index as ix


@dataclass
class BulkSummary:
    job: str
    registry: str
    files: int = 0
    bytes: int = 0
    lines: int = 0
    patients: int = 0
    resources_in: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # entries sent (shared resources once per Bundle)
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # reason → type → count
    invalid_lines: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line number, reason)
    patients_opted_out: int = 0
    patients_unknown_optout: int = 0
    patients_no_pseudonym: int = 0
    resources_opted_out: int = 0
    groups_total: int = 0
    groups_done: int = 0
    groups_resumed: int = 0
    bundles: int = 0
    bundles_already_stored: int = 0
    ttp_batches: int = 0
    worker_processes: int = 0  # processes that ran the chain; 0: the job's own process
    seconds: float = 0.0
    _file_names: dict[int, str] = field(default_factory=dict, repr=False)
    _shared_rejected: set[int] = field(default_factory=set, repr=False)  # reported once, whatever carried it
    _known: frozenset[str] = field(default=frozenset({"(unknown)"}), repr=False)

    def absorb_index(
        self, stats: ix.IndexStats, conn: sqlite3.Connection, max_listed: int, known_types: frozenset[str]
    ) -> None:
        self._known = known_types
        self.files, self.bytes, self.lines, self.patients = (
            stats.files,
            stats.bytes,
            stats.lines,
            stats.patients,
        )
        self._file_names = {n: shown_file_name(name, n) for n, name in ix.file_names(conn).items()}
        for rtype, n in conn.execute("SELECT rtype, COUNT(*) FROM resources GROUP BY rtype"):
            self.resources_in[self._label(rtype)] += n
        for reason, rtype, n in ix.not_delivered(conn):
            self._drop(reason, rtype, n)
        invalid = conn.execute("SELECT COUNT(*) FROM invalid").fetchone()[0]
        if invalid:
            self._drop("invalid-line", "(unknown)", invalid)
        self.invalid_lines = [
            (self._file_names.get(file_no, f"file {file_no}"), line, reason)
            for file_no, line, reason in ix.invalid_lines(conn, max_listed)
        ]

    def absorb_group(self, counts: dict[str, Any], *, resumed: bool) -> None:
        self.groups_done += 1
        self.groups_resumed += resumed
        self.patients_opted_out += counts["patientsOptedOut"]
        self.patients_unknown_optout += counts["patientsUnknownOptOut"]
        self.patients_no_pseudonym += counts["patientsNoPseudonym"]
        self.resources_opted_out += counts["resourcesOptedOut"]
        self.sent.update(counts["sent"])
        self.bundles += counts["bundles"]
        self.bundles_already_stored += counts["bundlesAlreadyStored"]
        self.ttp_batches += counts.get("ttpBatches", 0)
        for reason, per_type in counts["dropped"].items():
            for rtype, n in per_type.items():
                self._drop(reason, rtype, n)
        for file_no, line, reason in counts["rejectedLines"]:
            self._list(file_no, line, reason)
        for line_id, file_no, line, listed, reason, rtype in counts.get("sharedRejected", []):
            if line_id not in self._shared_rejected:
                self._shared_rejected.add(line_id)
                self._drop(reason, rtype, 1)
                if listed is not None:  # a de-identification drop is no bad line
                    self._list(file_no, line, listed)

    def _list(self, file_no: int, line: int, reason: str) -> None:
        if len(self.invalid_lines) < 1000:
            self.invalid_lines.append((self._file_names.get(file_no, str(file_no)), line, reason))

    def absorb_unsent(self, conn: sqlite3.Connection) -> None:
        for rtype, n in ix.shared_unsent(conn):
            self._drop("shared-not-referenced", rtype, n)

    def _label(self, rtype: str) -> str:
        return rtype if rtype in self._known else "(unknown)"  # a type name from input only if it is R4

    def _drop(self, reason: str, rtype: str, n: int) -> None:
        self.dropped.setdefault(reason, Counter())[self._label(rtype)] += n

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BulkSummary:
        """The inverse of `as_dict` (a finished job's summary, kept in its state)."""
        summary = cls(job=data["job"], registry=data["registry"])
        for attr, key in _INPUT + _OUTCOME:
            setattr(summary, attr, data[key])
        summary.resources_in = Counter(data["resourcesIn"])
        summary.sent = Counter(data["sent"])
        summary.dropped = {reason: Counter(per_type) for reason, per_type in data["dropped"].items()}
        summary.invalid_lines = [(x["file"], x["line"], x["reason"]) for x in data["invalidLines"]]
        return summary

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "registry": self.registry,
            **{key: getattr(self, attr) for attr, key in _INPUT},
            "resourcesIn": dict(sorted(self.resources_in.items())),
            "sent": dict(sorted(self.sent.items())),
            "dropped": {r: dict(sorted(c.items())) for r, c in sorted(self.dropped.items())},
            "invalidLines": [{"file": f, "line": n, "reason": r} for f, n, r in self.invalid_lines],
            **{key: getattr(self, attr) for attr, key in _OUTCOME},
        }


# A Bulk Data export names its files after resource types (Patient.ndjson, Observation.000.ndjson); any
# other name is the hospital's choice and may carry anything (a surname, a BSN), so it is shown by number.
# The numbers of a part are short: nine digits could be a BSN, six or eight a birth date.
_EXPORT_FILE_NAME = re.compile(r"([A-Z][A-Za-z]{1,63})(?:[.\-_]\d{1,5})*\.ndjson")


def shown_file_name(name: str, number: int) -> str:
    """The export's own name for a file named after a resource type (maybe numbered), else its number."""
    from gateway.deid.r4 import r4  # the job's process only; the scanning workers never show a name

    match = _EXPORT_FILE_NAME.fullmatch(name)
    if name == "upload.ndjson" or (match is not None and match.group(1) in r4().resources):
        return name
    return f"file {number}"


# (attribute, key in as_dict) of the plain numbers: what came in, then what became of it
_INPUT = [("files", "files"), ("bytes", "bytes"), ("lines", "lines"), ("patients", "patients")]
_OUTCOME = [
    ("patients_opted_out", "patientsOptedOut"),
    ("patients_unknown_optout", "patientsUnknownOptOut"),
    ("patients_no_pseudonym", "patientsNoPseudonym"),
    ("resources_opted_out", "resourcesOptedOut"),
    ("groups_total", "groupsTotal"),
    ("groups_done", "groupsDone"),
    ("groups_resumed", "groupsResumed"),
    ("bundles", "bundles"),
    ("bundles_already_stored", "bundlesAlreadyStored"),
    ("ttp_batches", "ttpBatches"),
    ("worker_processes", "workerProcesses"),
    ("seconds", "seconds"),
]
