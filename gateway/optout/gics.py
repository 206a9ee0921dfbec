"""GicsConsent: an opt-out source over a gICS consent store (MOSAIC/Greifswald TTP-FHIR Gateway, gICS part).

Wire (mosaic-hgw/ttp-fhir-ig, OperationDefinitions IsConsented and AllConsentsForPerson):

    POST {base}/$isConsented           personIdentifier (Identifier), domain, policy (Coding), version,
                                       config (Parameters: ignoreVersionNumber, ...) → ``consented`` boolean
    POST {base}/$allConsentsForPerson  personIdentifier 1..n (OR-ed), domain → Bundle (collection) with one
                                       entry per Consent (a nested Bundle with Consent, Patient, ...);
                                       TTP-FHIR Gateway 2023.1.1+ pages with ``_count``/``_offset`` and a
                                       ``next`` link, which is followed (same origin only)

Who the patient is: the gICS signer id. The gateway never sends a BSN, name or patient number: the caller
injects ``signer_id(PatientRef) -> str | None``, a keyed pseudonymous id the hospital also used when it
registered the objection in gICS (``hmac_signer_id`` builds the register's HMAC of provider + patient
number). As a last guard a signer id equal to any identifier value of the Patient is refused (unknown).

What counts as an objection: a Consent in the domain (status active) with a ``permit`` provision (at any
depth) whose period covers now and whose code is one of the configured objection policies (gICS opt-out
templates record an objection as a permitted objection policy, e.g. ``p-opt-out``). With ``$isConsented``:
``consented = true`` for any objection policy. No record in gICS at all → ``no_record`` (default allowed:
the registries are opt-out; set ``unknown`` where gICS must know every patient). Any error, timeout or
unreadable answer → ``unknown`` (fail closed). Clean answers are cached for ``cache_ttl`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from gateway.forward import RegistryAuth
from gateway.optout.base import Decision, PatientRef, combine
from gateway.optout.consent import Unparseable, _period_covers, utc_now
from gateway.optout.register import objection_digest, stored_forms
from gateway.ttp.backend import TTPUnavailable
from gateway.ttp.client import RetryPolicy, _Retryable
from gateway.ttp.gpas import auth_from_options, auth_headers, classify, http_client

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
PSEUDONYM_SYSTEM = "https://ths-greifswald.de/fhir/gics/identifiers/Pseudonym"
OBJECTION = "gics-objection"
NO_OBJECTION = "gics-no-objection"
NO_RECORD = "gics-no-record"
NO_SIGNER_ID = "gics-no-signer-id"
SIGNER_ID_IS_IDENTIFIER = "gics-signer-id-is-an-identifier"
UNAVAILABLE = "gics-unavailable"
BAD_RESPONSE = "gics-bad-response"
UNATTRIBUTABLE = "gics-consent-not-attributable"

Policy = tuple[str, str]  # (system, code)


class _NotClean(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hmac_signer_id(hash_key: bytes) -> Callable[[PatientRef], str | None]:
    """Signer id = the objection register's HMAC-SHA-256 of ``provider|patient number`` (hex); None without
    a patient number. The hospital registers objections in gICS under the same value."""
    objection_digest(hash_key, "check", "key")  # validate the key once

    def signer_id(patient: PatientRef) -> str | None:
        if not patient.mrn or not patient.mrn.strip():
            return None
        return objection_digest(hash_key, patient.provider, patient.mrn)

    return signer_id


def parse_policies(values: Iterable[Any]) -> list[Policy]:
    """``system|code`` strings or ``{system, code}`` mappings."""
    out = []
    for v in values:
        if isinstance(v, Mapping):
            system, code = v.get("system"), v.get("code")
        else:
            system, _, code = str(v).rpartition("|")
        if not system or not code:
            raise ValueError("an objection policy needs a system and a code ('system|code')")
        out.append((str(system), str(code)))
    if not out:
        raise ValueError("gICS needs at least one objection policy")
    return out


class GicsConsent:
    """OptOutSource over gICS. ``bulk=True``: ``$allConsentsForPerson`` with up to ``page_size`` signer ids
    per request; ``bulk=False``: ``$isConsented`` per patient and objection policy."""

    def __init__(self, base_url: str, *, domain: str, objection_policies: Iterable[Any],
                 signer_id: Callable[[PatientRef], str | None], auth: RegistryAuth | None = None,
                 domain_map: Mapping[str, str] | None = None, signer_system: str = PSEUDONYM_SYSTEM,
                 policy_version: str = "1.0", ignore_version: bool = True, bulk: bool = True,
                 page_size: int = 50, max_pages: int = 20, no_record: str = "allowed",
                 cache_ttl: float = 60.0, cache_size: int = 10_000, timeout: float = 5.0, retries: int = 2,
                 max_concurrency: int = 8, verify: bool | str = True, backoff: float = 0.2,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], datetime] = utc_now) -> None:
        if no_record not in ("allowed", "unknown"):
            raise ValueError("no_record must be 'allowed' or 'unknown'")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.domain, self.domain_map = domain, dict(domain_map or {})
        self.policies = parse_policies(objection_policies)
        self.signer_id, self.signer_system = signer_id, signer_system
        self.policy_version, self.ignore_version = policy_version, ignore_version
        self.bulk, self.page_size, self.max_pages, self.no_record = bulk, page_size, max_pages, no_record
        self.cache_ttl, self._cache_size = cache_ttl, cache_size
        self._auth = auth
        self._http = http_client(base_url, timeout=timeout, verify=verify, max_concurrency=max_concurrency,
                                 auth=auth, transport=transport)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._retry = RetryPolicy(retries, backoff, 2.0, 10.0)
        self._cache: OrderedDict[tuple[str, str], tuple[float, Decision]] = OrderedDict()
        self._clock, self._now = clock, now

    async def __aenter__(self) -> GicsConsent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- OptOutSource ---------------------------------------------------------------------------------
    async def check(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        """Each of a patient's numbers is asked (an objection registered under an old number holds)."""
        asked = {p.key: [replace(p, key=f"{p.key}#{n}", mrn=number, other_mrns=())
                         for n, number in enumerate(_numbers(p))] for p in patients}
        answers = await self._check_numbers([one for ones in asked.values() for one in ones])
        return {key: _of_all_numbers([answers[one.key] for one in ones]) for key, ones in asked.items()}

    async def _check_numbers(self, patients: Sequence[PatientRef]) -> dict[str, Decision]:
        out: dict[str, Decision] = {}
        todo: dict[str, list[tuple[PatientRef, str]]] = {}  # domain → (patient, signer id)
        for p in patients:
            sid = self._signer(p)
            if isinstance(sid, Decision):
                out[p.key] = sid
                continue
            domain = self.domain_map.get(p.registry, self.domain)
            cached = self._cached((domain, sid))
            if cached is not None:
                out[p.key] = cached
            else:
                todo.setdefault(domain, []).append((p, sid))
        for domain, pending in todo.items():
            if self.bulk:
                pages = [pending[s:s + self.page_size] for s in range(0, len(pending), self.page_size)]
                answers = await asyncio.gather(*(self._bulk(domain, page) for page in pages))
                decided = {k: d for answer in answers for k, d in answer.items()}
            else:
                found = await asyncio.gather(*(self._single(domain, sid) for _, sid in pending))
                decided = {p.key: d for (p, _), d in zip(pending, found, strict=True)}
            for p, sid in pending:
                decision = decided[p.key]
                out[p.key] = decision
                if decision.status != "unknown":
                    self._remember((domain, sid), decision)
        return out

    async def probe(self) -> None:
        try:
            headers = {"Accept": FHIR_JSON, **await auth_headers(self._auth, self._http)}
            response = await self._http.get("/metadata", headers=headers)
        except (httpx.HTTPError, _Retryable, TTPUnavailable):
            raise TTPUnavailable("gICS not reachable") from None
        if response.status_code != 200:
            raise TTPUnavailable(f"gICS metadata check failed (HTTP {response.status_code})")

    # --- per patient: $isConsented --------------------------------------------------------------------
    async def _single(self, domain: str, sid: str) -> Decision:
        answers = await asyncio.gather(*(self._is_consented(domain, sid, policy) for policy in self.policies),
                                       return_exceptions=True)
        if any(a is True for a in answers):
            return Decision("objected", OBJECTION)  # one recorded objection suffices, whatever the rest said
        for a in answers:
            if isinstance(a, BaseException):
                reason = a.reason if isinstance(a, _NotClean) else UNAVAILABLE
                log.warning("gICS gave no clean answer: %s", reason)
                return Decision("unknown", reason)
        return Decision("allowed", NO_OBJECTION)

    async def _is_consented(self, domain: str, sid: str, policy: Policy) -> bool:
        config = {"resourceType": "Parameters", "parameter": [
            {"name": "ignoreVersionNumber", "valueBoolean": self.ignore_version},
            {"name": "unknownStateIsConsideredAsDecline", "valueBoolean": False}]}
        body = {"resourceType": "Parameters", "parameter": [
            {"name": "personIdentifier", "valueIdentifier": {"system": self.signer_system, "value": sid}},
            {"name": "domain", "valueString": domain},
            {"name": "policy", "valueCoding": {"system": policy[0], "code": policy[1]}},
            {"name": "version", "valueString": self.policy_version},
            {"name": "config", "resource": config}]}
        answer = await self._post("/$isConsented", body)
        values = [p.get("valueBoolean") for p in answer.get("parameter") or [] if isinstance(p, dict)
                  and p.get("name") == "consented"]
        if len(values) != 1 or not isinstance(values[0], bool):
            raise _NotClean(BAD_RESPONSE)
        return values[0]

    # --- bulk: $allConsentsForPerson ------------------------------------------------------------------
    async def _bulk(self, domain: str, page: list[tuple[PatientRef, str]]) -> dict[str, Decision]:
        body = {"resourceType": "Parameters", "parameter": [
            {"name": "domain", "valueString": domain},
            *({"name": "personIdentifier", "valueIdentifier": {"system": self.signer_system, "value": sid}}
              for _, sid in page)]}
        try:
            consents = await self._all_consents(body)
            per_signer = self._objections(consents, {sid for _, sid in page})
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, these patients are unknown
            reason = exc.reason if isinstance(exc, _NotClean) else BAD_RESPONSE
            log.warning("gICS gave no clean answer: %s", reason)
            return {p.key: Decision("unknown", reason) for p, _ in page}
        out = {}
        for p, sid in page:
            verdict = per_signer.get(sid)
            if verdict is None:
                out[p.key] = Decision(self.no_record, NO_RECORD)
            else:
                out[p.key] = Decision("objected", OBJECTION) if verdict else Decision("allowed", NO_OBJECTION)
        return out

    async def _all_consents(self, body: dict[str, Any]) -> list[tuple[dict[str, Any], set[str]]]:
        """(Consent, signer ids of its patient) for every Consent on every page."""
        url = "/$allConsentsForPerson"
        found: list[tuple[dict[str, Any], set[str]]] = []
        for _ in range(self.max_pages):
            bundle = await self._post(url, body)
            if bundle.get("resourceType") != "Bundle":
                raise _NotClean(BAD_RESPONSE)
            found += _consents_with_signers(bundle, self.signer_system)
            next_url = _next_link(bundle)
            if next_url is None:
                return found
            if not _same_origin(next_url, self.base_url):
                raise _NotClean(BAD_RESPONSE)  # we would send our credentials elsewhere
            url = next_url
        raise _NotClean(BAD_RESPONSE)  # more pages than we follow: incomplete

    def _objections(self, consents: list[tuple[dict[str, Any], set[str]]],
                    asked: set[str]) -> dict[str, bool]:
        """signer id → True (objection) / False (records, none an objection); absent: no record."""
        now = self._now()
        out: dict[str, bool] = {}
        for consent, signers in consents:
            mine = signers & asked
            if not mine:
                if len(asked) != 1:
                    raise _NotClean(UNATTRIBUTABLE)  # cannot tell whose Consent this is
                mine = set(asked)
            objection = _is_objection(consent, self.policies, now)
            for sid in mine:
                out[sid] = out.get(sid, False) or objection
        return out

    # --- plumbing -------------------------------------------------------------------------------------
    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        content = orjson.dumps(body)
        refreshed = [False]

        async def attempt() -> dict[str, Any]:
            async with self._semaphore:
                headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON,
                           **await auth_headers(self._auth, self._http)}
                try:
                    response = await self._http.post(url, content=content, headers=headers)
                except httpx.TransportError as exc:
                    raise _Retryable(type(exc).__name__) from None
            classify(response, self._auth, refreshed)
            try:
                answer = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise _NotClean(BAD_RESPONSE) from None
            if not isinstance(answer, dict):
                raise _NotClean(BAD_RESPONSE)
            return answer

        try:
            return await self._retry.run(attempt, "gICS")
        except TTPUnavailable:  # includes refusals (4xx): the answer is unknown, never "allowed"
            raise _NotClean(UNAVAILABLE) from None

    def _signer(self, patient: PatientRef) -> str | Decision:
        try:
            sid = self.signer_id(patient)
        except Exception as exc:  # noqa: BLE001 - a broken signer function must not let a patient through
            log.warning("gICS signer id failed (%s)", type(exc).__name__)
            sid = None
        if not sid:
            return Decision("unknown", NO_SIGNER_ID)
        idents = patient.resource.get("identifier") or []
        plain = {i.get("value") for i in idents if isinstance(i, dict)} | {patient.mrn}
        if sid in plain:
            return Decision("unknown", SIGNER_ID_IS_IDENTIFIER)  # would send a BSN or patient number
        return sid

    def _cached(self, key: tuple[str, str]) -> Decision | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if self._clock() >= hit[0]:
            del self._cache[key]
            return None
        return hit[1]

    def _remember(self, key: tuple[str, str], decision: Decision) -> None:
        if self.cache_ttl <= 0:
            return
        self._cache[key] = (self._clock() + self.cache_ttl, decision)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _numbers(patient: PatientRef) -> list[str | None]:
    """Each number as the register stores it (upper-cased, see `registered_form`: the docs promise the
    register's digests) and as given (how objections were registered in gICS before): a probe's record
    numbered p0001234 found no objection registered under P0001234's digest."""
    given = [n for n in (patient.mrn, *patient.other_mrns) if n and n.strip()]
    numbers = list(dict.fromkeys(form for n in given for form in stored_forms(n)))
    return numbers or [patient.mrn]  # no number: asked once, to be refused as having no signer id


def _of_all_numbers(decisions: list[Decision]) -> Decision:
    """An objection under any number wins, then a failed answer; a number without a record does not make
    a patient unknown when gICS knows them under another."""
    recorded = [d for d in decisions if d.reason != NO_RECORD]
    return combine(recorded) if recorded else decisions[0]


def _resources(bundle: dict[str, Any], depth: int = 0) -> list[tuple[str | None, dict[str, Any]]]:
    """(fullUrl, resource) of a collection Bundle, nested Bundles flattened (gICS nests one per Consent)."""
    if depth > 3:
        raise _NotClean(BAD_RESPONSE)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise _NotClean(BAD_RESPONSE)
    out: list[tuple[str | None, dict[str, Any]]] = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise _NotClean(BAD_RESPONSE)
        if resource.get("resourceType") == "Bundle":
            out += _resources(resource, depth + 1)
        else:
            out.append((entry.get("fullUrl"), resource))
    return out


def _consents_with_signers(bundle: dict[str, Any], system: str) -> list[tuple[dict[str, Any], set[str]]]:
    resources = _resources(bundle)
    signers: dict[str, set[str]] = {}  # reference forms of each Patient → its signer ids
    for full_url, res in resources:
        if res.get("resourceType") != "Patient":
            continue
        ids = {i.get("value") for i in res.get("identifier") or []
               if isinstance(i, dict) and i.get("system") == system and isinstance(i.get("value"), str)}
        for ref in (full_url, f"Patient/{res.get('id')}" if res.get("id") else None, res.get("id")):
            if ref:
                signers.setdefault(ref, set()).update(ids)
    out = []
    for _, res in resources:
        if res.get("resourceType") != "Consent":
            continue
        subject = res.get("patient") if isinstance(res.get("patient"), dict) else {}
        ident = subject.get("identifier") if isinstance(subject.get("identifier"), dict) else {}
        ids = set(signers.get(subject.get("reference") or "", set()))
        if ident.get("system") == system and isinstance(ident.get("value"), str):
            ids.add(ident["value"])
        out.append((res, ids))
    return out


def _is_objection(consent: dict[str, Any], policies: list[Policy], now: datetime) -> bool:
    """An active Consent with a permit provision (any depth, period covering now) on an objection policy."""
    if consent.get("status") != "active":
        return False  # withdrawn, rejected, draft: not (or no longer) an objection

    def walk(node: Any, inherited: str | None) -> bool:
        if not isinstance(node, dict):
            raise _NotClean(BAD_RESPONSE)
        rule = node.get("type", inherited)
        try:
            if not _period_covers(node.get("period"), now):
                return False
        except Unparseable:
            raise _NotClean(BAD_RESPONSE) from None
        codes = {(c.get("system"), c.get("code")) for cc in node.get("code") or [] if isinstance(cc, dict)
                 for c in cc.get("coding") or [] if isinstance(c, dict)}
        if rule == "permit" and codes & set(policies):
            return True
        return any(walk(child, rule) for child in node.get("provision") or [])

    return walk(consent.get("provision") or {}, None)


def _next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if not isinstance(url, str) or not url:
                raise _NotClean(BAD_RESPONSE)
            return url
    return None


def _same_origin(url: str, base_url: str) -> bool:
    a, b = urlsplit(url), urlsplit(base_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc) and a.path.startswith(b.path)


def gics_from_config(options: Mapping[str, Any], secret: Callable[[str | None], str | None], *,
                     signer_id: Callable[[PatientRef], str | None] | None = None) -> GicsConsent:
    """From a YAML block, e.g.::

        url: https://ttp.example.org/ttp-fhir/fhir/gics
        domain: registry-objections
        objection_policies: ["https://ths-greifswald.de/fhir/CodeSystem/gics/Policy|p-opt-out"]
        signer_key_env: FHIR_GATEWAY_GICS_SIGNER_KEY   # hex; the HMAC key of hmac_signer_id
        auth: {type: basic, username: gateway, password_env: FHIR_GATEWAY_GICS_PASSWORD}
        bulk: true
        cache_ttl_seconds: 60

    Secrets are read through ``secret`` from the environment variables named here, never from the file."""
    url, domain = options.get("url"), options.get("domain")
    if not url or not domain:
        raise ValueError("gICS needs url and domain")
    if signer_id is None:
        key_text = secret(options.get("signer_key_env"))
        if not key_text:
            raise ValueError("gICS needs signer_key_env (a set environment variable with a hex HMAC key)")
        try:
            key = bytes.fromhex(key_text.strip())
        except ValueError:
            raise ValueError("the gICS signer key must be hex") from None
        signer_id = hmac_signer_id(key)
    ca_bundle = options.get("ca_bundle")
    return GicsConsent(
        str(url), domain=str(domain), objection_policies=options.get("objection_policies") or [],
        signer_id=signer_id, auth=auth_from_options(options.get("auth"), secret),
        domain_map=options.get("domain_map"), signer_system=options.get("signer_system", PSEUDONYM_SYSTEM),
        policy_version=str(options.get("policy_version", "1.0")),
        ignore_version=bool(options.get("ignore_version", True)), bulk=bool(options.get("bulk", True)),
        page_size=int(options.get("page_size", 50)), no_record=str(options.get("no_record", "allowed")),
        cache_ttl=float(options.get("cache_ttl_seconds", 60.0)),
        timeout=float(options.get("timeout_seconds", 5.0)),
        retries=int(options.get("retries", 2)), verify=str(ca_bundle) if ca_bundle else True)
