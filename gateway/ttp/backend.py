"""The interface the gateway uses to reach a TTP, whatever it is (NLPS1 over HTTP, in-process, gPAS, ...).

Contract:
- ``pseudonymise(registry, items)`` returns exactly one ``TTPResult`` per item, ``result.index`` = position in
  ``items``; a value the TTP could not process has ``identifier_value=None`` and an ``error_code`` (a fixed
  word such as ``invalid-length``), and the other values are still returned.
- When the TTP cannot be reached or refuses the whole call, the backend raises ``TTPUnavailable`` (fail
  closed: the gateway then delivers nothing for that bundle rather than something without pseudonyms).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gateway.pseudonym.types import PrePseudonym


@dataclass(frozen=True, slots=True)
class TTPResult:
    index: int
    type: str
    identifier_value: str | None
    error_code: str | None


class TTPUnavailable(Exception):
    """The TTP could not be used for this call; the message is a fixed text (never a value or key)."""


class TTPRejected(TTPUnavailable):
    """The TTP answered with a 4xx for the whole call (authentication, authorisation, unknown domain, ...)."""

    def __init__(self, status: int, diagnostics: str) -> None:
        super().__init__(f"TTP refused the request ({status}): {diagnostics}")
        self.status = status
        self.diagnostics = diagnostics


@runtime_checkable
class TTPBackend(Protocol):
    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]: ...

    async def probe(self) -> None: ...


async def round_trip(ttp: TTPBackend, registry: str, source_version: int) -> str | None:
    """One pseudonym of 32 random bytes (no patient data) in `registry`'s domain, with our credentials: a
    check of the API key, the sealing and the domain key that the unauthenticated probe cannot give. Only
    for stateless TTPs (NLPS1): a gPAS-like TTP would store the value. Raises TTPRejected/TTPUnavailable;
    returns the TTP's error code when it answered without a pseudonym, else None."""
    (result,) = await ttp.pseudonymise(registry, [PrePseudonym("GG", source_version, os.urandom(32))])
    if result.error_code or not result.identifier_value:
        return result.error_code or "empty answer"
    return None
