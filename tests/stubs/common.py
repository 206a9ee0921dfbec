"""Pieces the stubs share: scripted failures, Basic / OAuth2 client-credentials checks, a token endpoint."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

FHIR_JSON = "application/fhir+json"


def outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


@dataclass
class StubAuth:
    """Which credentials the stub accepts: none, Basic user/password, or Bearer tokens it issued itself."""

    mode: str = "none"  # none | basic | oauth2
    username: str = "gateway"
    password: str = "test-password"  # test constant, never a real credential
    client_id: str = "gateway"
    client_secret: str = "test-client-secret"  # test constant
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    token_requests: int = 0

    def allowed(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if self.mode == "none":
            return True
        if self.mode == "basic":
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return header == f"Basic {expected}"
        token = header.removeprefix("Bearer ")
        return header.startswith("Bearer ") and token in self.issued and token not in self.revoked

    async def token(self, request: Request) -> Response:
        """OAuth2 client-credentials grant (RFC 6749 §4.4) with HTTP Basic client authentication."""
        self.token_requests += 1
        form = await request.form()
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if request.headers.get("authorization") != f"Basic {expected}":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        token = secrets.token_urlsafe(16)
        self.issued.append(token)
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": 300})


@dataclass
class Script:
    """Failures to answer before the real answer: (status, headers) popped per POST to an operation."""

    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def next_failure(self) -> Response | None:
        if not self.failures:
            return None
        status, headers = self.failures.pop(0)
        return outcome(status, "transient", "try later", headers)
