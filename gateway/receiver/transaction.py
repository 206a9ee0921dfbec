"""Apply a FHIR transaction Bundle to the receiver's store: all entries or none.

`PUT Type/id` upserts (so a re-delivered bundle updates instead of duplicating); `POST Type` creates with a
new id. References to an entry's `urn:uuid:` fullUrl are rewritten to the stored `Type/id`. Errors name the
entry and field, never a value.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from typing import Any

import orjson

from gateway.outcome import FhirError, Issue
from gateway.receiver.db import ReceiverDB

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def check_bundle(bundle: Any) -> list[dict[str, Any]]:
    """The entries of a transaction Bundle, or FhirError 400/422."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError.single(400, "structure", "the body must be a FHIR Bundle", "Bundle")
    if bundle.get("type") not in ("transaction", "batch"):
        raise FhirError.single(422, "value", "Bundle.type must be transaction", "Bundle.type")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError.single(400, "structure", "Bundle.entry must be a list", "Bundle.entry")
    return entries


def _plan(entries: list[dict[str, Any]]) -> tuple[list[tuple[str, str, str, dict[str, Any]]], dict[str, str]]:
    """(method, type, id, resource) per entry plus fullUrl → Type/id, validating as we go."""
    issues: list[Issue] = []
    plan: list[tuple[str, str, str, dict[str, Any]]] = []
    refs: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(request, dict):
            issues.append(Issue("required", "entry needs resource and request", (where,)))
            continue
        method = request.get("method")
        url = str(request.get("url") or "").split("?", 1)[0].strip("/")
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not _TYPE_RE.match(rtype):
            issues.append(Issue("structure", "resource has no valid resourceType", (f"{where}.resource",)))
            continue
        if method == "PUT":
            parts = url.split("/")
            if len(parts) != 2 or parts[0] != rtype or not _ID_RE.match(parts[1]):
                issues.append(
                    Issue(
                        "value",
                        "PUT url must be <resourceType>/<id> of the entry's resource",
                        (f"{where}.request.url",),
                    )
                )
                continue
            if "id" in resource and resource["id"] != parts[1]:
                issues.append(
                    Issue("value", "resource.id differs from the PUT url", (f"{where}.resource.id",))
                )
                continue
            rid = parts[1]
        elif method == "POST":
            if url != rtype:
                issues.append(Issue("value", "POST url must be the resourceType", (f"{where}.request.url",)))
                continue
            rid = uuid.uuid4().hex
        else:
            issues.append(
                Issue(
                    "not-supported", "only PUT and POST entries are supported", (f"{where}.request.method",)
                )
            )
            continue
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            refs[full_url] = f"{rtype}/{rid}"
        plan.append((method, rtype, rid, resource))
    if issues:
        raise FhirError(400, issues)
    return plan, refs


def _rewrite(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, refs) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in refs:
            out["reference"] = refs[ref]
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


def identifier_key(bundle: dict[str, Any]) -> str | None:
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return f"{ident.get('system', '')}|{ident['value']}"
    return None


def apply_transaction(db: ReceiverDB, bundle: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """Store every entry and the receipt in one SQLite transaction; return the transaction-response."""
    entries = check_bundle(bundle)
    plan, refs = _plan(entries)
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    responses: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    receipt_id = uuid.uuid4().hex
    with db.write() as conn:
        for _method, rtype, rid, resource in plan:
            row = conn.execute(
                "SELECT version FROM resources WHERE type = ? AND id = ?", (rtype, rid)
            ).fetchone()
            version = 1 if row is None else int(row[0]) + 1
            stored = _rewrite(resource, refs) if refs else dict(resource)
            stored["id"] = rid
            stored["meta"] = {**(stored.get("meta") or {}), "versionId": str(version), "lastUpdated": stamp}
            conn.execute(
                "INSERT INTO resources (type, id, version, last_updated, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (type, id) DO UPDATE SET version = excluded.version, "
                "last_updated = excluded.last_updated, body = excluded.body",
                (rtype, rid, version, stamp, orjson.dumps(stored)),
            )
            counts[rtype] += 1
            responses.append(
                {
                    "response": {
                        "status": "201 Created" if version == 1 else "200 OK",
                        "location": f"{rtype}/{rid}/_history/{version}",
                        "etag": f'W/"{version}"',
                        "lastModified": stamp,
                    }
                }
            )
        key = identifier_key(bundle)
        bundle_id = bundle.get("id") if isinstance(bundle.get("id"), str) else None
        conn.execute(
            "INSERT INTO receipts (receipt_id, bundle_id, identifier, received_at, entry_count, "
            "resource_counts, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (receipt_id, bundle_id, key, now, len(plan), orjson.dumps(dict(sorted(counts.items()))), raw),
        )
        if key is not None:
            conn.execute(
                "INSERT INTO accepted (identifier, count) VALUES (?, 1) "
                "ON CONFLICT (identifier) DO UPDATE SET count = count + 1",
                (key,),
            )
    return {
        "resourceType": "Bundle",
        "id": receipt_id,
        "type": f"{bundle['type']}-response",
        "entry": responses,
    }
