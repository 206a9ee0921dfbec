"""Value types shared by the pseudonym packages (extraction → source stage → TTP).

Other packages import these from here, never from the modules that produce them, so the producers can change
without touching the consumers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PseudonymInput:
    """One pseudonym type's normalised inputs. Holds plain patient values: never log or print it."""

    type: str  # canonical NLPS1 type, e.g. "SNGGV"
    fields: tuple[str, ...]
    canonical: str  # "NLPS1|<TYPE>|<field>|<field>..."

    def __repr__(self) -> str:
        # The default repr would print the plain values into tracebacks and logs.
        return f"PseudonymInput(type={self.type!r}, fields=<{len(self.fields)} hidden>)"


@dataclass(frozen=True, slots=True)
class Extraction:
    """What one Patient yields: inputs for the types that could be built, a reason for each that could not."""

    inputs: list[PseudonymInput] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # type -> skip reason (fixed text, never a value)


@dataclass(frozen=True, slots=True)
class PrePseudonym:
    """Output of the source stage: what is sent to the TTP (no plain value)."""

    type: str
    key_version: int  # K_src version, or K_mrn version for the MRN type
    value: bytes
