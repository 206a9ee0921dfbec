"""Who may call the TTP: API keys per caller, each with a role; stored as SHA-256 hashes only.

Callers file (YAML or JSON, written by ``fhir-gateway ttp callers add``; it holds no secret, only hashes):

    callers:
      - name: umc-example-gateway
        role: provider              # pseudonymise; de-pseudonymise its own MRN layer
        provider: "ura:00000000"
        key_sha256: "<64 hex>"
      - name: registry-example-holder
        role: registry              # translate its stored pseudonyms after a rotation
        registries: [registry-example]
        key_sha256: "<64 hex>"
      - name: ttp-operator
        role: admin                 # rotate domain keys
        key_sha256: "<64 hex>"
      - name: umc-example-mtls      # optional: identified by its client certificate instead of a key
        role: provider
        provider: "ura:00000001"
        client_subject: "CN=gateway.umc.example,O=UMC Example"

Keys arrive as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A client-certificate subject is
honoured only from the header named by ``client_subject_header`` and only when the direct peer is a trusted
proxy (the proxy terminates mTLS and must overwrite that header on every request).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml

from gateway import yamlfile

Role = Literal["provider", "registry", "admin"]
ROLES: tuple[str, ...] = ("provider", "registry", "admin")


class AuthConfigError(Exception):
    """The callers file is malformed; the text names the entry, never a key or hash."""


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role
    provider: str | None = None
    registries: frozenset[str] = frozenset()

    def may_pseudonymise(self, registry: str) -> bool:
        # Providers deliver to any registry in the keyring unless their entry restricts them.
        return self.role == "provider" and (not self.registries or registry in self.registries)

    def may_translate(self, registry: str) -> bool:
        return self.role == "registry" and registry in self.registries


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 bits, URL-safe, with a prefix that secret scanners can recognise."""
    return "nlps1_" + secrets.token_urlsafe(32)


class CallersUnreadable(Exception):
    """The callers file changed into something that cannot be read: nobody is let in until it can be."""


@dataclass
class TTPAuth:
    keyed: list[tuple[bytes, Caller]] = field(default_factory=list)
    by_subject: dict[str, Caller] = field(default_factory=dict)
    client_subject_header: str | None = None
    trusted_proxies: frozenset[str] = frozenset()
    # read from this file: re-read when it changes (`callers add` / `callers remove` beside a running TTP)
    path: Path | None = None
    _seen: tuple[int, int, int] | None = field(default=None, repr=False)
    _broken: bool = field(default=False, repr=False)

    @classmethod
    def from_entries(cls, entries: Iterable[Mapping[str, Any]], **kw: Any) -> TTPAuth:
        auth = cls(**kw)
        for n, entry in enumerate(entries):
            caller = _caller(entry, n)
            if entry.get("key_sha256"):
                digest = str(entry["key_sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise AuthConfigError(f"caller #{n} ({caller.name}): key_sha256 must be 64 hex digits")
                auth.keyed.append((bytes.fromhex(digest), caller))
            elif entry.get("client_subject"):
                auth.by_subject[str(entry["client_subject"])] = caller
            else:
                raise AuthConfigError(f"caller #{n} ({caller.name}): needs key_sha256 or client_subject")
        return auth

    @classmethod
    def from_file(cls, path: str | Path, **kw: Any) -> TTPAuth:
        auth = cls.from_entries(load_callers(path), path=Path(path), **kw)
        auth._seen = _file_state(auth.path)
        return auth

    def reload_if_changed(self) -> bool:
        """Re-read the callers file when it changed: one stat() per call, so the app calls it per request.

        Unlike the keyring (whose previous version stays right), a callers file that turns unreadable fails
        closed: it may be the edit that revoked a leaked key, so no caller is let in until it reads again
        (CallersUnreadable). `callers add` and `callers remove` replace the file atomically."""
        if self.path is None:
            return False
        try:
            state = _file_state(self.path)
            if state == self._seen and not self._broken:
                return False
            fresh = TTPAuth.from_entries(load_callers(self.path))
        except (AuthConfigError, OSError):
            self._broken = True
            raise CallersUnreadable(f"the callers file {self.path} cannot be read") from None
        self.keyed, self.by_subject = fresh.keyed, fresh.by_subject
        self._seen, self._broken = state, False
        return True

    def authenticate(self, headers: Mapping[str, str], peer: str | None = None) -> Caller | None:
        self.reload_if_changed()
        key = _presented_key(headers)
        if key is not None:
            digest = hashlib.sha256(key.encode("utf-8")).digest()
            found: Caller | None = None
            # Compare against every entry (no early exit) in constant time per entry.
            for stored, caller in self.keyed:
                if hmac.compare_digest(stored, digest):
                    found = caller
            return found
        if self.client_subject_header and peer in self.trusted_proxies:
            subject = headers.get(self.client_subject_header)
            if subject:
                return self.by_subject.get(subject)
        return None


def _file_state(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _presented_key(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    value = headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


def _caller(entry: Mapping[str, Any], n: int) -> Caller:
    if not isinstance(entry, Mapping):
        raise AuthConfigError(f"caller #{n} is not a mapping")
    name = str(entry.get("name") or f"caller-{n}")
    role = entry.get("role")
    if role not in ROLES:
        raise AuthConfigError(f"caller #{n} ({name}): role must be one of {', '.join(ROLES)}")
    provider = entry.get("provider")
    registries = frozenset(str(r) for r in entry.get("registries") or ())
    if role == "provider" and not provider:
        raise AuthConfigError(f"caller #{n} ({name}): a provider needs its provider id (e.g. ura:00000000)")
    if role == "registry" and not registries:
        raise AuthConfigError(f"caller #{n} ({name}): a registry holder needs its registry ids")
    return Caller(name, role, str(provider) if provider else None, registries)


def load_callers(path: str | Path) -> list[dict[str, Any]]:
    text = Path(path).read_bytes()
    try:
        doc = orjson.loads(text) if str(path).endswith(".json") else yamlfile.load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError):
        raise AuthConfigError(f"{path} is not valid YAML/JSON") from None
    callers = (doc or {}).get("callers", []) if isinstance(doc, dict) else None
    if not isinstance(callers, list):
        raise AuthConfigError(f"{path} must hold a mapping with a `callers` list")
    return callers


def add_caller(path: str | Path, name: str, role: str, *, provider: str | None = None,
               registries: Iterable[str] = ()) -> str:
    """Append a caller with a fresh key to the callers file; return the key (shown once; its hash is kept)."""
    path = Path(path)
    key = new_key()
    entry: dict[str, Any] = {"name": name, "role": role}
    if provider:
        entry["provider"] = provider
    if registries:
        entry["registries"] = sorted(registries)
    entry["key_sha256"] = hash_key(key)
    with _editing(path):
        callers = load_callers(path) if path.exists() else []
        if any(c.get("name") == name for c in callers):
            raise AuthConfigError(f"a caller named {name} already exists")
        _caller(entry, len(callers))  # validate before writing
        callers.append(entry)
        _write_callers(path, callers)
    return key


def remove_caller(path: str | Path, name: str) -> None:
    """Revoke a caller: its entry leaves the file (a running TTP refuses its key at the next request)."""
    path = Path(path)
    with _editing(path):
        callers = load_callers(path)
        kept = [c for c in callers if not (isinstance(c, Mapping) and c.get("name") == name)]
        if len(kept) == len(callers):
            raise AuthConfigError(f"no caller named {name} in {path}")
        _write_callers(path, kept)


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    """One change of the callers file at a time (a lock file beside it): eight `callers add` at once lost
    one key, printed but never written (a re-probe)."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_callers(path: Path, callers: list[dict[str, Any]]) -> None:
    """Atomically (a TTP reading it mid-write would see half a file, and let nobody in until the next)."""
    if path.suffix == ".json":
        data = orjson.dumps({"callers": callers}, option=orjson.OPT_INDENT_2)
    else:
        data = yaml.safe_dump({"callers": callers}, sort_keys=False).encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
