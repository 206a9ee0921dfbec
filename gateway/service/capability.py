"""The gateway's CapabilityStatement (GET /metadata)."""

from __future__ import annotations

from typing import Any

from gateway import __version__


def capability_statement(registries: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "kind": "instance",
        "software": {"name": "fhir-delivery-gateway", "version": __version__},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/json"],
        "implementation": {
            "description": "Delivery gateway: opt-out, NLPS1 pseudonymisation at the source, "
            "de-identification "
            f"and durable forwarding to quality registries ({', '.join(sorted(registries))})"
        },
        "rest": [
            {
                "mode": "server",
                "security": {
                    "description": "API key (Authorization: Bearer) or mTLS client identity "
                    "via a trusted proxy",
                },
                "resource": [
                    {
                        "type": "Bundle",
                        "interaction": [{"code": "create"}],
                        "documentation": "POST /registries/{registry}/Bundle: transaction, batch "
                        "or collection",
                    },
                ],
                "operation": [
                    {
                        "name": "import",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/import",
                        "documentation": "POST /registries/{registry}/$import: NDJSON bulk export "
                        "(yearly delivery)",
                    },
                ],
            }
        ],
    }
