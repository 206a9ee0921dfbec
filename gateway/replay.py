"""Post example bundles (or NDJSON exports) to a running gateway, as an EHR integration would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson


@dataclass
class ReplayResult:
    file: str
    status: int
    outcome: str  # delivered | queued | nothing-to-deliver | rejected | error
    delivery: str | None
    detail: str  # counts or the OperationOutcome's diagnostics (never a value: the gateway writes none)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Each bundle file; a folder's bundles, and its NDJSON files as ONE export (the folder itself): a Bulk
    Data export is one file per resource type, and one type alone is no delivery (a probe's replay posted
    Condition.ndjson as a job of its own)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix == ".json"))
            if any(p.suffix == ".ndjson" for p in path.iterdir()):
                files.append(path)
        else:
            files.append(path)
    return files


def replay(
    files: list[Path],
    *,
    base_url: str,
    registry: str,
    api_key: str,
    respond_async: bool = False,
    timeout: float = 120.0,
    on_done: Callable[[ReplayResult], None] | None = None,
) -> list[ReplayResult]:
    headers = {"Authorization": f"Bearer {api_key}"}
    if respond_async:
        headers["Prefer"] = "respond-async"
    results = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
        for path in files:
            result = _post_one(client, path, registry)
            results.append(result)
            if on_done:
                on_done(result)
    return results


def _post_one(client: httpx.Client, path: Path, registry: str) -> ReplayResult:
    name = f"{path.name}/" if path.is_dir() else path.name
    export = path.is_dir() or path.suffix == ".ndjson"
    if export:
        url, ctype = f"/registries/{registry}/$import", "application/fhir+ndjson"
    else:
        url, ctype = f"/registries/{registry}/Bundle", "application/fhir+json"
    try:
        body = _ndjson(path) if export else path.read_bytes()
        response = client.post(url, content=body, headers={"Content-Type": ctype})
        if export and response.status_code == 202 and "Content-Location" in response.headers:
            return _job_result(name, _wait_for_job(client, response.headers["Content-Location"]))
    except httpx.HTTPError as exc:
        return ReplayResult(name, 0, "error", None, type(exc).__name__)
    return _interpret(name, response)


def _ndjson(path: Path) -> Iterator[bytes]:
    """The export's lines, file after file (streamed: an export need not fit in memory)."""
    for file in sorted(path.glob("*.ndjson")) if path.is_dir() else [path]:
        last = b"\n"
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                last = chunk[-1:]
                yield chunk
        if last != b"\n":
            yield b"\n"


def _wait_for_job(client: httpx.Client, location: str, poll: float = 0.5) -> httpx.Response:
    """The bulk job's status once it is done (`GET /bulk/{job}` answers 202 while it runs)."""
    while True:
        response = client.get(location)
        if response.status_code != 202:
            return response
        time.sleep(poll)


def _job_result(name: str, response: httpx.Response) -> ReplayResult:
    if response.status_code != 200:
        return _interpret(name, response)
    status = orjson.loads(response.content)
    summary = status.get("summary") or {}
    parts = [
        f"patients {summary.get('patients', 0)}",
        f"opted out {summary.get('patientsOptedOut', 0)}",
        f"Bundles {summary.get('bundles', 0)}",
    ]
    if status.get("error"):
        parts.append(str(status["error"]))
    state, job = str(status.get("state")), status.get("job")
    return ReplayResult(name, response.status_code, state, job, ", ".join(parts))


def _interpret(name: str, response: httpx.Response) -> ReplayResult:
    try:
        body = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        body = {}
    if body.get("resourceType") == "OperationOutcome":
        texts = [
            f"{i.get('code')}: {i.get('diagnostics', '')} {','.join(i.get('expression', []))}".strip()
            for i in body.get("issue", [])[:3]
        ]
        return ReplayResult(name, response.status_code, "rejected", None, "; ".join(texts))
    params = (
        {p.get("name"): p for p in body.get("parameter", [])}
        if body.get("resourceType") == "Parameters"
        else {}
    )
    status = params.get("status", {}).get("valueCode", "error" if response.status_code >= 400 else "?")
    delivery = params.get("delivery", {}).get("valueString")
    return ReplayResult(name, response.status_code, status, delivery, _summary(params))


_SHORT = {
    "patients": "patients",
    "patientsDroppedOptOut": "opted out",
    "patientsDroppedUnknownOptOut": "opt-out unknown",
    "patientsDroppedNoPseudonym": "no pseudonym",
    "resourcesIn": "resources in",
    "resourcesDelivered": "delivered",
}


def _summary(params: dict[str, dict]) -> str:
    """Counts worth reading: zero drops are left out."""
    parts = []
    for name, label in _SHORT.items():
        value = params.get(name, {}).get("valueInteger")
        if value or (value == 0 and name in ("patients", "resourcesDelivered")):
            parts.append(f"{label} {value}")
    types = params.get("pseudonymTypes", {}).get("part", [])
    if types:
        parts.append("pseudonyms " + ",".join(p["name"] for p in types))
    return ", ".join(parts)
