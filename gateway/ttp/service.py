"""The TTP's service logic as plain functions over wire strings: used by the HTTP app and by EmbeddedTTP.

Value formats (the ``original`` strings of the operations):

- pseudonymise:        ``<TYPE>:<srcVersion>:<base64url pre>``      e.g. ``B:1:64qqx_HAIG...``
- translate:           ``<TYPE>:<v<n>.identifier>``, for MRN ``MRN:<v<n>.identifier>:<provider id>``
- de-pseudonymise:     ``MRN:<v<n>.identifier>``                    (the provider is the authenticated caller)

Each function returns one ``(value, error_code)`` pair per input, in input order: a bad value gets an error
code (a fixed word, never the value) and the rest of the batch goes through. The hot loop avoids per-value
objects beyond the tuple it returns, reuses one AESSIV per domain version and pre-computes associated data.
"""

from __future__ import annotations

import binascii
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag

from gateway import memory
from gateway.pseudonym import nlps1
from gateway.ttp.keystore import KeyStore, KeyStoreError

Result = tuple[str | None, str | None]

INVALID_FORMAT = "invalid-format"
UNKNOWN_TYPE = "unknown-type"
INVALID_LENGTH = "invalid-length"
PROVIDER_REQUIRED = "provider-required"
NOT_REVERSIBLE = "not-reversible"
DOES_NOT_OPEN = "does-not-open"
UNUSABLE_VERSION = "unknown-or-retired-version"
ERROR_CODES = (INVALID_FORMAT, UNKNOWN_TYPE, INVALID_LENGTH, PROVIDER_REQUIRED, NOT_REVERSIBLE, DOES_NOT_OPEN,
               UNUSABLE_VERSION)

PRE_HMAC_LEN = 32  # HMAC-SHA-256 output
PRE_MRN_MIN, PRE_MRN_MAX = 17, 512  # AES-SIV: 16-byte tag + at least one byte; MRNs are short

_PRE_RE = re.compile(r"([A-Za-z]{1,5}):([1-9][0-9]{0,5}):([A-Za-z0-9_-]{22,700})")
# Both patterns admit only characters that need no JSON escaping: the app echoes matched values verbatim.
_STORED_RE = re.compile(
    r"([A-Za-z]{1,5}):(v[1-9][0-9]{0,5}\.[A-Za-z0-9_-]{22,700})(?::([A-Za-z0-9:._-]{1,128}))?")
_TYPES = {**{t: t for t in nlps1.TYPES}, **{t.lower(): t for t in nlps1.TYPES},
          "sNGGV": "SNGGV", "sNGG": "SNGG"}
_AD = {t: [f"NLPS1|{t}".encode("ascii")] for t in nlps1.TYPES if t not in nlps1.REVERSIBLE}
_PAD = (b"", b"===", b"==", b"=")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _unb64u(text: str) -> bytes:
    # binascii directly: half the cost of base64.urlsafe_b64decode; strict mode rejects what the regex let by.
    data = text.encode("ascii").translate(_FROM_URLSAFE)
    return binascii.a2b_base64(data + _PAD[len(data) % 4], strict_mode=True)


def _b64u(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


@contextlib.contextmanager
def paused_gc(size: int, threshold: int = 2_000) -> Iterator[None]:
    """`gateway.memory.paused_gc` for batches of at least `threshold` values (a 100,000-value batch is 2-3x
    slower with the GC on); small ones are not worth the switch."""
    with memory.paused_gc() if size >= threshold else contextlib.nullcontext():
        yield


def _mrn_ad(provider: str | None) -> list[bytes] | None:
    return [b"NLPS1|MRN", provider.encode("utf-8")] if provider else None


def pseudonymise(keys: KeyStore, registry: str, provider: str | None,
                 originals: Sequence[Any]) -> list[Result]:
    """pre → final under the registry's current domain key. KeyStoreError for an unknown registry."""
    dom = keys.current_key(registry)
    encrypt = dom.siv.encrypt
    prefix = f"v{dom.version}."
    mrn_ad = _mrn_ad(provider)
    match, types, ad_of, b2a, to_urlsafe = _PRE_RE.fullmatch, _TYPES, _AD, binascii.b2a_base64, _TO_URLSAFE
    out: list[Result] = []
    append = out.append
    for text in originals:
        m = match(text) if type(text) is str else None
        if m is None:
            append((None, INVALID_FORMAT))
            continue
        ptype = types.get(m.group(1))
        if ptype is None:
            append((None, UNKNOWN_TYPE))
            continue
        try:
            pre = _unb64u(m.group(3))
        except ValueError:  # binascii.Error: a length or padding no base64url text can have
            append((None, INVALID_FORMAT))
            continue
        ad = ad_of.get(ptype)
        if ad is None:  # the reversible MRN type: bound to the delivering provider
            if mrn_ad is None:
                append((None, PROVIDER_REQUIRED))
                continue
            if not PRE_MRN_MIN <= len(pre) <= PRE_MRN_MAX:
                append((None, INVALID_LENGTH))
                continue
            ad = mrn_ad
        elif len(pre) != PRE_HMAC_LEN:
            append((None, INVALID_LENGTH))
            continue
        final = b2a(encrypt(pre, ad), newline=False).translate(to_urlsafe).rstrip(b"=")
        append((prefix + final.decode("ascii"), None))
    return out


def translate(keys: KeyStore, registry: str, items: Sequence[Any]) -> list[Result]:
    """Stored pseudonyms under an older usable version → the current version; nothing is stored or learnt."""
    new = keys.current_key(registry)
    out: list[Result] = []
    for text in items:
        m = _STORED_RE.fullmatch(text) if type(text) is str else None
        if m is None:
            out.append((None, INVALID_FORMAT))
            continue
        ptype = _TYPES.get(m.group(1))
        if ptype is None:
            out.append((None, UNKNOWN_TYPE))
            continue
        provider = m.group(3)
        if (ptype in nlps1.REVERSIBLE) != bool(provider):
            out.append((None, PROVIDER_REQUIRED if provider is None else INVALID_FORMAT))
            continue
        try:
            version, final = nlps1.parse_identifier(m.group(2))
            if version == new.version:
                out.append((m.group(2), None))  # already current: idempotent for re-sent batches
                continue
            old = keys.domain_key(registry, version)
            out.append((nlps1.translate(m.group(2), ptype, old, new, provider), None))
        except KeyStoreError:
            out.append((None, UNUSABLE_VERSION))
        except nlps1.PseudonymError:
            out.append((None, DOES_NOT_OPEN))
    return out


def depseudonymise(keys: KeyStore, registry: str, provider: str, items: Sequence[Any]) -> list[Result]:
    """MRN final → the provider's inner layer (base64url); opens only for the provider that delivered it."""
    ad = _mrn_ad(provider)
    if ad is None:
        return [(None, PROVIDER_REQUIRED)] * len(items)
    out: list[Result] = []
    for text in items:
        m = _STORED_RE.fullmatch(text) if type(text) is str else None
        if m is None or m.group(3) is not None:
            out.append((None, INVALID_FORMAT))
            continue
        if _TYPES.get(m.group(1)) not in nlps1.REVERSIBLE:
            out.append((None, NOT_REVERSIBLE))
            continue
        try:
            version, final = nlps1.parse_identifier(m.group(2))
            dom = keys.domain_key(registry, version)
            out.append((_b64u(dom.siv.decrypt(final, ad)), None))
        except KeyStoreError:
            out.append((None, UNUSABLE_VERSION))
        except (nlps1.PseudonymError, InvalidTag, ValueError):
            out.append((None, DOES_NOT_OPEN))
    return out


def pre_string(ptype: str, key_version: int, value: bytes) -> str:
    """The wire form of one pre-pseudonym (client side and EmbeddedTTP)."""
    return f"{ptype}:{key_version}:{nlps1.b64u(value)}"
