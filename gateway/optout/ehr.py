"""Opt-out source that asks the EHR: `GET [base]/Consent?patient=Patient/{id}&status=active`.

The searchset is evaluated with the same rules as Consents posted in a Bundle (`gateway.optout.consent`).
Anything short of a clean answer is `unknown` (fail closed, domain spec §6): transport errors and timeouts,
a status other than 200, a body that is not a searchset Bundle, an OperationOutcome with an error in it,
more pages than `max_pages`, a `next` link to another origin (we would send our credentials there), or a
Consent about another patient. Clean answers are cached for `cache_ttl` seconds per (patient id, registry);
failures are not cached, so the next request asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.optout.base import Decision, PatientRef, Reason
from gateway.optout.consent import ConsentPolicy, consent_patient_matches, decide_for_patients, utc_now
from gateway.outcome import FhirError
from gateway.pipeline.parse import parse_json

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class _NotClean(Exception):
    """The EHR did not give a usable answer; carries a Reason code only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BearerToken(httpx.Auth):
    """`Authorization: Bearer <token>`; the token comes from a callable so it can be rotated."""

    def __init__(self, token: str | Callable[[], str]) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request):
        token = self._token() if callable(self._token) else self._token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


class EhrConsentSearch:
    """Ask the EHR's FHIR API for active Consents per patient. Owns its httpx client unless one is given."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | tuple[str, str] | None = None,
        timeout: float = 5.0,
        cache_ttl: float = 60.0,
        policy: ConsentPolicy | None = None,
        scopes: Sequence[str] = (),
        max_pages: int = 5,
        max_bytes: int = 5 << 20,
        max_concurrency: int = 8,
        cache_size: int = 10_000,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        """`scopes`: optional consentscope codes to add as `scope=` to the search (e.g. research); the
        evaluation does not depend on them. `policy`: purposes, registry actors and policy URIs."""
        self.base_url = base_url.rstrip("/")
        self.policy = policy or ConsentPolicy()
        self.scopes = list(scopes)
        self.cache_ttl = cache_ttl
        self.max_pages = max_pages
        self.max_bytes = max_bytes
        self._client = client or httpx.AsyncClient(auth=auth, timeout=timeout, follow_redirects=False)
        self._owns_client = client is None
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._cache: OrderedDict[tuple[str, str, str], tuple[float, Decision]] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock
        self._now = now

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> EhrConsentSearch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        decisions = await asyncio.gather(*(self._check_one(p) for p in patients))
        return {p.key: d for p, d in zip(patients, decisions, strict=True)}

    async def _check_one(self, patient: PatientRef) -> Decision:
        patient_id = ehr_patient_id(patient)
        if patient_id is None:
            return Decision("unknown", Reason.EHR_NO_PATIENT_ID)
        # per provider too: two hospitals' records may share an id (a probe: one's answer served the other)
        cache_key = (patient.provider, patient_id, patient.registry)
        cached = self._cached(cache_key)
        if cached is not None:
            return cached
        try:
            async with self._semaphore:
                consents = await self._search(patient_id)
            if any(consent_patient_matches(c, patient) is False for c in consents):
                raise _NotClean(Reason.EHR_OTHER_PATIENT)
        except _NotClean as failure:
            log.warning("EHR consent search gave no clean answer: %s", failure.reason)
            return Decision("unknown", failure.reason)
        decision = decide_for_patients(consents, [patient], self.policy, self._now())[patient.key]
        self._remember(cache_key, decision)
        return decision

    def _cached(self, key: tuple[str, str, str]) -> Decision | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        expires, decision = hit
        if self._clock() >= expires:
            del self._cache[key]
            return None
        return decision

    def _remember(self, key: tuple[str, str, str], decision: Decision) -> None:
        self._cache[key] = (self._clock() + self.cache_ttl, decision)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _search(self, patient_id: str) -> list[dict]:
        params: list[tuple[str, str]] | None = [("patient", f"Patient/{patient_id}"), ("status", "active")]
        params += [("scope", scope) for scope in self.scopes]  # type: ignore[operator]
        url: str | None = f"{self.base_url}/Consent"
        consents: list[dict] = []
        for _ in range(self.max_pages):
            bundle = await self._get(url, params)  # type: ignore[arg-type]
            consents += _consents_of_searchset(bundle)
            # A next link carries its own query; params=None keeps it (an empty list would erase it).
            url, params = _next_link(bundle), None
            if url is None:
                total = bundle.get("total")
                if total is not None and type(total) is not int:
                    raise _NotClean(Reason.EHR_BAD_RESPONSE)  # a re-probe's "3" was taken for no count
                if type(total) is int and total > len(consents):
                    # more matches than the pages held, and no link to the rest (a probe's `total: 3` of no
                    # entries was taken for no Consent at all)
                    raise _NotClean(Reason.EHR_INCOMPLETE)
                return consents
            if not _same_origin(url, self.base_url):
                raise _NotClean(Reason.EHR_INCOMPLETE)
        raise _NotClean(Reason.EHR_INCOMPLETE)

    async def _get(self, url: str, params: list[tuple[str, str]] | None) -> dict:
        try:
            response = await self._client.get(url, params=params, headers={"Accept": FHIR_JSON})
        except httpx.HTTPError as exc:  # transport errors, timeouts, invalid URLs
            log.warning("EHR consent search failed (%s)", type(exc).__name__)
            raise _NotClean(Reason.EHR_UNAVAILABLE) from None
        if response.status_code != 200:
            raise _NotClean(Reason.EHR_BAD_STATUS)
        try:
            return parse_json(response.content, max_bytes=self.max_bytes)
        except FhirError:
            raise _NotClean(Reason.EHR_BAD_RESPONSE) from None


def ehr_patient_id(patient: PatientRef) -> str | None:
    """The EHR's id of the patient: `Patient.id`, else the id in a RESTful fullUrl (`.../Patient/{id}`)."""
    rid = patient.resource.get("id")
    if isinstance(rid, str) and _is_id(rid):
        return rid
    parts = patient.key.split("/_history/", 1)[0].split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and _is_id(parts[-1]):
        return parts[-1]
    return None


def _is_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in value)


def _consents_of_searchset(bundle: dict) -> list[dict]:
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
        raise _NotClean(Reason.EHR_BAD_RESPONSE)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise _NotClean(Reason.EHR_BAD_RESPONSE)
    consents = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise _NotClean(Reason.EHR_BAD_RESPONSE)
        rtype = resource.get("resourceType")
        if rtype == "Consent":
            consents.append(resource)
        elif rtype == "OperationOutcome":
            if _has_error(resource):  # e.g. "too many results" or a partial search
                raise _NotClean(Reason.EHR_BAD_RESPONSE)
        elif _search_mode(entry) == "match":
            raise _NotClean(Reason.EHR_BAD_RESPONSE)  # a match that is not a Consent: not our question
    return consents


def _search_mode(entry: dict) -> Any:
    search = entry.get("search")
    return search.get("mode", "match") if isinstance(search, dict) else "match"


# Issue codes that say the result is not whole, whatever their severity (a probe's "results truncated" was a
# warning, and the search was taken as complete)
_INCOMPLETE = frozenset({"too-costly", "incomplete", "throttled", "timeout", "too-long"})


def _has_error(outcome: dict) -> bool:
    issues = outcome.get("issue") or []
    return not isinstance(issues, list) or any(
        not isinstance(i, dict) or i.get("severity") in ("error", "fatal") or i.get("code") in _INCOMPLETE
        for i in issues
    )


def _next_link(bundle: dict) -> str | None:
    links = bundle.get("link") or []
    if not isinstance(links, list):
        raise _NotClean(Reason.EHR_BAD_RESPONSE)
    for link in links:
        relation = link.get("relation") if isinstance(link, dict) else None
        # "Next" too: a re-probe's was not followed, and the first page taken for the whole answer
        if isinstance(relation, str) and relation.lower() == "next":
            url = link.get("url")
            if not isinstance(url, str) or not url:
                raise _NotClean(Reason.EHR_BAD_RESPONSE)
            return url
    return None


def _same_origin(url: str, base_url: str) -> bool:
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)
