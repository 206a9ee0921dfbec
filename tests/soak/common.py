"""Shared by the fault, kill and load tests: distinct bundles, an EHR client that retries as a real EHR
would, and the bookkeeping that says whether anything was lost or delivered twice.

Exactly-once, as this gateway means it: delivery on the wire is AT-LEAST-ONCE (a gateway killed after the
registry answered but before it recorded "delivered" sends the bundle again once the lease expires), and the
EFFECT is exactly-once because (1) every entry is a PUT with a stable opaque id, which the registry upserts,
and (2) every delivery carries a stable Bundle.identifier, so the registry can recognise a re-send. So:
  lost      = a bundle the EHR got a 2xx for that never reached the registry          (must be 0)
  re-sent   = receipts beyond the first for the same Bundle.identifier                (allowed, reported)
  duplicate = a resource the registry created twice (more resources at the registry than distinct
              Type/id among the delivered payloads)                                    (must be 0)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.store import Store, open_store

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
EXAMPLE_02 = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
REGISTRY = "example-generic"
FHIR_JSON = "application/fhir+json"


@functools.cache
def _example_text() -> str:
    return EXAMPLE_02.read_text(encoding="utf-8")


def variant(n: int, patient_group: int, *, run: str = "r") -> bytes:
    """Example 02 as delivery `n` about patient group `patient_group`.

    Bundle.identifier varies per delivery (so the gateway sees a new delivery, not a re-post); the
    resource ids vary per patient group, so deliveries of one group are about the same patients (same
    patient_order_key, upserts of the same resources) and different groups never share a resource.
    """
    text = _example_text().replace("vector-", f"{run}g{patient_group}-vector-")
    bundle = json.loads(text)
    bundle["identifier"]["value"] = f"{run}-delivery-{n}"
    # New patient numbers per group as well: the gateway caches pseudonyms, and a group whose values were
    # all cached would never reach the TTP (a TTP fault would then go unnoticed)
    tag = "".join(ch for ch in f"{run}G{patient_group}" if ch.isalnum())
    patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    for patient in patients:
        for ident in patient.get("identifier") or []:
            if ident.get("system", "").endswith("/patient-number"):
                core = ident["value"].strip()
                ident["value"] = ident["value"].replace(core, core + tag)
    return orjson.dumps(bundle)


def bad_bodies() -> dict[str, tuple[bytes, str]]:
    """Bodies an EHR may send by mistake, with their content type; each must get a 4xx, never a 5xx."""
    good = orjson.loads(EXAMPLE_02.read_bytes())
    schema_invalid = json.loads(json.dumps(good))
    schema_invalid["entry"][0]["resource"]["birthDate"] = {"not": "a date"}
    no_patient = json.loads(json.dumps(good))
    no_patient["entry"] = [e for e in no_patient["entry"] if e["resource"]["resourceType"] != "Patient"]
    return {
        "malformed-json": (EXAMPLE_02.read_bytes()[:500], FHIR_JSON),
        "wrong-content-type": (EXAMPLE_02.read_bytes(), "text/plain"),
        "schema-invalid": (orjson.dumps(schema_invalid), FHIR_JSON),
        "no-patient": (orjson.dumps(no_patient), FHIR_JSON),
    }


def delivery_id_of(response: httpx.Response) -> str | None:
    location = response.headers.get("content-location") or ""
    return location.rsplit("/", 1)[-1] or None


@dataclass
class PostResult:
    key: str  # the EHR's own name for the bundle (its Bundle.identifier value)
    status: int | None  # the final answer (None: no answer before the deadline)
    delivery_id: str | None
    tries: int
    statuses: list[int | str] = field(default_factory=list)  # every answer, or the transport error's name
    sent_at: float | None = None  # time.monotonic() of the first try
    answered_at: float | None = None  # ... and of the answer that accepted it


def post_until_accepted(client: httpx.Client, url: str, api_key: str, key: str, body: bytes, *,
                        deadline_s: float = 90.0, prefer_async: bool = False) -> PostResult:
    """Post as an EHR does: on no answer, a 503 or a 429, post the SAME bundle again (same Bundle.identifier,
    so the gateway de-duplicates) until it is accepted or the deadline passes. Bounded by `deadline_s`."""
    headers = {"Content-Type": FHIR_JSON, "Authorization": f"Bearer {api_key}"}
    if prefer_async:
        headers["Prefer"] = "respond-async"
    result = PostResult(key, None, None, 0, sent_at=time.monotonic())
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        result.tries += 1
        try:
            response = client.post(url, content=body, headers=headers)
        except httpx.TransportError as exc:
            result.statuses.append(type(exc).__name__)
            time.sleep(0.1)
            continue
        result.statuses.append(response.status_code)
        result.status = response.status_code
        if response.status_code in (200, 202):
            result.delivery_id, result.answered_at = delivery_id_of(response), time.monotonic()
            return result
        if response.status_code in (429, 503):  # nothing was stored: both say "again, later"
            time.sleep(0.2)
            continue
        return result  # any other answer is final for an EHR
    return result


# -- what the registry saw ----------------------------------------------------------------------------------


def receiver_accepted(receiver_url: str) -> dict[str, int]:
    return httpx.get(f"{receiver_url}/_accepted", timeout=30).json()


def receiver_receipts(receiver_url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{receiver_url}/deliveries", params={"limit": 100_000}, timeout=60).json()


def receiver_resource_count(receiver_dir: Path) -> int:
    """Read-only look into the receiver's own file: how many resources the registry holds."""
    uri = f"file:{receiver_dir / 'receiver.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM resources").fetchone()[0])


# -- what the gateway's store says ---------------------------------------------------------------------------


def wait_drained(store: Store, timeout: float, *, poll: float = 0.2) -> dict[str, int]:
    """Until nothing is queued or delivering (bounded); returns the last depth."""
    deadline = time.monotonic() + timeout
    depth = store.depth()
    while depth["queued"] + depth["delivering"] > 0 and time.monotonic() < deadline:
        time.sleep(poll)
        depth = store.depth()
    return depth


@dataclass
class Figures:
    posted: int = 0
    post_requests: int = 0
    accepted: int = 0
    delivered: int = 0
    resent: int = 0
    lost: int = 0
    duplicate_resources: int = 0
    out_of_order: int = 0
    dead: int = 0
    answers: Counter = field(default_factory=Counter)
    lost_keys: list[str] = field(default_factory=list)
    order_problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"bundles posted {self.posted} (requests {self.post_requests}), accepted {self.accepted}, "
                f"delivered {self.delivered}, re-sent {self.resent}, lost {self.lost}, duplicate resources "
                f"{self.duplicate_resources}, out of order {self.out_of_order}, dead {self.dead}; "
                f"answers {dict(sorted(self.answers.items(), key=str))}")


def account(results: list[PostResult], store: Store, receiver_url: str, receiver_dir: Path) -> Figures:
    """Compare what the EHR was told (2xx + delivery id), what the outbox holds and what the registry got."""
    fig = Figures(posted=len(results), post_requests=sum(r.tries for r in results))
    for r in results:
        fig.answers.update(str(s) for s in r.statuses)
    accepted_counts = receiver_accepted(receiver_url)
    rows = list(reversed(store.list_deliveries(limit=1_000_000)))  # oldest first = creation (seq) order
    mine = {r.delivery_id for r in results}
    fig.dead = sum(1 for d in rows if d.status == "dead" and d.id in mine)
    identifier_of: dict[str, str] = {}
    expected_resources: set[str] = set()
    for d in rows:
        full = store.get(d.id, with_payload=True)
        assert full is not None and full.payload is not None
        bundle = orjson.loads(full.payload)
        identifier_of[d.id] = f"{bundle['identifier']['system']}|{bundle['identifier']['value']}"
        expected_resources.update(e["request"]["url"] for e in bundle["entry"])
    for r in results:
        if r.status not in (200, 202):
            continue
        fig.accepted += 1
        ident = identifier_of.get(r.delivery_id or "")
        if ident is not None and accepted_counts.get(ident, 0) >= 1:
            fig.delivered += 1
        else:
            fig.lost += 1
            fig.lost_keys.append(r.key)
    fig.resent = sum(n - 1 for n in accepted_counts.values() if n > 1)
    fig.duplicate_resources = receiver_resource_count(receiver_dir) - len(expected_resources)
    posted = {identifier_of[r.delivery_id]: (r.sent_at, r.answered_at) for r in results
              if r.delivery_id in identifier_of and r.sent_at is not None and r.answered_at is not None}
    problems = order_problems(rows, identifier_of, receiver_receipts(receiver_url), posted)
    fig.out_of_order, fig.order_problems = len(problems), problems[:10]
    return fig


def order_problems(rows: list[Any], identifier_of: dict[str, str], receipts: list[dict[str, Any]],
                   posted: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """Per patient (patient_order_key): every receipt at the registry, re-sends included, must come in the
    outbox's creation order; a receipt of an older delivery after a newer one's is a problem.

    `posted` (identifier -> when the EHR sent it, when it was accepted): two posts that overlapped in time
    have no order of their own. Across two processes on PostgreSQL the later sequence number may commit
    first, and be delivered first; only a post sent after the other was accepted must arrive after it."""
    rank: dict[str, tuple[str, int]] = {}
    per_patient: dict[str, int] = defaultdict(int)
    for d in rows:  # creation order
        if d.patient_order_key is None:
            continue
        rank[identifier_of[d.id]] = (d.patient_order_key, per_patient[d.patient_order_key])
        per_patient[d.patient_order_key] += 1
    arrived: dict[str, list[tuple[int, str]]] = defaultdict(list)  # patient -> (position, identifier)
    problems = []
    for receipt in receipts:  # arrival order
        ident = receipt["identifier"]
        if ident not in rank:
            continue
        patient, position = rank[ident]
        newer = [p for p, other in arrived[patient] if p > position and _ordered(ident, other, posted)]
        if newer:
            problems.append(f"{patient}: delivery #{position} arrived after #{max(newer)}")
        arrived[patient].append((position, ident))
    return problems


def _ordered(older: str, newer: str, posted: dict[str, tuple[float, float]] | None) -> bool:
    """Whether `newer` must arrive after `older`: always, unless both posts are known and overlapped."""
    if posted is None or older not in posted or newer not in posted:
        return True
    return posted[older][1] <= posted[newer][0]


# -- memory of a process ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """VmRSS of one process every `interval` seconds, in a daemon thread (stop() ends it)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_kib(self.pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict[str, int]:
        s = self.samples or [0]
        return {"start_kib": s[0], "peak_kib": max(s), "end_kib": s[-1], "samples": len(self.samples)}


def established_connections(port: int) -> int:
    """TCP connections in state ESTABLISHED on local port `port` (IPv4 loopback), from /proc/net/tcp: the
    evidence that the load really holds that many connections open at the server."""
    count = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


class ConnectionSampler(RssSampler):
    """Every `interval` seconds: how many connections the gateway's port has ESTABLISHED."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        super().__init__(0, interval)
        self.port = port

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(established_connections(self.port))
            self._stop.wait(self.interval)


@contextlib.contextmanager
def opened_store(url: str) -> Iterator[Store]:
    store = open_store(url)
    try:
        yield store
    finally:
        store.close()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
