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
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

import orjson

from gateway.outcome import FhirError, Issue
from gateway.receiver.db import ReceiverDB

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}\Z")  # \Z: "$" would let a final newline in
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}\Z")

# A property named "reference" with a string value, in orjson's compact output. The value may contain
# escapes, which the unrolled `[^"\\]*(\\.[^"\\]*)*` steps over, so its closing quote is the real one. The
# pattern starts with a literal so the regex engine can scan for it quickly (a look-behind in front is four
# times slower); `_rewrite_escaped` checks the byte before it instead. `_rewrite_references` cuts at `_HEAD`.
_REFERENCE = re.compile(rb'"reference":"([^"\\]*(?:\\.[^"\\]*)*)"')
_HEAD = b'"reference":"'
_ESCAPED_HEAD = b'\\"reference":"'
# Ids per `IN (...)` query: old SQLite builds allow at most 999 bound parameters per statement.
_IDS_PER_QUERY = 900
_BACKSLASH = ord("\\")
_VALUE, _REST = itemgetter(0), itemgetter(2)

Planned = tuple[str, str, str, dict[str, Any]]  # method, type, id, resource


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


def _plan(entries: list[dict[str, Any]]) -> tuple[list[Planned], dict[str, str]]:
    """(method, type, id, resource) per entry plus fullUrl → Type/id, validating as we go."""
    issues: list[Issue] = []
    plan: list[Planned] = []
    refs: dict[str, str] = {}
    types: set[str] = set()  # that passed _TYPE_RE: a Bundle has a few types, each many times
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(request, dict):
            issues.append(Issue("required", "entry needs resource and request", (f"Bundle.entry[{i}]",)))
            continue
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or (rtype not in types and not _TYPE_RE.match(rtype)):
            issues.append(
                Issue("structure", "resource has no valid resourceType", (f"Bundle.entry[{i}].resource",))
            )
            continue
        types.add(rtype)
        if "meta" in resource and not isinstance(resource["meta"], dict):  # it is merged with ours
            issues.append(Issue("structure", "meta must be an object", (f"Bundle.entry[{i}].resource.meta",)))
            continue
        method = request.get("method")
        rid = resource.get("id")
        target = f"{rtype}/{rid}" if isinstance(rid, str) else None
        # The usual PUT: its url is exactly Type/id and the id is valid, so it has no query, slash or other id
        # for _entry_id to find (the same outcome, without splitting the url).
        if method != "PUT" or target is None or request.get("url") != target or not _ID_RE.match(rid):
            found = _entry_id(i, method, request, rtype, resource)
            if isinstance(found, Issue):
                issues.append(found)
                continue
            rid, target = found, f"{rtype}/{found}"
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            refs[full_url] = target
        plan.append((method, rtype, rid, resource))
    if issues:
        raise FhirError(400, issues)
    return plan, refs


def _entry_id(
    i: int, method: Any, request: dict[str, Any], rtype: str, resource: dict[str, Any]
) -> str | Issue:
    """The id an entry is stored under (a new one for POST), or what is wrong with its request."""
    where = f"Bundle.entry[{i}]"
    url = str(request.get("url") or "").split("?", 1)[0].strip("/")
    if method == "PUT":
        parts = url.split("/")
        if len(parts) != 2 or parts[0] != rtype or not _ID_RE.match(parts[1]):
            return Issue(
                "value",
                "PUT url must be <resourceType>/<id> of the entry's resource",
                (f"{where}.request.url",),
            )
        if "id" in resource and resource["id"] != parts[1]:
            return Issue("value", "resource.id differs from the PUT url", (f"{where}.resource.id",))
        return parts[1]
    if method == "POST":
        if url != rtype:
            return Issue("value", "POST url must be the resourceType", (f"{where}.request.url",))
        return uuid.uuid4().hex
    return Issue("not-supported", "only PUT and POST entries are supported", (f"{where}.request.method",))


def identifier_key(bundle: dict[str, Any]) -> str | None:
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return f"{ident.get('system', '')}|{ident['value']}"
    return None


def apply_transaction(db: ReceiverDB, bundle: dict[str, Any], raw: bytes) -> bytes:
    """Store every entry and the receipt in one SQLite transaction; return the transaction-response (JSON).

    The same Bundle (identifier and bytes) applied before is a delivery sent again (the gateway lost the
    answer in a crash, or a lease ran out): it is counted (`/_accepted`) and answered with the first
    response, and not applied again, so the registry holds each delivery once (an idempotent consumer).
    Other content under a known identifier is applied (upserts)."""
    entries = check_bundle(bundle)
    key = identifier_key(bundle)
    digest = hashlib.sha256(raw).digest()
    plan, refs = _plan(entries)
    encoded_refs = dict(zip(_json_texts(list(refs)), _json_texts(list(refs.values())), strict=True))
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    receipt_id = uuid.uuid4().hex
    with db.write() as conn:  # BEGIN IMMEDIATE: two copies sent at once are applied one after the other
        if key is not None:
            row = conn.execute(
                "SELECT body_sha256, response FROM accepted WHERE identifier = ?", (key,)
            ).fetchone()
            if row is not None and row[0] == digest and row[1] is not None:
                conn.execute("UPDATE accepted SET count = count + 1 WHERE identifier = ?", (key,))
                return bytes(row[1])
        typed_ids = [(rtype, rid) for _method, rtype, rid, _resource in plan]
        versions = _current_versions(conn, typed_ids)
        numbers = []
        for typed_id in typed_ids:
            version = versions.get(typed_id, 0) + 1
            versions[typed_id] = version  # the same resource twice in one Bundle counts on from here
            numbers.append(version)
        bodies = _stored_bodies(plan, numbers, stamp, encoded_refs)
        # In Bundle order: a resource that appears twice ends as its last entry, as with one insert each.
        conn.executemany(
            "INSERT INTO resources (type, id, version, last_updated, body) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (type, id) DO UPDATE SET version = excluded.version, "
            "last_updated = excluded.last_updated, body = excluded.body",
            [
                (rtype, rid, version, stamp, body)
                for (rtype, rid), version, body in zip(typed_ids, numbers, bodies, strict=True)
            ],
        )
        counts = Counter(rtype for rtype, _rid in typed_ids)
        bundle_id = bundle.get("id") if isinstance(bundle.get("id"), str) else None
        conn.execute(
            "INSERT INTO receipts (receipt_id, bundle_id, identifier, received_at, entry_count, "
            "resource_counts, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (receipt_id, bundle_id, key, now, len(plan), orjson.dumps(dict(sorted(counts.items()))), raw),
        )
        response = _response(receipt_id, f"{bundle['type']}-response", typed_ids, numbers, stamp)
        if key is not None:
            conn.execute(
                "INSERT INTO accepted (identifier, count, body_sha256, response) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (identifier) DO UPDATE SET count = count + 1, "
                "body_sha256 = excluded.body_sha256, response = excluded.response",
                (key, digest, response),
            )
    return response


def _response(
    receipt_id: str, kind: str, typed_ids: list[tuple[str, str]], versions: list[int], stamp: str
) -> bytes:
    """The transaction-response as orjson writes it, built as bytes: entries that differ only in location
    and version need no dict each, and it is serialised once for both the store and the answer.

    It is `{"resourceType": "Bundle", "id": receipt_id, "type": kind, "entry": [{"response": {"status":
    ..., "location": "Type/id/_history/<version>", "etag": 'W/"<version>"', "lastModified": stamp}}, ...]}`.
    """
    locations = _json_texts(
        [
            f"{rtype}/{rid}/_history/{version}"
            for (rtype, rid), version in zip(typed_ids, versions, strict=True)
        ]
    )
    heads: dict[int, bytes] = {}
    tails: dict[int, bytes] = {}
    for version in set(versions):
        status = b"201 Created" if version == 1 else b"200 OK"
        heads[version] = b'{"response":{"status":"%s","location":"' % status
        tails[version] = b'","etag":"W/\\"%d\\"","lastModified":"%s"}}' % (version, stamp.encode())
    entries = [
        heads[version] + location + tails[version]
        for version, location in zip(versions, locations, strict=True)
    ]
    head = b'{"resourceType":"Bundle","id":%s,"type":%s,"entry":[' % (
        orjson.dumps(receipt_id),
        orjson.dumps(kind),
    )
    return head + b",".join(entries) + b"]}"


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


def _stored_bodies(
    plan: list[Planned], versions: list[int], stamp: str, refs: dict[bytes, bytes]
) -> list[bytes]:
    """The resources as stored: each with its id and meta set (the Bundle is not changed), serialised once,
    then the references to entries' fullUrls rewritten in the bytes."""
    tails: dict[int, bytes] = {}
    bodies = []
    for (_method, _rtype, rid, resource), version in zip(plan, versions, strict=True):
        if "meta" in resource or resource.get("id") != rid:
            bodies.append(_stored_body(resource, rid, version, stamp))
            continue
        # The usual resource has its id and no meta, which `{**resource, "meta": meta}` adds at the end: the
        # same bytes without copying the resource.
        tail = tails.get(version)
        if tail is None:
            meta = {"versionId": str(version), "lastUpdated": stamp}
            tail = tails[version] = b',"meta":' + orjson.dumps(meta) + b"}"
        bodies.append(orjson.dumps(resource)[:-1] + tail)
    return _rewrite_references(bodies, refs) if refs else bodies


def _stored_body(resource: dict[str, Any], rid: str, version: int, stamp: str) -> bytes:
    """The resource with its id and meta set, through a shallow copy: the Bundle is not changed."""
    meta = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": stamp}
    return orjson.dumps({**resource, "id": rid, "meta": meta})


def _rewrite_references(bodies: list[bytes], refs: dict[bytes, bytes]) -> list[bytes]:
    """`_rewrite_escaped` over all bodies at once, without a Python call per reference where that is exact.

    The bodies are joined by newlines (orjson writes none) and cut at each `"reference":"`. Up to the next
    quote is then the whole value unless the value holds a backslash (an escape, maybe of a quote), and the
    match is a property named reference unless a backslash comes before it: with either anywhere, the regex
    and its checks per match do it. Else the values are looked up and put back by C-level map, zip and join.
    """
    joined = b"\n".join(bodies)
    head, *parts = joined.split(_HEAD)
    cuts = list(map(bytes.partition, parts, repeat(b'"')))  # (value, closing quote, rest)
    values = list(map(_VALUE, cuts))
    if _ESCAPED_HEAD in joined or b"\\" in b"".join(values):
        return _rewrite_escaped(joined, refs).split(b"\n")
    targets = map(refs.get, values, values)  # a value that is no entry's fullUrl stays as it is
    pieces = chain.from_iterable(zip(repeat(_HEAD), targets, repeat(b'"'), map(_REST, cuts)))
    return b"".join(chain((head,), pieces)).split(b"\n")


def _rewrite_escaped(body: bytes, refs: dict[bytes, bytes]) -> bytes:
    """Replace every `"reference":"<fullUrl>"` in orjson output, at any depth, by the entry's `Type/id`.

    Inside a JSON string every quote is escaped, so a match is a real property named reference unless the
    byte before it is a backslash (a name ending in `"reference`, whose value the match then spans exactly).
    `refs` maps JSON-encoded text to JSON-encoded text (`_json_texts`): orjson writes a given string always
    the same way, so a value with escapes is compared exactly without decoding it.
    """

    def swap(match: re.Match[bytes]) -> bytes:
        target = refs.get(match[1])
        if target is None or body[match.start() - 1] == _BACKSLASH:
            return match[0]
        return b'"reference":"' + target + b'"'

    return _REFERENCE.sub(swap, body)


def _json_texts(texts: list[str]) -> list[bytes]:
    """Strings as orjson writes them between the quotes, with one dumps for all: inside a string every
    quote is escaped, so `","` is only ever between two of them."""
    return orjson.dumps(texts)[2:-2].split(b'","') if texts else []
