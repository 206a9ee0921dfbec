"""What makes two posted Bundles the same request, for idempotency.

A retry is often not the same bytes: the EHR serialises again (other whitespace), stamps a new
`Bundle.timestamp` or `meta.lastUpdated`, or mints new `urn:uuid` fullUrls for the same entries. None of that
changes what is delivered. A changed resource does: a Bundle that keeps its `Bundle.identifier` (or the
`Idempotency-Key`) but changes a birth date is another request, and must not be answered with the earlier
delivery (it would be lost without the EHR knowing).

So the content digest covers `Bundle.type` and, per entry in order, its `request` and its resource with
`meta.lastUpdated` and `meta.versionId` left out, with each `urn:uuid` fullUrl of the Bundle replaced by its
entry's position wherever it occurs (written with a NUL byte, which JSON text never holds, so no string of the
Bundle can imitate it).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

_URN_UUID = re.compile(rb"urn:uuid:[0-9A-Fa-f-]{36}")


def content_digest(bundle: dict[str, Any]) -> str:
    """SHA-256 (hex) of what the Bundle asks to deliver (see the module docstring)."""
    entries = bundle.get("entry")
    entries = entries if isinstance(entries, list) else []
    positions: dict[bytes, bytes] = {}
    content: list[Any] = [bundle.get("type")]
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            content.append(entry)
            continue
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
            positions.setdefault(full_url.encode(), b"\0%d" % n)
        content.append([entry.get("request"), _without_stamps(entry.get("resource"))])
    text = orjson.dumps(content)
    if positions:
        text = _URN_UUID.sub(lambda m: positions.get(m.group(), m.group()), text)
    return hashlib.sha256(text).hexdigest()


def _without_stamps(resource: Any) -> Any:
    meta = resource.get("meta") if isinstance(resource, dict) else None
    if not isinstance(meta, dict) or not ({"lastUpdated", "versionId"} & meta.keys()):
        return resource
    kept = {k: v for k, v in meta.items() if k not in ("lastUpdated", "versionId")}
    without = {k: v for k, v in resource.items() if k != "meta"}
    return {**without, "meta": kept} if kept else without
