"""Post example bundles (or NDJSON exports) to a running gateway, as an EHR integration would."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".json", ".ndjson")))
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
    body = path.read_bytes()
    if path.suffix == ".ndjson":
        url, ctype = f"/registries/{registry}/$import", "application/fhir+ndjson"
    else:
        url, ctype = f"/registries/{registry}/Bundle", "application/fhir+json"
    try:
        response = client.post(url, content=body, headers={"Content-Type": ctype})
    except httpx.HTTPError as exc:
        return ReplayResult(path.name, 0, "error", None, type(exc).__name__)
    return _interpret(path.name, response)


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
