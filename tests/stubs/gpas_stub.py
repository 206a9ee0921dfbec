"""A stub of the gPAS TTP-FHIR gateway (2023+), from the published examples in mosaic-hgw/ttp-fhir-ig-gpas
(Parameters-PseudonymizeAllowCreate-request/response-example-1, DePseudonymize-response-example-1/2,
Pseudonymize-response-example-2 for the ``error`` parameter).

Like gPAS it keeps an original → pseudonym table per domain (so answers are stable) and makes random
pseudonyms with a domain prefix. Test hooks: ``max_originals`` (installations that cap a request),
``refuse`` (originals answered with an ``error``/``not-found``), ``failures`` (scripted 503/429 ...),
``reverse`` (answers in reverse order, parts in reverse order: clients must match by name), ``auth``.
Every request body is recorded in ``requests`` so tests can count batches and inspect what was sent.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.stubs.common import FHIR_JSON, Script, StubAuth, outcome

SYSTEM = "https://ths-greifswald.de/gpas"
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


@dataclass
class GpasState:
    domains: dict[str, str] = field(default_factory=lambda: {"registry-example": "reg_"})  # domain → prefix
    table: dict[tuple[str, str], str] = field(default_factory=dict)  # (domain, original) → pseudonym
    requests: list[dict[str, Any]] = field(default_factory=list)  # operation + the values received
    max_originals: int | None = None
    refuse: set[str] = field(default_factory=set)
    reverse: bool = False
    auth: StubAuth = field(default_factory=StubAuth)
    script: Script = field(default_factory=Script)

    def received(self, operation: str) -> list[list[str]]:
        return [r["values"] for r in self.requests if r["operation"] == operation]


def _ident(value: str) -> dict[str, Any]:
    return {"system": SYSTEM, "value": value}


def _answer(state: GpasState, params: list[dict[str, Any]]) -> Response:
    if state.reverse:
        params = [{**p, "part": list(reversed(p["part"]))} for p in reversed(params)]
    return Response(orjson.dumps({"resourceType": "Parameters", "parameter": params}), media_type=FHIR_JSON)


async def _read(request: Request, state: GpasState, operation: str, value_name: str
                ) -> tuple[str, list[str]] | Response:
    if not state.auth.allowed(request):
        return outcome(401, "login", "Fehlende Authentifizierung oder Autorisierung.")
    failure = state.script.next_failure()
    if failure is not None:
        return failure
    try:
        body = orjson.loads(await request.body())
        params = body["parameter"]
        targets = [p["valueString"] for p in params if p["name"] == "target"]
        values = [p["valueString"] for p in params if p["name"] == value_name]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return outcome(400, "invalid", "Fehlende oder fehlerhafte Parameter.")
    state.requests.append({"operation": operation, "values": values, "targets": targets})
    if len(targets) != 1 or not values:
        return outcome(400, "invalid", "Fehlende oder fehlerhafte Parameter.")
    if targets[0] not in state.domains:
        return outcome(404, "not-found", "Parameter mit unbekanntem Inhalt.")
    if state.max_originals is not None and len(values) > state.max_originals:
        return outcome(400, "too-costly", "Zu viele Werte in einer Anfrage.")
    return targets[0], values


def create_gpas_stub(state: GpasState) -> FastAPI:
    app = FastAPI()

    @app.get("/metadata")
    async def metadata() -> Response:
        return Response(orjson.dumps({"resourceType": "CapabilityStatement", "status": "active",
                                      "kind": "instance", "fhirVersion": "4.0.1"}), media_type=FHIR_JSON)

    @app.post("/token")
    async def token(request: Request) -> Response:
        return await state.auth.token(request)

    @app.post("/$pseudonymizeAllowCreate")
    async def pseudonymize_allow_create(request: Request) -> Response:
        read = await _read(request, state, "pseudonymizeAllowCreate", "original")
        if isinstance(read, Response):
            return read
        domain, originals = read
        params = []
        for original in originals:
            if original in state.refuse:
                params.append({"name": "error", "part": [
                    {"name": "original", "valueIdentifier": _ident(original)},
                    {"name": "error-code", "valueCoding": {"system": "http://hl7.org/fhir/issue-type",
                                                           "code": "not-found", "display": "Not Found"}}]})
                continue
            key = (domain, original)
            if key not in state.table:
                suffix = "".join(secrets.choice(_ALPHABET) for _ in range(8))
                state.table[key] = state.domains[domain] + suffix
            params.append({"name": "pseudonym", "part": [
                {"name": "target", "valueIdentifier": _ident(domain)},
                {"name": "original", "valueIdentifier": _ident(original)},
                {"name": "pseudonym", "valueIdentifier": _ident(state.table[key])}]})
        return _answer(state, params)

    @app.post("/$dePseudonymize")
    async def de_pseudonymize(request: Request) -> Response:
        read = await _read(request, state, "dePseudonymize", "pseudonym")
        if isinstance(read, Response):
            return read
        domain, pseudonyms = read
        reverse = {p: o for (d, o), p in state.table.items() if d == domain}
        params = []
        for psn in pseudonyms:
            if psn not in reverse:
                params.append({"name": "error", "part": [
                    {"name": "pseudonym", "valueIdentifier": _ident(psn)},
                    {"name": "error-code", "valueCoding": {"system": "http://hl7.org/fhir/issue-type",
                                                           "code": "not-found", "display": "Not Found"}}]})
                continue
            params.append({"name": "original", "part": [
                {"name": "target", "valueIdentifier": _ident(domain)},
                {"name": "original", "valueIdentifier": _ident(reverse[psn])},
                {"name": "pseudonym", "valueIdentifier": _ident(psn)}]})
        return _answer(state, params)

    return app
