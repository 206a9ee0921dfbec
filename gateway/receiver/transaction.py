"""Apply a FHIR transaction Bundle to the receiver's store: all entries or none.

`PUT Type/id` upserts (so a re-delivered bundle updates instead of duplicating); `POST Type` creates with a
new id. References to an entry's `urn:uuid:` fullUrl are rewritten to the stored `Type/id`. Errors name the
entry and field, never a value.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
import uuid
from collections import Counter
from typing import Any

import orjson

from gateway.outcome import FhirError, Issue
from gateway.receiver.db import ReceiverDB

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# A property named "reference" with a string value, in orjson's compact output. The value may contain
# escapes, which the unrolled `[^"\\]*(\\.[^"\\]*)*` steps over, so its closing quote is the real one. The
# pattern starts with a literal so the regex engine can scan for it quickly (a look-behind in front is four
# times slower); `_rewrite_references` checks the byte before it instead.
_REFERENCE = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')
# Ids per `IN (...)` query: old SQLite builds allow at most 999 bound parameters per statement.
_IDS_PER_QUERY = 900
_BACKSLASH = ord("\\")


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


def identifier_key(bundle: dict[str, Any]) -> str | None:
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return f"{ident.get('system', '')}|{ident['value']}"
    return None


def apply_transaction(db: ReceiverDB, bundle: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """Store every entry and the receipt in one SQLite transaction; return the transaction-response.

    The same Bundle (identifier and bytes) applied before is a delivery sent again (the gateway lost the
    answer in a crash, or a lease ran out): it is counted (`/_accepted`) and answered with the first
    response, and not applied again, so the registry holds each delivery once (an idempotent consumer).
    Other content under a known identifier is applied (upserts)."""
    entries = check_bundle(bundle)
    key = identifier_key(bundle)
    digest = hashlib.sha256(raw).digest()
    plan, refs = _plan(entries)
    encoded_refs = {_json_text(url): _json_text(target) for url, target in refs.items()}
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    responses: list[dict[str, Any]] = []
    rows: list[tuple[str, str, int, str, bytes]] = []
    receipt_id = uuid.uuid4().hex
    with db.write() as conn:  # BEGIN IMMEDIATE: two copies sent at once are applied one after the other
        if key is not None:
            row = conn.execute(
                "SELECT body_sha256, response FROM accepted WHERE identifier = ?", (key,)
            ).fetchone()
            if row is not None and row[0] == digest and row[1] is not None:
                conn.execute("UPDATE accepted SET count = count + 1 WHERE identifier = ?", (key,))
                return orjson.loads(row[1])
        versions = _current_versions(conn, [(rtype, rid) for _method, rtype, rid, _resource in plan])
        for _method, rtype, rid, resource in plan:
            version = versions.get((rtype, rid), 0) + 1
            versions[(rtype, rid)] = version  # the same resource twice in one Bundle counts on from here
            body = _stored_body(resource, rid, version, stamp, encoded_refs)
            rows.append((rtype, rid, version, stamp, body))
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
        # In Bundle order: a resource that appears twice ends as its last entry, as with one insert each.
        conn.executemany(
            "INSERT INTO resources (type, id, version, last_updated, body) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (type, id) DO UPDATE SET version = excluded.version, "
            "last_updated = excluded.last_updated, body = excluded.body",
            rows,
        )
        counts = Counter(rtype for _method, rtype, _rid, _resource in plan)
        bundle_id = bundle.get("id") if isinstance(bundle.get("id"), str) else None
        conn.execute(
            "INSERT INTO receipts (receipt_id, bundle_id, identifier, received_at, entry_count, "
            "resource_counts, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (receipt_id, bundle_id, key, now, len(plan), orjson.dumps(dict(sorted(counts.items()))), raw),
        )
        response = {"resourceType": "Bundle", "id": receipt_id, "type": f"{bundle['type']}-response"}
        response["entry"] = responses
        if key is not None:
            conn.execute(
                "INSERT INTO accepted (identifier, count, body_sha256, response) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (identifier) DO UPDATE SET count = count + 1, "
                "body_sha256 = excluded.body_sha256, response = excluded.response",
                (key, digest, orjson.dumps(response)),
            )
    return response


def _current_versions(conn: sqlite3.Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The stored version of each (type, id) that exists, with one query per type and chunk of ids instead
    of one per entry."""
    ids_by_type: dict[str, dict[str, None]] = {}
    for rtype, rid in keys:
        ids_by_type.setdefault(rtype, {})[rid] = None  # a dict: unique ids in a stable order
    versions: dict[tuple[str, str], int] = {}
    for rtype, unique_ids in ids_by_type.items():
        ids = list(unique_ids)
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            placeholders = ",".join("?" * len(chunk))
            sql = f"SELECT id, version FROM resources WHERE type = ? AND id IN ({placeholders})"
            found = conn.execute(sql, (rtype, *chunk))
            versions.update(((rtype, rid), int(version)) for rid, version in found)
    return versions


def _stored_body(
    resource: dict[str, Any], rid: str, version: int, stamp: str, refs: dict[bytes, bytes]
) -> bytes:
    """The resource as stored: its id and meta set (a shallow copy: the Bundle is not changed), serialised
    once, then the references to entries' fullUrls rewritten in the bytes."""
    meta = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": stamp}
    body = orjson.dumps({**resource, "id": rid, "meta": meta})
    return _rewrite_references(body, refs) if refs else body


def _rewrite_references(body: bytes, refs: dict[bytes, bytes]) -> bytes:
    """Replace every `"reference":"<fullUrl>"` in orjson output, at any depth, by the entry's `Type/id`.

    Inside a JSON string every quote is escaped, so a match is a real property named reference unless the
    byte before it is a backslash (a name ending in `"reference`, whose value the match then spans exactly).
    `refs` maps JSON-encoded text to JSON-encoded text (`_json_text`): orjson writes a given string always
    the same way, so a value with escapes is compared exactly without decoding it.
    """

    def swap(match: re.Match[bytes]) -> bytes:
        target = refs.get(match[1])
        if target is None or body[match.start() - 1] == _BACKSLASH:
            return match[0]
        return b'"reference":"' + target + b'"'

    return _REFERENCE.sub(swap, body)


def _json_text(text: str) -> bytes:
    """A string as orjson writes it between the quotes."""
    return orjson.dumps(text)[1:-1]
