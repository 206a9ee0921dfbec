"""The TTP's keys on disk (or in the environment).

Files in the key directory (``--key-dir``, default ``var/ttp-keys``), all created with mode 0600; loading
refuses any of them that group or others can read or write (a key anyone on the machine can read is no key):

- ``master.key``   32 random bytes, hex: the TTP master key. The ONLY secret for pseudonyms: every domain
                   key K_dom[registry, v] is derived from it (HKDF, ``nlps1.DomainKey.derive``), so nothing
                   else needs backing up and no patient table exists anywhere.
- ``hpke.key``     32 bytes, hex: the raw X25519 private key that request envelopes are sealed to (RFC 9180).
- ``keyring.json`` not secret, but integrity-relevant: per registry domain the current version, since when
                   (after a rotation) and the retired versions, e.g.
                   ``{"domains": {"registry-example": {"current": 2, "since": "2026-11-25T08:00:00Z",
                   "retired": [1]}}}``.

Environment alternatives (take precedence over the files, for containers with a secret store):

- ``FHIR_GATEWAY_TTP_MASTER_KEY``  the master key, hex (64 hex digits)
- ``FHIR_GATEWAY_TTP_HPKE_KEY``    the X25519 private key, hex (64 hex digits)
- ``FHIR_GATEWAY_TTP_KEYRING``     path of the keyring JSON file (rotation then writes to that file)
- ``FHIR_GATEWAY_TTP_KEY_DIR``     the key directory when none is given on the command line

Error messages name files and registries, never key material; nothing here logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.pseudonym import nlps1

MASTER_FILE = "master.key"
HPKE_FILE = "hpke.key"
KEYRING_FILE = "keyring.json"
ENV_MASTER = "FHIR_GATEWAY_TTP_MASTER_KEY"
ENV_HPKE = "FHIR_GATEWAY_TTP_HPKE_KEY"
ENV_KEYRING = "FHIR_GATEWAY_TTP_KEYRING"
ENV_KEY_DIR = "FHIR_GATEWAY_TTP_KEY_DIR"
DEFAULT_KEY_DIR = "var/ttp-keys"
# Registry ids become part of HKDF info strings and of FHIR Parameters: keep them boring.
_REGISTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyStoreError(Exception):
    """A key or keyring is missing, malformed or too widely readable; the text never contains key material."""


# A gateway keeps delivering the pseudonyms it cached under the old version for up to its cache's lifetime
# after a rotation (gateway.ttp.client.CachingTTP: 600 s in the service, an hour at most): an old version
# retired before then leaves pseudonyms that can never be translated, nor linked.
RETIRE_AFTER_SECONDS = 3600


@dataclass(frozen=True)
class DomainVersions:
    current: int
    retired: tuple[int, ...] = ()
    since: float | None = None  # when `current` became current (set by a rotation)

    def usable(self, version: int) -> bool:
        return 1 <= version <= self.current and version not in self.retired


def check_registry_id(registry: str) -> str:
    if not _REGISTRY_RE.match(registry):
        raise KeyStoreError("registry id must be 1-64 characters of A-Z a-z 0-9 . _ - starting alphanumeric")
    return registry


def _check_private(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyStoreError(f"{path} does not exist (run `ttp keys init`)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode_text = oct(mode & 0o777)
        raise KeyStoreError(f"refusing {path}: accessible by group/others (mode {mode_text}); chmod 600 it")


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write with mode 0600 from the first byte on (never chmod after the fact: that leaves a window)."""
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written keyring
    finally:
        if tmp.exists():
            tmp.unlink()


def _hex32(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise KeyStoreError(f"{where} is not hex") from None
    if len(key) != 32:
        raise KeyStoreError(f"{where} must hold exactly 32 bytes (64 hex digits)")
    return key


def _read_hex_file(path: Path) -> bytes:
    _check_private(path)
    return _hex32(path.read_text(encoding="ascii"), str(path))


def _parse_keyring(data: bytes, where: str) -> dict[str, DomainVersions]:
    try:
        doc = orjson.loads(data)
        domains = {}
        for registry, entry in doc["domains"].items():
            current = int(entry["current"])
            retired = tuple(sorted({int(v) for v in entry.get("retired", [])}))
            if current < 1 or current in retired or any(v < 1 or v > current for v in retired):
                raise ValueError
            since = _parse_instant(entry["since"]) if "since" in entry else None
            domains[check_registry_id(registry)] = DomainVersions(current, retired, since)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise KeyStoreError(f"{where} is not a valid keyring") from None
    return domains


def _dump_keyring(domains: Mapping[str, DomainVersions]) -> bytes:
    doc = {"domains": {r: _domain_doc(d) for r, d in sorted(domains.items())}}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def _domain_doc(d: DomainVersions) -> dict[str, object]:
    since = {"since": _instant(d.since)} if d.since else {}
    return {"current": d.current, **since, "retired": list(d.retired)}


def _instant(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_instant(text: str) -> float:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError
    return moment.timestamp()


@dataclass
class KeyStore:
    """The loaded TTP keys. Domain keys are derived lazily and kept: building an AESSIV costs 5x using one."""

    master: bytes = field(repr=False)
    hpke_private: x25519.X25519PrivateKey = field(repr=False)
    domains: dict[str, DomainVersions]
    keyring_path: Path | None = None
    _derived: dict[tuple[str, int], nlps1.DomainKey] = field(default_factory=dict, repr=False)
    _keyring_mtime: int | None = field(default=None, repr=False)

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, key_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> KeyStore:
        env = os.environ if env is None else env
        directory = Path(key_dir or env.get(ENV_KEY_DIR) or DEFAULT_KEY_DIR)
        if env.get(ENV_MASTER):
            master = _hex32(env[ENV_MASTER], ENV_MASTER)
        else:
            master = _read_hex_file(directory / MASTER_FILE)
        if env.get(ENV_HPKE):
            hpke_raw = _hex32(env[ENV_HPKE], ENV_HPKE)
        else:
            hpke_raw = _read_hex_file(directory / HPKE_FILE)
        keyring_path = Path(env[ENV_KEYRING]) if env.get(ENV_KEYRING) else directory / KEYRING_FILE
        store = cls(master, x25519.X25519PrivateKey.from_private_bytes(hpke_raw), {}, keyring_path)
        store.reload_if_changed()
        return store

    def reload_if_changed(self) -> bool:
        """Re-read the keyring when its file changed (``ttp keys rotate`` beside a running TTP).

        One stat() per call, so the app can call it per request. A keyring that became unreadable, malformed
        or too widely accessible raises KeyStoreError and the previous keyring stays in force.
        """
        if self.keyring_path is None:
            return False
        _check_private(self.keyring_path)
        mtime = self.keyring_path.stat().st_mtime_ns
        if mtime == self._keyring_mtime:
            return False
        self.domains = _parse_keyring(self.keyring_path.read_bytes(), str(self.keyring_path))
        self._keyring_mtime = mtime
        return True

    @classmethod
    def in_memory(cls, master: bytes, domains: Mapping[str, int],
                  hpke_private: x25519.X25519PrivateKey | None = None) -> KeyStore:
        """Keys held only in memory (tests, benchmarks, the embedded TTP); rotation is not persisted."""
        ring = {check_registry_id(r): DomainVersions(v) for r, v in domains.items()}
        return cls(master, hpke_private or x25519.X25519PrivateKey.generate(), ring, None)

    # --- domain keys ---------------------------------------------------------------------------------------
    def versions(self, registry: str) -> DomainVersions | None:
        return self.domains.get(registry)

    def domain_key(self, registry: str, version: int) -> nlps1.DomainKey:
        """K_dom[registry, version]; raises KeyStoreError for an unknown registry or an unusable version."""
        entry = self.domains.get(registry)
        if entry is None:
            raise KeyStoreError("unknown registry domain")
        if not entry.usable(version):
            raise KeyStoreError("key version is unknown or retired")
        key = self._derived.get((registry, version))
        if key is None:
            key = nlps1.DomainKey.derive(self.master, registry, version)
            self._derived[(registry, version)] = key
        return key

    def current_key(self, registry: str) -> nlps1.DomainKey:
        entry = self.domains.get(registry)
        if entry is None:
            raise KeyStoreError("unknown registry domain")
        return self.domain_key(registry, entry.current)

    # --- rotation ------------------------------------------------------------------------------------------
    def rotate(self, registry: str, *, now: float | None = None) -> int:
        """Add version n+1 and make it current; persisted before it takes effect."""
        entry = self.domains.get(registry)
        if entry is None:
            raise KeyStoreError("unknown registry domain")
        new = DomainVersions(entry.current + 1, entry.retired, time.time() if now is None else now)
        self._commit({**self.domains, registry: new})
        return new.current

    def retire(self, registry: str, version: int, *, now: float | None = None, force: bool = False) -> None:
        """Retire an old version once the registry holder confirmed its translation (never the current), and
        not before the gateways' caches stopped delivering it (RETIRE_AFTER_SECONDS), unless `force`."""
        entry = self.domains.get(registry)
        if entry is None:
            raise KeyStoreError("unknown registry domain")
        if not 1 <= version < entry.current:
            raise KeyStoreError("only a non-current existing version can be retired")
        if entry.since is None and not force:
            raise KeyStoreError(
                f"the keyring does not say when v{entry.current} became current (a rotation by an earlier "
                f"version): gateways may still deliver v{version} pseudonyms they cached; retire with "
                "--force once an hour has passed since the rotation and the registry translated what it got"
            )
        ready = (entry.since or 0) + RETIRE_AFTER_SECONDS
        if not force and (time.time() if now is None else now) < ready:
            raise KeyStoreError(
                f"v{entry.current} became current at {_instant(entry.since or 0)}; gateways may deliver "
                f"v{version} pseudonyms they cached until {_instant(ready)}: have the registry translate "
                "what it received until then, and retire after that (or --force)"
            )
        retired = tuple(sorted({*entry.retired, version}))
        self._commit({**self.domains, registry: DomainVersions(entry.current, retired, entry.since)})
        self._derived.pop((registry, version), None)

    def add_registry(self, registry: str) -> None:
        if check_registry_id(registry) in self.domains:
            raise KeyStoreError("registry domain already exists")
        self._commit({**self.domains, registry: DomainVersions(1)})

    def _commit(self, domains: dict[str, DomainVersions]) -> None:
        if self.keyring_path is not None:
            _write_private(self.keyring_path, _dump_keyring(domains), exclusive=False)
            self._keyring_mtime = self.keyring_path.stat().st_mtime_ns
        # Swap the whole mapping: readers in other threads see the old or the new keyring, never a mix.
        self.domains = domains

    # --- HPKE ----------------------------------------------------------------------------------------------
    def public_key_raw(self) -> bytes:
        return self.hpke_private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the HPKE public key (RFC 7638-style thumbprint over the raw key)."""
        return nlps1.b64u(hashlib.sha256(self.public_key_raw()).digest()[:12])

    def public_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "X25519", "x": nlps1.b64u(self.public_key_raw()), "kid": self.key_id,
                "use": "enc", "alg": "HPKE-Base-X25519-SHA256-AES256GCM"}


# --- the command-line operations (key directory level) -----------------------------------------------------

def init_keys(key_dir: str | Path, registries: list[str], *, master: bytes | None = None) -> KeyStore:
    """Create master.key, hpke.key and keyring.json (mode 0600); refuses to overwrite existing keys.

    `master` installs a given master key instead of a fresh one (moving a TTP to a new host; test vectors).
    """
    if master is not None and len(master) != 32:
        raise KeyStoreError("the master key must be 32 bytes")
    directory = Path(key_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (MASTER_FILE, HPKE_FILE, KEYRING_FILE):
        if (directory / name).exists():
            raise KeyStoreError(f"{directory / name} already exists; refusing to overwrite keys")
    domains = {check_registry_id(r): DomainVersions(1) for r in registries}
    hpke_private = x25519.X25519PrivateKey.generate()
    master = secrets.token_bytes(32) if master is None else master
    _write_private(directory / MASTER_FILE, master.hex().encode() + b"\n", exclusive=True)
    raw = hpke_private.private_bytes_raw()
    _write_private(directory / HPKE_FILE, raw.hex().encode() + b"\n", exclusive=True)
    _write_private(directory / KEYRING_FILE, _dump_keyring(domains), exclusive=True)
    return KeyStore.load(directory, env={})


def list_domains(store: KeyStore) -> dict[str, dict[str, object]]:
    """Registry ids and versions only: safe to print."""
    return {r: _domain_doc(d) for r, d in sorted(store.domains.items())}
