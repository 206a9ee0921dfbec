"""FHIR JSON responses serialised with orjson (never through fhir.resources models)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

FHIR_JSON = "application/fhir+json"


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON, headers=headers)
