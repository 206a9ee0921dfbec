"""The NLPS1 cryptographic primitives (domain spec §4.1, §4.3, §4.4), all from `cryptography`.

Source stage (in the hospital):  pre = HMAC-SHA-256(K_src[v], canonical)
    MRN:  pre = AES-SIV(K_mrn[provider, registry, v], canonical, AD=[NLPS1|MRN, registry, provider])
TTP stage:                       final = AES-SIV(K_dom[registry, v], pre, AD=[NLPS1|TYPE])
    MRN:  final = AES-SIV(K_dom[registry, v], pre, AD=[NLPS1|MRN, provider])
Identifier value:                "v<n>." + base64url(final) without padding.

Key objects are built once and reused: building an AESSIV per call costs five times the encryption itself.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SCHEME = "NLPS1"
TYPES = ("B", "NGGV", "SNGGV", "NGG", "SNGG", "C", "RGG", "GG", "A", "MRN")
REVERSIBLE = frozenset({"MRN"})
_TYPE_ALIASES = {t.upper(): t for t in TYPES}
_VALUE_RE = re.compile(r"^v([1-9][0-9]{0,5})\.([A-Za-z0-9_-]+)$")


class PseudonymError(ValueError):
    """A pseudonym operation failed; the message never contains an input value."""


def canonical_type(name: str) -> str:
    """`sNGGV` → `SNGGV`; raises for an unknown type."""
    try:
        return _TYPE_ALIASES[name.upper()]
    except KeyError:
        raise PseudonymError("unknown pseudonym type") from None


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise PseudonymError("value is not base64url") from None


def hkdf64(ikm: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info.encode("utf-8")).derive(ikm)


def domain_key(ttp_master: bytes, registry: str, version: int) -> bytes:
    return hkdf64(ttp_master, f"nlpseudo:final|{registry}|v{version}")


def mrn_key(provider_master: bytes, registry: str, version: int) -> bytes:
    return hkdf64(provider_master, f"nlpseudo:mrn|{registry}|v{version}")


def format_identifier(version: int, final: bytes) -> str:
    return f"v{version}.{b64u(final)}"


def parse_identifier(value: str) -> tuple[int, bytes]:
    match = _VALUE_RE.match(value)
    if not match:
        raise PseudonymError("not an NLPS1 pseudonym value")
    return int(match.group(1)), unb64u(match.group(2))


class SourceKey:
    """K_src[v]: the HMAC key shared by all providers of the ecosystem, one per version."""

    def __init__(self, key: bytes, version: int) -> None:
        if len(key) < 32:
            raise PseudonymError("source key must be at least 256 bits")
        self.version = version
        self._hmac = hmac.HMAC(key, hashes.SHA256())

    def pre(self, canonical: str) -> bytes:
        mac = self._hmac.copy()
        mac.update(canonical.encode("utf-8"))
        return mac.finalize()


class ProviderMrnKey:
    """K_mrn[provider, registry, v]: the hospital's own reversible layer; never leaves the hospital."""

    def __init__(self, provider_master: bytes, provider: str, registry: str, version: int) -> None:
        self.version = version
        self._ad = [b"NLPS1|MRN", registry.encode("utf-8"), provider.encode("utf-8")]
        self._siv = AESSIV(mrn_key(provider_master, registry, version))

    def pre(self, canonical: str) -> bytes:
        return self._siv.encrypt(canonical.encode("utf-8"), self._ad)

    def reveal(self, pre: bytes) -> str:
        try:
            return self._siv.decrypt(pre, self._ad).decode("utf-8")
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise PseudonymError("MRN pre-pseudonym does not open under this provider's key") from None


@dataclass(frozen=True)
class DomainKey:
    """K_dom[registry, v] at the TTP: the final, deterministic encryption step."""

    registry: str
    version: int
    siv: AESSIV

    @classmethod
    def derive(cls, ttp_master: bytes, registry: str, version: int) -> DomainKey:
        return cls(registry, version, AESSIV(domain_key(ttp_master, registry, version)))

    @staticmethod
    def _ad(ptype: str, provider: str | None) -> list[bytes]:
        if ptype in REVERSIBLE:
            if not provider:
                raise PseudonymError("the reversible type needs the delivering provider")
            return [b"NLPS1|MRN", provider.encode("utf-8")]
        return [f"NLPS1|{ptype}".encode("ascii")]

    def final(self, ptype: str, pre: bytes, provider: str | None = None) -> bytes:
        return self.siv.encrypt(pre, self._ad(ptype, provider))

    def open(self, ptype: str, final: bytes, provider: str | None = None) -> bytes:
        """Recover the pre-pseudonym (rotation, or MRN reversal for the bound provider only)."""
        try:
            return self.siv.decrypt(final, self._ad(ptype, provider))
        except (InvalidTag, ValueError):
            raise PseudonymError("pseudonym does not open under this domain key") from None

    def identifier(self, ptype: str, pre: bytes, provider: str | None = None) -> str:
        return format_identifier(self.version, self.final(ptype, pre, provider))


def translate(value: str, ptype: str, old: DomainKey, new: DomainKey, provider: str | None = None) -> str:
    """Re-key a stored pseudonym from version n to n+1 without learning anything about the person."""
    version, final = parse_identifier(value)
    if version != old.version:
        raise PseudonymError("pseudonym version does not match the old key")
    return new.identifier(ptype, old.open(ptype, final, provider), provider)
