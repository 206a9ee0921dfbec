"""The sealed envelope: HPKE (RFC 9180, Base mode, X25519 / HKDF-SHA256 / AES-256-GCM) around a batch.

Request (client → TTP), a FHIR ``Parameters`` extending the gPAS shape (see ``gateway.ttp.app``):

    target     valueString        the registry domain (routing and authorisation need it in clear)
    requestId  valueString        random, 16-64 characters of [A-Za-z0-9_-]; single use
    timestamp  valueInstant       UTC, second precision, e.g. ``2026-11-24T05:30:00Z``
    keyId      valueString        the TTP public key's id from ``/.well-known/nlps1-public-key``
    enc        valueBase64Binary  the HPKE encapsulated key (32 bytes for X25519)
    sealed     valueBase64Binary  the HPKE ciphertext of ``orjson({"original": [...], "responseKey": b64u})``

``info`` = ``"NLPS1-TTP/1|<operation>|<target>|<requestId>|<timestamp>|<keyId>"`` binds every clear part to
the ciphertext: change one and decryption fails. The TTP refuses timestamps older than ``max_age`` (300 s) or
more than ``max_skew`` (60 s) ahead, and request ids it has seen in that window: a bounded in-memory LRU for
one TTP process (`ReplayGuard`), or a SQLite file that several TTP processes on one host share
(`SharedReplayGuard`, `fhir-gateway ttp serve --replay-db`), where claiming an id is one atomic insert.
``original`` holds the same strings as the plain variant (``<TYPE>:<srcVersion>:<base64url pre>`` etc.).

Response: ``Parameters`` with ``requestId`` and ``nonce`` (12 bytes) and ``sealed`` = AES-256-GCM under the
client's one-time ``responseKey``, AAD = ``info``, of the plain response ``Parameters`` JSON. So pseudonyms
and de-pseudonymised MRN layers are readable only by the caller that sealed the request, even behind a TLS-
terminating proxy. A retried request is sealed again with a new id (a replayed id is refused by design).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENC_LEN = 32  # X25519 encapsulated key length (RFC 9180 §7.1: Nenc = 32)
INFO_PREFIX = "NLPS1-TTP/1"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class EnvelopeError(Exception):
    """The envelope is malformed, stale, replayed or does not open; fixed texts only."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics = status, code, diagnostics


@dataclass(frozen=True)
class OpenedRequest:
    originals: list[Any]
    response_key: bytes
    info: bytes
    request_id: str


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise EnvelopeError(400, "invalid", f"{what} must be base64Binary")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError(400, "invalid", f"{what} is not valid base64") from None


def info_bytes(operation: str, target: str, request_id: str, timestamp: str, key_id: str) -> bytes:
    return "|".join((INFO_PREFIX, operation, target, request_id, timestamp, key_id)).encode("utf-8")


def utc_timestamp(now: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ReplayGuard:
    """Request ids seen within the freshness window; bounded, oldest evicted first.

    Eviction before the window ends could let a replay through, so the bound (default 200,000 ids, ~30 MB)
    should exceed requests per window; a sealed batch carries up to 100,000 values, so this is generous.
    """

    def __init__(self, *, max_entries: int = 200_000, max_age: float = 300.0, max_skew: float = 60.0) -> None:
        self.max_entries, self.max_age, self.max_skew = max_entries, max_age, max_skew
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check_fresh(self, timestamp: str, now: float) -> None:
        try:
            when = datetime.fromisoformat(timestamp)
        except (TypeError, ValueError):
            raise EnvelopeError(400, "invalid", "timestamp must be an instant") from None
        if when.tzinfo is None:
            raise EnvelopeError(400, "invalid", "timestamp must carry a time zone")
        age = now - when.timestamp()
        if age > self.max_age or -age > self.max_skew:
            raise EnvelopeError(401, "security", "envelope timestamp outside the accepted window")

    def seen(self, request_id: str) -> bool:
        return request_id in self._seen

    def claim(self, request_id: str, now: float) -> bool:
        """Remember `request_id`; False if it was already used (a replay). Atomic: handlers run in threads."""
        with self._lock:
            if request_id in self._seen:
                return False
            self.remember(request_id, now)
            return True

    def remember(self, request_id: str, now: float) -> None:
        seen = self._seen
        while seen:
            oldest_id, at = next(iter(seen.items()))
            if now - at <= self.max_age + self.max_skew and len(seen) < self.max_entries:
                break
            del seen[oldest_id]
        seen[request_id] = now


class SharedReplayGuard(ReplayGuard):
    """Request ids in a SQLite file that every TTP process on this host opens: a replay sent to another
    process than the first is refused too. A claim is one INSERT on the id's primary key (atomic across
    processes); ids older than the window are deleted every `prune_every` claims. Ids are random request
    ids, nothing about a patient."""

    def __init__(self, path: Path, *, max_age: float = 300.0, max_skew: float = 60.0, prune_every: int = 500):
        super().__init__(max_age=max_age, max_skew=max_skew)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: no fsync per claim (a request is not slowed by the disk); a power cut can forget the last
        # ids, which then replay at most once within their five minutes, as after a restart without the file
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._prune_every, self._claims = prune_every, 0

    def seen(self, request_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE id = ?", (request_id,)).fetchone() is not None

    def claim(self, request_id: str, now: float) -> bool:
        with self._lock:
            try:
                self._db.execute("INSERT INTO seen (id, at) VALUES (?, ?)", (request_id, now))
            except sqlite3.IntegrityError:
                return False
            self._claims += 1
            if self._claims % self._prune_every == 0:
                self._db.execute("DELETE FROM seen WHERE at < ?", (now - self.max_age - self.max_skew,))
            return True

    def close(self) -> None:
        self._db.close()


# --- client side --------------------------------------------------------------------------------------------

def seal_request(public_key: x25519.X25519PublicKey, key_id: str, operation: str, target: str,
                 originals: list[Any], *, now: float | None = None) -> tuple[dict[str, Any], bytes, bytes]:
    """Build the sealed Parameters; returns (parameters, response_key, info): the last two open the answer."""
    request_id = secrets.token_urlsafe(18)
    timestamp = utc_timestamp(now)
    info = info_bytes(operation, target, request_id, timestamp, key_id)
    response_key = secrets.token_bytes(32)
    payload = orjson.dumps({"original": originals, "responseKey": b64(response_key)})
    sealed = SUITE.encrypt(payload, public_key, info=info)
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "target", "valueString": target},
        {"name": "requestId", "valueString": request_id},
        {"name": "timestamp", "valueInstant": timestamp},
        {"name": "keyId", "valueString": key_id},
        {"name": "enc", "valueBase64Binary": b64(sealed[:ENC_LEN])},
        {"name": "sealed", "valueBase64Binary": b64(sealed[ENC_LEN:])},
    ]}
    return params, response_key, info


def open_response(params: Any, response_key: bytes, info: bytes) -> bytes:
    """The plain response Parameters JSON from a sealed response; EnvelopeError if it does not open."""
    parts = _parts(params)
    nonce = unb64(parts.get("nonce"), "nonce")
    sealed = unb64(parts.get("sealed"), "sealed")
    try:
        return AESGCM(response_key).decrypt(nonce, sealed, info)
    except (InvalidTag, ValueError):
        raise EnvelopeError(502, "security", "sealed response does not open") from None


# --- TTP side -----------------------------------------------------------------------------------------------

def _parts(params: Any) -> dict[str, Any]:
    """name → value[x] of the top-level parameters (the envelope parts are all single-valued)."""
    if not isinstance(params, dict) or not isinstance(params.get("parameter"), list):
        raise EnvelopeError(400, "structure", "body must be a Parameters resource")
    out: dict[str, Any] = {}
    for p in params["parameter"]:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            for key, value in p.items():
                if key.startswith("value"):
                    out[p["name"]] = value
                    break
    return out


def is_sealed(params: dict[str, Any]) -> bool:
    return any(isinstance(p, dict) and p.get("name") == "sealed" for p in params.get("parameter", ()))


def open_request(params: dict[str, Any], private_key: x25519.X25519PrivateKey, key_id: str, operation: str,
                 target: str, guard: ReplayGuard, *, now: float | None = None) -> OpenedRequest:
    now = time.time() if now is None else now
    parts = _parts(params)
    request_id, timestamp, sent_key_id = parts.get("requestId"), parts.get("timestamp"), parts.get("keyId")
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
        raise EnvelopeError(400, "invalid", "requestId must be 16-64 characters of [A-Za-z0-9_-]")
    if not isinstance(timestamp, str):
        raise EnvelopeError(400, "required", "timestamp is required")
    if sent_key_id != key_id:
        raise EnvelopeError(409, "security", "envelope sealed to an unknown key id; fetch the public key")
    guard.check_fresh(timestamp, now)
    if guard.seen(request_id):
        raise EnvelopeError(409, "security", "request id already used (replay refused)")
    enc = unb64(parts.get("enc"), "enc")
    sealed = unb64(parts.get("sealed"), "sealed")
    info = info_bytes(operation, target, request_id, timestamp, key_id)
    try:
        payload = SUITE.decrypt(enc + sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise EnvelopeError(400, "security", "envelope does not open (key, operation or binding)") from None
    # Claim only ids of envelopes that opened: garbage cannot push genuine ids out of the window. The claim
    # (not the look-up above) decides: two copies racing past the look-up get one success between them.
    if not guard.claim(request_id, now):
        raise EnvelopeError(409, "security", "request id already used (replay refused)")
    try:
        inner = orjson.loads(payload)
        originals, response_key = inner["original"], base64.b64decode(inner["responseKey"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
        raise EnvelopeError(400, "structure", "sealed payload is not a valid batch") from None
    if not isinstance(originals, list) or len(response_key) != 32:
        raise EnvelopeError(400, "structure", "sealed payload is not a valid batch")
    return OpenedRequest(originals, response_key, info, request_id)


def seal_response(body: bytes, opened: OpenedRequest) -> bytes:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(opened.response_key).encrypt(nonce, body, opened.info)
    return orjson.dumps({"resourceType": "Parameters", "parameter": [
        {"name": "requestId", "valueString": opened.request_id},
        {"name": "nonce", "valueBase64Binary": b64(nonce)},
        {"name": "sealed", "valueBase64Binary": b64(sealed)},
    ]})
