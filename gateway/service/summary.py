"""What the EHR gets back: a FHIR Parameters resource with counts only (no patient data)."""

from __future__ import annotations

from typing import Any

from gateway.process import REPORT_COUNTS, dropped_by_reason


def _counts(name: str, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "part": [{"name": str(k), "valueInteger": int(v)} for k, v in sorted(counts.items())],
    }


def delivery_parameters(
    delivery_id: str | None, status: str, report: dict[str, Any], registry_status: int | None = None
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "status", "valueCode": status}]
    if delivery_id:
        params.append({"name": "delivery", "valueString": delivery_id})
    if registry_status is not None:
        params.append({"name": "registryStatus", "valueInteger": registry_status})
    for key in REPORT_COUNTS:
        if key in report:
            params.append({"name": key, "valueInteger": int(report[key])})
    for key in ("optOutReasons", "pseudonymTypes", "pseudonymsSkipped"):
        if report.get(key):
            params.append(_counts(key, report[key]))
    deid = report.get("deidentification") or {}
    if "resourcesKept" in deid:
        params.append({"name": "resourcesDelivered", "valueInteger": int(deid["resourcesKept"])})
    dropped = dropped_by_reason(report)
    if dropped:
        params.append(_counts("resourcesDropped", _flatten(dropped)))
    if report.get("warnings"):  # e.g. a reference to a resource not in the Bundle, dropped: where, never what
        outcome = {"resourceType": "OperationOutcome", "issue": report["warnings"]}
        params.append({"name": "warnings", "resource": outcome})
    return {"resourceType": "Parameters", "parameter": params}


def _flatten(counts: dict[str, Any]) -> dict[str, int]:
    flat: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            for sub, n in value.items():
                flat[f"{key}:{sub}"] = int(n)
        else:
            flat[key] = int(value)
    return flat
