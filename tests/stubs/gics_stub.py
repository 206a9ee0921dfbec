"""A stub of the gICS part of the TTP-FHIR gateway, from the published OperationDefinitions and examples in
mosaic-hgw/ttp-fhir-ig (IsConsented-request/response-example-1, AllConsentsForPerson-response-example-1,
AddConsentOptOut-response-example-1 for how an opt-out is recorded: a permitted objection policy).

``records`` maps a signer id (personIdentifier value) to the Consents stored for it. ``$allConsentsForPerson``
answers a collection Bundle with one nested Bundle (Consent + Patient) per Consent, and pages with ``_count``
/ ``_offset`` and a ``next`` link when ``page_limit`` is set (TTP-FHIR Gateway 2023.1.1+). Every request is
recorded in ``requests`` (operation, signer ids, domain) so tests can count calls and inspect what was sent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.stubs.common import FHIR_JSON, Script, StubAuth, outcome

PSEUDONYM_SYSTEM = "https://ths-greifswald.de/fhir/gics/identifiers/Pseudonym"
POLICY_SYSTEM = "https://ths-greifswald.de/fhir/CodeSystem/gics/Policy"


@dataclass
class StoredConsent:
    policy: tuple[str, str] = (POLICY_SYSTEM, "p-opt-out")
    provision_type: str = "permit"
    status: str = "active"
    start: str = "2024-08-16T12:08:49+02:00"
    end: str = "3000-01-01T00:00:00+01:00"


@dataclass
class GicsState:
    domain: str = "registry-objections"
    records: dict[str, list[StoredConsent]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    page_limit: int | None = None
    auth: StubAuth = field(default_factory=StubAuth)
    script: Script = field(default_factory=Script)

    def signer_ids_received(self) -> list[str]:
        return [s for r in self.requests for s in r["signers"]]


def _fhir(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type=FHIR_JSON)


def _consent_bundle(sid: str, stored: StoredConsent) -> dict[str, Any]:
    patient_id, consent_id = str(uuid.uuid4()), str(uuid.uuid4())
    consent = {
        "resourceType": "Consent", "id": consent_id, "status": stored.status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": f"urn:uuid:{patient_id}", "display": f"Pseudonym {sid}"},
        "provision": {"type": "permit", "period": {"start": stored.start, "end": stored.end},
                      "provision": [{"type": stored.provision_type,
                                     "period": {"start": stored.start, "end": stored.end},
                                     "code": [{"coding": [{"system": stored.policy[0],
                                                           "code": stored.policy[1]}]}]}]}}
    patient = {"resourceType": "Patient", "id": patient_id,
               "identifier": [{"system": PSEUDONYM_SYSTEM, "value": sid}]}
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": f"urn:uuid:{consent_id}", "resource": consent},
        {"fullUrl": f"urn:uuid:{patient_id}", "resource": patient}]}


def create_gics_stub(state: GicsState) -> FastAPI:
    app = FastAPI()

    @app.get("/metadata")
    async def metadata() -> Response:
        return _fhir({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"})

    @app.post("/token")
    async def token(request: Request) -> Response:
        return await state.auth.token(request)

    async def read(request: Request, operation: str) -> tuple[dict[str, Any], list[str]] | Response:
        if not state.auth.allowed(request):
            return outcome(401, "login", "Fehlende Authentifizierung oder Autorisierung.")
        failure = state.script.next_failure()
        if failure is not None:
            return failure
        try:
            params = orjson.loads(await request.body())["parameter"]
            signers = [p["valueIdentifier"]["value"] for p in params if p["name"] == "personIdentifier"]
            domain = next(p["valueString"] for p in params if p["name"] == "domain")
        except (orjson.JSONDecodeError, KeyError, TypeError, StopIteration):
            return outcome(400, "invalid", "Fehlende oder fehlerhafte Parameter.")
        state.requests.append({"operation": operation, "signers": signers, "domain": domain})
        if domain != state.domain:
            return outcome(404, "not-found", "Parameter mit unbekanntem Inhalt.")
        return {p["name"]: p for p in params}, signers

    @app.post("/$isConsented")
    async def is_consented(request: Request) -> Response:
        got = await read(request, "isConsented")
        if isinstance(got, Response):
            return got
        params, [sid] = got
        coding = params["policy"]["valueCoding"]
        policy = (coding["system"], coding["code"])
        consented = any(c.policy == policy and c.status == "active" and c.provision_type == "permit"
                        for c in state.records.get(sid, []))
        return _fhir({"resourceType": "Parameters",
                      "parameter": [{"name": "consented", "valueBoolean": consented}]})

    @app.post("/$allConsentsForPerson")
    async def all_consents_for_person(request: Request) -> Response:
        got = await read(request, "allConsentsForPerson")
        if isinstance(got, Response):
            return got
        _, signers = got
        entries = [{"resource": _consent_bundle(sid, c)}
                   for sid in signers for c in state.records.get(sid, [])]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
        if state.page_limit is not None:
            offset = int(request.query_params.get("_offset", 0))
            count = int(request.query_params.get("_count", state.page_limit))
            if offset + count < len(entries):
                base = str(request.base_url).rstrip("/")
                bundle["link"] = [{"relation": "next", "url": f"{base}/$allConsentsForPerson"
                                                              f"?_offset={offset + count}&_count={count}"}]
            entries = entries[offset:offset + count]
        bundle["entry"] = entries
        return _fhir(bundle)

    return app
