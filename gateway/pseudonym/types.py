"""Data that flows between the source stage and a TTP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrePseudonym:
    """One pre-pseudonym: the only thing about a patient that ever goes to a TTP."""

    type: str
    key_version: int
    value: bytes
