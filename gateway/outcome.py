"""FHIR OperationOutcome errors.

Every error the gateway reports names *where* (a FHIRPath-like expression) and *what kind*, never the
offending value: input values may identify a patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Issue:
    code: str  # FHIR issue-type: invalid, structure, required, value, too-costly, security, ...
    diagnostics: str  # fixed text written by us, never containing an input value
    expression: tuple[str, ...] = ()
    severity: str = "error"

    def as_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


@dataclass
class FhirError(Exception):
    """An error that becomes an OperationOutcome with an HTTP status."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def single(cls, status: int, code: str, diagnostics: str, *expression: str, **kw: Any) -> FhirError:
        return cls(status, [Issue(code, diagnostics, tuple(expression))], **kw)

    def __str__(self) -> str:
        return "; ".join(f"{i.code}: {i.diagnostics} at {','.join(i.expression)}" for i in self.issues)

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.as_fhir() for i in issues]}


def informational(diagnostics: str) -> dict[str, Any]:
    return operation_outcome([Issue("informational", diagnostics, severity="information")])
