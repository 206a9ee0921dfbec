"""The privacy proof: nothing that identifies a patient of the input is logged, stored or answered.

The whole flow runs through the gateway as an OS process with DEBUG logging: every example bundle and every
Bundle/Patient of the shared corpus, objections through `POST /objections`, a dead letter (the registry
answers 400) and its requeue, and a TTP outage. Then every log line (the gateway process' log and this
process' log records of the TTP and the receiver), every row of every table of the gateway's SQLite store
(outbox payloads and audit rows included), every response body and every line of /metrics is scanned for
the inputs' names, BSNs, identifiers, telecom, streets and postcodes (tests/identity.py), for every
11-proef-valid 9-digit number of the inputs, for the patient numbers used in objections, a BSN planted
only in query strings, and the API and TTP keys. Zero hits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gateway.service.logs import JsonFormatter
from gateway.serving import serve_in_thread
from tests.identity import identifying_values
from tests.processes import MRN_SYSTEM, process_chain

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CORPUS = Path("/work/shared/corpus")
REGISTRY = "example-generic"
FHIR = {"Content-Type": "application/fhir+json"}
BSN_LIKE = re.compile(rb"(?<![0-9])[0-9]{9}(?![0-9])")
# A short value is only a hit as a whole token: inside random base64url pseudonyms and hex digests any
# 4-6 character string turns up by chance once there are megabytes of them.
TOKEN_EDGE = "A-Za-z0-9_-"


def elfproef(digits: str) -> bool:
    """The BSN check: sum of digit * weight (9..2, then -1 for the last) divisible by 11."""
    if len(digits) != 9 or digits == "000000000":
        return False
    total = sum(int(d) * w for d, w in zip(digits, (9, 8, 7, 6, 5, 4, 3, 2, -1), strict=True))
    return total % 11 == 0


# --- inputs -----------------------------------------------------------------------------------------------

def corpus_inputs() -> list[tuple[str, dict[str, Any]]]:
    """Every Bundle and Patient of the corpus (JSON files and the Patient NDJSON files), by name."""
    found: list[tuple[str, dict[str, Any]]] = []
    if not CORPUS.is_dir():
        return found
    for path in sorted(CORPUS.rglob("*.json")):
        with contextlib.suppress(ValueError):
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("resourceType") in ("Bundle", "Patient"):
                found.append((str(path.relative_to(CORPUS)), doc))
    for path in sorted(CORPUS.rglob("Patient*.ndjson")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                found.append((f"{path.relative_to(CORPUS)}#{n}", json.loads(line)))
    return found


def as_delivery(doc: dict[str, Any], number: str) -> dict[str, Any]:
    """What an EHR would post: a Patient goes in a transaction Bundle; every Patient gets the hospital's
    patient number (the register opt-out needs it and fails closed without it: then nothing would flow)."""
    if doc.get("resourceType") == "Patient":
        doc = {"resourceType": "Bundle", "type": "transaction",
               "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": doc,
                          "request": {"method": "POST", "url": "Patient"}}]}
    for n, entry in enumerate(doc.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            idents = resource.setdefault("identifier", [])
            if not any(isinstance(i, dict) and i.get("system") == MRN_SYSTEM for i in idents):
                idents.append({"system": MRN_SYSTEM, "value": f"{number}-{n}"})
    return doc


def with_new_patient_numbers(doc: dict[str, Any], prefix: str) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for n, entry in enumerate(doc.get("entry") or []):
        if entry["resource"]["resourceType"] != "Patient":
            continue
        for ident in entry["resource"].get("identifier") or []:
            if ident.get("system") == MRN_SYSTEM:
                ident["value"] = f"{prefix}-{n}"
    return doc


@dataclass
class Needles:
    """What must not be found, and how it is matched."""

    values: dict[str, str] = field(default_factory=dict)  # value → kind
    public: str = ""  # text that is the gateway's own (config, registry and profile names)

    def add(self, kind: str, value: str) -> None:
        # a Patient.id like "example" also occurs in "example-generic": a value that is part of the gateway's
        # own configuration text identifies nobody there
        if value and value not in self.public:
            self.values.setdefault(value, kind)

    def compile(self) -> re.Pattern[str]:
        parts = []
        for value in sorted(self.values, key=len, reverse=True):
            escaped = re.escape(value)
            parts.append(escaped if len(value) > 6 else f"(?<![{TOKEN_EDGE}]){escaped}(?![{TOKEN_EDGE}])")
        return re.compile("|".join(parts))


@dataclass
class Scan:
    pattern: re.Pattern[str]
    needles: Needles
    counts: dict[str, int] = field(default_factory=dict)
    hits: list[tuple[str, str, str]] = field(default_factory=list)  # (where, kind, excerpt)

    def text(self, where: str, text: str, unit: str) -> None:
        self.counts[unit] = self.counts.get(unit, 0) + 1
        for match in self.pattern.finditer(text):
            value = match.group(0)
            start = max(match.start() - 40, 0)
            self.hits.append((where, self.needles.values.get(value, "?"), text[start:match.end() + 40]))


# --- a TTP that can go down ---------------------------------------------------------------------------------

class SwitchableTTP:
    """A pass-through proxy in front of the real TTP: `down` makes it answer 503 like a TTP in maintenance."""

    def __init__(self, target: str) -> None:
        self.target, self.down, self.refused = target, False, 0
        self.app = FastAPI()
        self.app.add_api_route("/{path:path}", self.forward, methods=["GET", "POST", "PUT", "DELETE"])

    async def forward(self, path: str, request: Request) -> Response:
        if self.down:
            self.refused += 1
            return Response(b'{"resourceType": "OperationOutcome", "issue": []}', status_code=503,
                            media_type="application/fhir+json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as client:
            upstream = await client.request(request.method, "/" + path, params=request.query_params,
                                            content=await request.body(), headers=headers)
        keep = {k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
        return Response(upstream.content, status_code=upstream.status_code, headers=keep)


class Collect(logging.Handler):
    """This process' log records (TTP, receiver, httpx), formatted as the gateway formats its own."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # httpx/httpcore records here are this test's own clients (and the TTP proxy): they log the URLs the
        # test asks for, query strings included. The gateway's outbound httpx lines are in its own log.
        if not record.name.startswith(("httpx", "httpcore")):
            self.lines.append(self.format(record))


@contextlib.contextmanager
def collected_logs() -> Iterator[Collect]:
    handler, root = Collect(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- the flow ---------------------------------------------------------------------------------------------

def test_nothing_identifying_is_logged_stored_or_answered(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [(p.name, json.loads(p.read_text())) for p in sorted(EXAMPLES.glob("*.json"))]
    inputs += [(name, as_delivery(doc, f"PRIV-{n:04d}")) for n, (name, doc) in enumerate(corpus_inputs())]
    assert len(inputs) >= 20, "the corpus is expected under /work/shared/corpus"
    answers: list[tuple[str, str]] = []  # (what, body and headers)
    outage_doc = with_new_patient_numbers(inputs[0][1], "OUTAGE")

    with collected_logs() as test_logs, process_chain(tmp_path, registries=(REGISTRY,)) as pc:
        ttp = SwitchableTTP(pc.ttp_url)
        with serve_in_thread(ttp.app) as ttp_proxy:
            config = yaml.safe_load(pc.config_path.read_text())
            config["ttp"]["url"] = ttp_proxy
            pc.config_path.write_text(yaml.safe_dump(config))
            gw = pc.start_gateway(log_level="DEBUG")
            client = httpx.Client(base_url=gw.url, timeout=120,
                                  headers={"Authorization": f"Bearer {pc.ehr_api_key}"})
            admin = {"Authorization": f"Bearer {pc.admin_api_key}"}

            def keep(what: str, response: httpx.Response) -> httpx.Response:
                assert response.status_code < 500 or response.status_code == 503, (what, response.text[:500])
                headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
                answers.append((what, response.text + "\n" + headers))
                return response

            def post(name: str, doc: dict[str, Any], **headers: str) -> httpx.Response:
                response = client.post(f"/registries/{REGISTRY}/Bundle", content=json.dumps(doc),
                                       headers={**FHIR, **headers})
                return keep(f"POST {name}", response)

            # objections first: two patients of the examples and one of the corpus are in the register
            objected = ["P0001234", "X42", "PRIV-0003-0"]
            for number in objected:
                keep("objection", client.post("/objections", json={"patientNumber": number,
                                                                   "registry": REGISTRY}))
            keep("withdraw", client.post("/objections/$withdraw",
                                         json={"patientNumber": "X42", "registry": REGISTRY}))

            statuses: dict[str, int] = {}
            for name, doc in inputs:
                response = post(name, doc)
                statuses[name] = response.status_code
                if name.startswith("02-"):  # P0001234 objected, X42 withdrawn: exactly one patient dropped
                    counts = {p["name"]: p.get("valueInteger") for p in response.json()["parameter"]}
                    assert counts["patientsDroppedOptOut"] == 1, response.text
            delivered = [n for n, s in statuses.items() if s in (200, 202)]
            assert len(delivered) >= 10, statuses

            # a dead letter: the registry refuses once with 400; then the EHR requeues it
            httpx.post(f"{pc.receiver_url}/_faults", json={"status": 400, "count": 1})
            dead = post("dead letter", inputs[1][1], **{"Idempotency-Key": "privacy-dead-letter"})
            assert dead.status_code == 422, dead.text
            dead_id = dead.headers["Content-Location"].rsplit("/", 1)[1]
            keep("dead list", client.get("/deliveries", params={"status": "dead"}))
            keep("requeue", client.post(f"/deliveries/{dead_id}/$requeue"))

            # a TTP outage: the gateway answers 503 and stores nothing; afterwards it works again. The
            # patients get new hospital numbers: pseudonyms seen before may come from the gateway's cache.
            ttp.down = True
            outage = post("ttp outage", outage_doc, **{"Idempotency-Key": "privacy-ttp-outage"})
            assert outage.status_code == 503 and ttp.refused > 0, outage.text
            keep("readyz during outage", httpx.get(f"{gw.url}/readyz"))
            ttp.down = False
            after = post("after outage", outage_doc, **{"Idempotency-Key": "privacy-after"})
            assert after.status_code == 200, after.text

            # query strings with values must not reach any log (uvicorn's access log is off; ours logs routes)
            probe = "999911120"  # 11-proef-valid, in no input: a planted BSN that only a query string carries
            keep("query", client.get("/deliveries", params={"status": "dead", "registry": probe}))
            keep("query 2", client.get(f"/deliveries/{probe}", params={"patient": probe}))

            wait_until_settled(client)
            for d in keep("list", client.get("/deliveries", params={"limit": 1000})).json():
                keep("status", client.get(f"/deliveries/{d['id']}"))
            keep("admin list", client.get("/admin/deliveries", params={"limit": 1000}, headers=admin))
            keep("audit", client.get("/admin/audit", params={"limit": 10000}, headers=admin))
            keep("record", client.get(f"/admin/processing-record/{REGISTRY}", headers=admin))
            keep("metadata", client.get("/metadata"))
            metrics = keep("metrics", client.get("/metrics", headers=admin)).text
            client.close()
            gw.kill(signal.SIGTERM)  # graceful: the log is complete and the WAL checkpointed
        gateway_log = gw.logs().splitlines()
        receiver_files = [p for p in (tmp_path / "receiver").rglob("*") if p.is_file()]
        receiver_text = [(str(p), p.read_text(errors="replace")) for p in receiver_files]
    test_log = list(test_logs.lines)
    ehr_key, admin_key, ttp_key = pc.ehr_api_key, pc.admin_api_key, pc.env["TEST_TTP_KEY"]

    # --- what must not be found ---------------------------------------------------------------------------
    public = pc.config_path.read_text() + " ".join([REGISTRY, MRN_SYSTEM, "example-cancer-registry"])
    needles = Needles(public=public)
    for _, doc in [*inputs, ("outage", outage_doc)]:
        organisational = organisation_addresses(doc)
        for kind, value in identifying_values(doc):
            if not (kind in ("postcode", "street") and value in organisational):
                needles.add(kind, value)
        codes = set(coded_values(doc))  # a narrative cites its codes: "Vinger (125685002 - SNOMED CT)"
        for number in bsn_like(doc):
            if number not in codes:
                needles.add("bsn-pattern", number)
    for number in objected:
        needles.add("objection", number)
    needles.add("planted-bsn", probe)
    # and no credential: the EHR and admin keys, the gateway's TTP key
    for kind, secret in (("ehr-key", ehr_key), ("admin-key", admin_key), ("ttp-key", ttp_key)):
        needles.add(kind, secret)
    assert len(needles.values) > 100, len(needles.values)
    scan = Scan(needles.compile(), needles)
    control = Scan(scan.pattern, needles)  # the scanner finds what it looks for in the raw inputs
    for name, doc in inputs:
        control.text(name, json.dumps(doc, ensure_ascii=False), "inputs")
    assert {"name", "identifier", "street", "postcode", "telecom"} <= {kind for _, kind, _ in control.hits}

    # --- where it must not be -----------------------------------------------------------------------------
    assert any('"level": "DEBUG"' in line or '"level":"DEBUG"' in line for line in gateway_log), \
        "the gateway must have logged at DEBUG"
    assert not [line for line in gateway_log if "uvicorn.access" in line]
    # the requests with planted query values were logged, as their route template
    assert any('"route":"/deliveries/{delivery_id}"' in line for line in gateway_log)
    for line in gateway_log:
        scan.text("gateway log", line, "log lines (gateway process)")
    for line in test_log:
        scan.text("test-process log", line, "log lines (TTP, receiver, clients)")
    for what, text in answers:
        scan.text(f"response {what}", text, "responses")
    for line in metrics.splitlines():
        scan.text("metrics", line, "metrics lines")
    for name, text in receiver_text:
        scan.text(f"receiver {name}", text, "receiver files")
    tables = scan_store(tmp_path / "gateway.db", scan)

    # the payloads were really there to scan: pseudonymised bundles, not empty rows
    assert scan.counts.get("pseudonymised payloads", 0) >= len(delivered)
    summary = ", ".join(f"{unit}: {n}" for unit, n in sorted(scan.counts.items()))
    with capsys.disabled():  # the figures are part of the proof: shown without -s
        print(f"\nprivacy scan: {len(needles.values)} identifying values of {len(inputs)} inputs; "
              f"answers to the inputs {dict(Counter(statuses.values()))}; tables {tables}; {summary}; "
              f"hits: {len(scan.hits)}")
    assert scan.hits == [], scan.hits[:20]


def organisation_addresses(doc: Any) -> set[str]:
    """Streets and postcodes of Organizations and Locations: a hospital's address, even when a patient lives
    in the same postcode (Synthea's Beverly, MA), identifies the hospital, which the registry may know."""
    found: set[str] = set()
    for entry in doc.get("entry") or [] if isinstance(doc, dict) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") in ("Organization", "Location"):
            addresses = resource.get("address")
            for address in addresses if isinstance(addresses, list) else [addresses] if addresses else []:
                found |= set(address.get("line") or [])
                if isinstance(address.get("postalCode"), str):
                    found |= {address["postalCode"], address["postalCode"].replace(" ", "")}
    return found


def bsn_like(node: Any, key: str = "") -> Iterator[str]:
    """Every 11-proef-valid 9-digit number in an input's strings, wherever it sits (identifier, text, note),
    except coded values: SNOMED CT codes are 9-digit numbers too, and pass the 11-proef by chance."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from bsn_like(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from bsn_like(v, key)
    elif isinstance(node, str) and key not in ("code", "version", "system"):
        for number in BSN_LIKE.findall(node.encode()):
            if elfproef(number.decode()):
                yield number.decode()


def coded_values(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "code" and isinstance(v, str):
                yield v
            else:
                yield from coded_values(v)
    elif isinstance(node, list):
        for v in node:
            yield from coded_values(v)


def scan_store(path: Path, scan: Scan) -> list[str]:
    """Every row of every table, every column (BLOB payloads decoded as UTF-8)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite_master
                text = "\t".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                                 for v in row)
                scan.text(f"store {table}", text, f"rows ({table})")
                if table == "deliveries" and "PSEUDED" in text:  # the payload is there, pseudonymised
                    scan.counts["pseudonymised payloads"] = scan.counts.get("pseudonymised payloads", 0) + 1
                scan.counts["rows (all tables)"] = scan.counts.get("rows (all tables)", 0) + 1
    assert {"deliveries", "audit_events", "optout_register"} <= set(tables), tables
    return tables


def wait_until_settled(client: httpx.Client, timeout: float = 60.0) -> None:
    """Until no delivery is queued or in flight (the requeued dead letter goes out again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [d for d in client.get("/deliveries", params={"limit": 1000}).json()
                   if d["status"] in ("queued", "delivering")]
        if not pending:
            return
        time.sleep(0.1)
    pytest.fail("deliveries still pending")
