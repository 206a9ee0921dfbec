"""Re-keying after a TTP key rotation: send the stored Patient pseudonyms to the TTP's translate operation and
store the new values. The TTP call is pluggable: any callable that takes [(pseudonym type, value, provider)]
and returns the new values in the same order (None where a value could not be translated). The provider is
that of an MRN pseudonym, whose TTP layer binds the delivering hospital: the gateway names it in the
identifier's `assigner` (`urn:nlps1:provider`); None for other types, and for MRNs delivered without one.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.receiver.db import ReceiverDB

Pseudonym = tuple[str, str, str | None]  # type, value, the provider of an MRN
Translate = Callable[[list[Pseudonym]], Sequence[str | None]]

PSEUDED_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PROVIDER_SYSTEM = "urn:nlps1:provider"  # gateway.pseudonymise.PROVIDER_SYSTEM
_VALUE_RE = re.compile(r"^v[1-9][0-9]*\.[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class RekeyResult:
    patients: int = 0  # patients whose resource changed
    translated: int = 0  # identifiers that got a new value
    unchanged: int = 0  # the TTP gave back the same value (already current)
    failed: int = 0  # the TTP could not translate (None); left as they were
    # the failures per pseudonym type: a probe's 8 failures were all MRN, which a count alone did not show
    failed_by_type: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "patients": self.patients,
            "translated": self.translated,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "failedByType": dict(sorted(self.failed_by_type.items())),
        }


def pseudonym_type(identifier: dict[str, Any]) -> str | None:
    """The NLPS1 type of a pseudonym identifier, or None if it is not one.

    The gateway writes type.coding PSEUDED, type.text "NLPS1 <TYPE>" and system "urn:nlps1:<registry>:<TYPE>"
    by default; the text is preferred because the system is configurable.
    """
    ident_type = identifier.get("type") or {}
    codings = ident_type.get("coding") or []
    if not any(
        c.get("system") == PSEUDED_SYSTEM and c.get("code") == "PSEUDED"
        for c in codings
        if isinstance(c, dict)
    ):
        return None
    if not isinstance(identifier.get("value"), str) or not _VALUE_RE.match(identifier["value"]):
        return None
    text = ident_type.get("text")
    if isinstance(text, str) and text.startswith("NLPS1 ") and text[6:].strip():
        return text[6:].strip()
    system = identifier.get("system")
    if isinstance(system, str) and ":" in system:
        return system.rsplit(":", 1)[1] or None
    return None


def _assigner(identifier: dict[str, Any]) -> str | None:
    assigner = identifier.get("assigner")
    named = assigner.get("identifier") if isinstance(assigner, dict) else None
    if not isinstance(named, dict) or named.get("system") != PROVIDER_SYSTEM:
        return None
    return named["value"] if isinstance(named.get("value"), str) else None


def _stored(identifier: Any) -> Pseudonym | None:
    ptype = pseudonym_type(identifier) if isinstance(identifier, dict) else None
    if ptype is None:
        return None
    return ptype, identifier["value"], _assigner(identifier) if ptype == "MRN" else None


def rekey(db: ReceiverDB, translate: Translate) -> RekeyResult:
    """Translate every stored Patient pseudonym; patients written meanwhile keep their newer values."""
    patients = [
        (rid, orjson.loads(body))
        for rid, body in db.read("SELECT id, body FROM resources WHERE type = 'Patient' ORDER BY id")
    ]
    wanted: dict[Pseudonym, str | None] = {}
    for _rid, patient in patients:
        for ident in patient.get("identifier") or []:
            stored = _stored(ident)
            if stored:
                wanted[stored] = None
    if not wanted:
        return RekeyResult()
    asked = list(wanted)
    answers = list(translate(asked))
    if len(answers) != len(asked):
        raise ValueError("translate returned a different number of values")
    wanted.update(zip(asked, answers, strict=True))
    translated = unchanged = failed = 0
    failed_by_type: Counter[str] = Counter()
    for pseudonym in asked:
        new = wanted[pseudonym]
        if new is None:
            failed += 1
            failed_by_type[pseudonym[0]] += 1
        elif new == pseudonym[1]:
            unchanged += 1
        else:
            translated += 1
    changed = 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with db.write() as conn:
        for (rid,) in conn.execute("SELECT id FROM resources WHERE type = 'Patient'").fetchall():
            # Re-read inside the write lock: only values still equal to what we sent are replaced.
            version, body = conn.execute(
                "SELECT version, body FROM resources WHERE type = 'Patient' AND id = ?", (rid,)
            ).fetchone()
            patient = orjson.loads(body)
            touched = False
            for ident in patient.get("identifier") or []:
                stored = _stored(ident)
                new = wanted.get(stored) if stored else None
                if new and new != ident["value"]:
                    ident["value"] = new
                    touched = True
            if touched:
                version += 1
                patient["meta"] = {
                    **(patient.get("meta") or {}),
                    "versionId": str(version),
                    "lastUpdated": stamp,
                }
                conn.execute(
                    "UPDATE resources SET version = ?, last_updated = ?, body = ? WHERE type = 'Patient' "
                    "AND id = ?",
                    (version, stamp, orjson.dumps(patient), rid),
                )
                changed += 1
    return RekeyResult(changed, translated, unchanged, failed, dict(failed_by_type))


def ttp_translator(
    ttp_url: str, api_key: str, registry: str, *, provider: str | None = None, verify: bool | str = True
) -> Translate:
    """A translate callable over the reference TTP's `POST {ttp}/$translate` (gateway.ttp.client).

    MRN pseudonyms carry the delivering provider in their TTP layer, so they translate only with it: the one
    their identifier names, else `provider` (a registry fed by one hospital, values delivered before the
    gateway named it); otherwise they are reported as failed and left unchanged.
    """
    import asyncio

    from gateway.ttp.client import HttpTTPClient

    def translate(pseudonyms: list[Pseudonym]) -> list[str | None]:
        todo = [
            (i, t, v, (p or provider) if t == "MRN" else None)
            for i, (t, v, p) in enumerate(pseudonyms)
            if t != "MRN" or p or provider
        ]

        async def call() -> list[Any]:
            async with HttpTTPClient(ttp_url, api_key, verify=verify) as client:
                return list(await client.translate(registry, [(t, v, p) for _, t, v, p in todo]))

        results = asyncio.run(call()) if todo else []
        out: list[str | None] = [None] * len(pseudonyms)
        for result in results:  # each result names its position in the request
            if not result.error_code:
                out[todo[result.index][0]] = result.identifier_value
        return out

    return translate
