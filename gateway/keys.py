"""The gateway's own keys (the hospital side), kept as hex files readable by the owner only.

Files in the key directory (``FHIR_GATEWAY_KEY_DIR``, default ``var/keys``):

- ``source-key-v<n>.hex``   K_src[n], the ecosystem-wide source key (distributed to every provider);
                            the highest n is current. Also ``FHIR_GATEWAY_SOURCE_KEY_V<n>``.
- ``provider-mrn-<id>.hex`` the provider's master for the reversible MRN layer; it never leaves the hospital.
                            Also ``FHIR_GATEWAY_PROVIDER_MRN_KEY_<ID>`` (non-alphanumerics → ``_``).
- ``gateway-secret.hex``    the gateway's own secret: opaque ids and objection-register digests are keyed
                            hashes under keys derived from it (HKDF, one purpose per derivation).
                            Also ``FHIR_GATEWAY_SECRET``.

Key files wider than 0600 are refused at start-up: a key anyone on the machine can read is no key.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_SOURCE_RE = re.compile(r"^source-key-v([1-9][0-9]*)\.hex$")


class KeyFileError(Exception):
    """A key is missing, malformed or too widely readable; the message names the file, never the key."""


def _env_name(provider_id: str) -> str:
    return "FHIR_GATEWAY_PROVIDER_MRN_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", provider_id).upper()


def _file_name(provider_id: str) -> str:
    return "provider-mrn-" + re.sub(r"[^A-Za-z0-9.-]", "_", provider_id) + ".hex"


def read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    return _decode_hex(path.read_text(encoding="ascii").strip(), str(path))


def _decode_hex(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"key {where} is not hex") from None
    if len(key) < 32:
        raise KeyFileError(f"key {where} is shorter than 256 bits")
    return key


def write_key_file(path: Path, key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex())


def check_value(key: bytes) -> str:
    """A key check value: shows whether two parties hold the same key without showing the key. K_src must be
    the same at every provider (else one person gets other pseudonyms at each), and a `keys init` key is a
    random one of this machine: the ecosystem publishes its key's check value to compare with."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(b"NLPS1|key-check-value")
    return mac.finalize().hex()[:16]


def derive(secret: bytes, purpose: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode()).derive(secret)


@dataclass(frozen=True)
class GatewayKeys:
    source_keys: dict[int, bytes]
    provider_mrn: dict[str, bytes]
    secret: bytes

    @property
    def source_version(self) -> int:
        return max(self.source_keys)

    @property
    def source_check_value(self) -> str:
        """The check value of the current source key (`check_value`)."""
        return check_value(self.source_keys[self.source_version])

    def id_key(self, registry: str) -> bytes:
        """Key of the opaque resource ids for one registry (stable, so a re-delivery updates)."""
        return derive(self.secret, f"gateway:opaque-id|{registry}")

    def objection_key(self) -> bytes:
        return derive(self.secret, "gateway:objection-register")

    def idempotency_key(self) -> bytes:
        return derive(self.secret, "gateway:idempotency")


def load_keys(key_dir: Path, provider_ids: list[str]) -> GatewayKeys:
    source = _load_source_keys(key_dir)
    provider_mrn: dict[str, bytes] = {}
    for pid in provider_ids:
        env = os.environ.get(_env_name(pid))
        path = key_dir / _file_name(pid)
        if env:
            provider_mrn[pid] = _decode_hex(env, _env_name(pid))
        elif path.exists():
            provider_mrn[pid] = read_key_file(path)
    secret_env = os.environ.get("FHIR_GATEWAY_SECRET")
    secret_path = key_dir / "gateway-secret.hex"
    if secret_env:
        secret = _decode_hex(secret_env, "FHIR_GATEWAY_SECRET")
    elif secret_path.exists():
        secret = read_key_file(secret_path)
    else:
        raise KeyFileError(f"no gateway secret: create {secret_path} with 'fhir-gateway keys init'")
    return GatewayKeys(source, provider_mrn, secret)


def _load_source_keys(key_dir: Path) -> dict[int, bytes]:
    keys: dict[int, bytes] = {}
    for name, value in os.environ.items():
        m = re.match(r"^FHIR_GATEWAY_SOURCE_KEY_V([1-9][0-9]*)$", name)
        if m:
            keys[int(m.group(1))] = _decode_hex(value, name)
    if key_dir.is_dir():
        for path in key_dir.iterdir():
            m = _SOURCE_RE.match(path.name)
            if m and int(m.group(1)) not in keys:
                keys[int(m.group(1))] = read_key_file(path)
    if not keys:
        raise KeyFileError(
            f"no source key: create {key_dir}/source-key-v1.hex or set FHIR_GATEWAY_SOURCE_KEY_V1"
        )
    return keys


def init_keys(key_dir: Path, provider_ids: list[str], source_key: bytes | None = None) -> list[Path]:
    """Create missing key files (fresh random keys); returns the files created. Existing keys are kept."""
    created = []
    wanted = {"source-key-v1.hex": source_key, "gateway-secret.hex": None}
    wanted |= {_file_name(pid): None for pid in provider_ids}
    existing_source = key_dir.is_dir() and any(_SOURCE_RE.match(p.name) for p in key_dir.iterdir())
    for name, given in wanted.items():
        path = key_dir / name
        if path.exists() or (name.startswith("source-key") and existing_source):
            continue
        write_key_file(path, given or secrets.token_bytes(32))
        created.append(path)
    return created


def list_keys(key_dir: Path) -> list[str]:
    """Key file names only: never their content."""
    if not key_dir.is_dir():
        return []
    return sorted(p.name for p in key_dir.iterdir() if p.suffix == ".hex")
