"""GpasTTP: the gateway's TTP stage on a gPAS installation (MOSAIC/Greifswald "TTP-FHIR Gateway", 2023+).

Wire (mosaic-hgw/ttp-fhir-ig-gpas, also used by miracum/fhir-pseudonymizer's gPAS client):

    POST {base}/$pseudonymizeAllowCreate   Parameters: target (valueString, the gPAS domain),
                                           original (valueString) 1..n
    answer                                 one ``pseudonym`` parameter per original with the parts
                                           ``target``, ``original``, ``pseudonym`` (valueIdentifier);
                                           a value gPAS refuses yields an ``error`` parameter with the parts
                                           ``original`` and ``error-code`` (valueCoding, FHIR issue-type)
    POST {base}/$dePseudonymize            target + pseudonym 1..n → parameters with target/original/pseudonym

Answers are matched by part NAME and by the echoed original (never by position: gPAS does not promise an
order). What goes to gPAS is the source-stage pre-pseudonym as ``<TYPE>.v<k>.<base64url>`` — never a plain
identifier; the type prefix keeps the types apart inside one gPAS domain and the key version keeps K_src
versions apart.

``identifier_value`` is the gPAS pseudonym string itself. NLPS1's ``v<n>.`` versioning does not apply: gPAS
stores an original → pseudonym table and never re-derives a pseudonym, so it has no domain key to rotate;
"rotation" with gPAS means a new domain (and the registry holder relinks through gPAS itself).

This module also holds the small pieces the other HTTP backends for external TTP/consent tools share
(``BasicAuth``, ``auth_from_options``; ``RetryPolicy`` comes from the reference TTP's client, whose retry
behaviour they all follow): they are one family and one place keeps them alike.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from gateway.forward import (
    BearerToken,
    NoAuth,
    OAuth2ClientCredentials,
    RegistryAuth,
    TokenError,
    parse_retry_after,
    ssl_context,
)
from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp import service
from gateway.ttp.backend import TTPRejected, TTPResult, TTPUnavailable
from gateway.ttp.client import FHIR_JSON, RETRY_STATUSES, RetryPolicy, _Retryable

# The wire form of a pre-pseudonym for external TTPs: the NLPS1 reference TTP uses ``TYPE:k:b64u``; a dot
# form reads better as a gPAS/TRES original and contains no character those tools treat specially.
_ORIGINAL_RE = re.compile(r"([A-Z]{1,5})\.v([1-9][0-9]{0,5})\.([A-Za-z0-9_-]{22,700})")
_CODE_RE = re.compile(r"[a-z0-9-]{1,40}")
DEFAULT_BATCH = 1_000  # gPAS installations commonly cap the originals per request; configurable


# --- shared with tres.py and gics.py ------------------------------------------------------------------


def original_string(item: PrePseudonym) -> str:
    """``<TYPE>.v<k>.<base64url>``: what an external TTP stores as the "original" (no plain value)."""
    return f"{item.type}.v{item.key_version}.{nlps1.b64u(item.value)}"


def parse_original(text: str) -> PrePseudonym | None:
    """The inverse of ``original_string``; None for anything else (never raises with the value)."""
    m = _ORIGINAL_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None or m.group(1) not in nlps1.TYPES:
        return None
    try:
        return PrePseudonym(m.group(1), int(m.group(2)), nlps1.unb64u(m.group(3)))
    except nlps1.PseudonymError:
        return None


def looks_like_original(text: str) -> bool:
    return parse_original(text) is not None


@dataclass
class BasicAuth:
    """HTTP Basic (gPAS/gICS behind their Keycloak-less default set-up, TRES proxies, ...)."""

    username: str
    password: str = field(repr=False)
    client_cert: tuple[str, str | None, str | None] | None = None

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    def invalidate(self) -> None:
        pass


def auth_from_options(options: Mapping[str, Any] | None,
                      secret: Callable[[str | None], str | None]) -> RegistryAuth:
    """``auth: {type: none|basic|bearer|oauth2, username, password_env, token_env, token_url, client_id,
    client_secret_env, scope, cert_file, key_file}``; secrets only through ``secret`` (environment names)."""
    options = dict(options or {})
    kind = str(options.get("type", "none"))
    cert_file = options.get("cert_file")
    cert = (str(cert_file), options.get("key_file"), None) if cert_file else None
    if kind == "none":
        return NoAuth(client_cert=cert)
    if kind == "basic":
        username, password = options.get("username"), secret(options.get("password_env"))
        if not username or not password:
            raise ValueError("basic auth needs username and password_env (a set environment variable)")
        return BasicAuth(str(username), password, client_cert=cert)
    if kind == "bearer":
        token = secret(options.get("token_env"))
        if not token:
            raise ValueError("bearer auth needs token_env (an environment variable that is set)")
        return BearerToken(token, client_cert=cert)
    if kind == "oauth2":
        token_url, client_id = options.get("token_url"), options.get("client_id")
        client_secret = secret(options.get("client_secret_env"))
        if not (token_url and client_id and client_secret):
            raise ValueError("oauth2 auth needs token_url, client_id and client_secret_env")
        return OAuth2ClientCredentials(str(token_url), str(client_id), client_secret, options.get("scope"),
                                       client_cert=cert)
    raise ValueError(f"unknown auth type {kind!r} (none, basic, bearer, oauth2)")


def http_client(base_url: str, *, timeout: float, verify: bool | str, max_concurrency: int,
                auth: RegistryAuth | None, transport: httpx.AsyncBaseTransport | None = None,
                ) -> httpx.AsyncClient:
    """A pooled client; TLS from ``forward.ssl_context`` (CA bundle file, client certificate)."""
    cert = auth.client_cert if auth is not None else None
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"), timeout=timeout, transport=transport, follow_redirects=False,
        verify=ssl_context(verify, cert),
        limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))


async def auth_headers(auth: RegistryAuth | None, http: httpx.AsyncClient) -> dict[str, str]:
    """Headers from ``auth``; a token endpoint failure is retryable or fails closed (fixed text)."""
    if auth is None:
        return {}
    try:
        return await auth.headers(http)
    except TokenError as exc:
        if exc.retryable:
            raise _Retryable("token endpoint") from None
        raise TTPUnavailable("authentication failed: the token endpoint gave no token") from None
    except httpx.TransportError as exc:
        raise _Retryable(type(exc).__name__) from None


async def post_for_json(
    http: httpx.AsyncClient, semaphore: asyncio.Semaphore, auth: RegistryAuth | None, refreshed: list[bool],
    path: str, service: str, headers: dict[str, str], **request: Any,
) -> dict[str, Any]:
    """One attempt of an adapter call: a slot, auth headers, the POST, classification, a JSON object back.
    Transport errors and retryable statuses raise `_Retryable`; the texts name the service, never a value."""
    async with semaphore:
        headers = {**headers, **await auth_headers(auth, http)}
        try:
            response = await http.post(path, headers=headers, **request)
        except httpx.TransportError as exc:
            raise _Retryable(type(exc).__name__) from None
    classify(response, auth, refreshed)
    try:
        answer = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise TTPUnavailable(f"{service} answer is not JSON") from None
    if not isinstance(answer, dict):
        raise TTPUnavailable(f"{service} answer is malformed")
    return answer


def classify(response: httpx.Response, auth: RegistryAuth | None, refreshed: list[bool]) -> None:
    """Raise for anything but 200: retryable statuses, one token refresh after 401, else TTPRejected."""
    status = response.status_code
    if status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {status}", parse_retry_after(response.headers.get("retry-after")))
    if status == 401 and auth is not None and not refreshed[0] and isinstance(auth, OAuth2ClientCredentials):
        refreshed[0] = True  # the cached token may have been revoked early: fetch a new one, once
        auth.invalidate()
        raise _Retryable("HTTP 401")
    if status != 200:
        raise TTPRejected(status, issue_code(response))


def issue_code(response: httpx.Response) -> str:
    """Only the OperationOutcome's issue code (a FHIR code word): an external TTP's diagnostics text may
    quote the value it refused, and that must not reach our logs or error texts."""
    try:
        code = orjson.loads(response.content)["issue"][0]["code"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"HTTP {response.status_code}"
    return f"HTTP {response.status_code}, {error_word('issue', code)}"


def error_word(prefix: str, code: Any) -> str:
    """A per-value error code: ``<prefix>-<code>`` when the code is a plain word, else ``<prefix>-error``."""
    text = str(code).strip().lower() if code is not None else ""
    return f"{prefix}-{text}" if _CODE_RE.fullmatch(text) else f"{prefix}-error"


# --- gPAS ---------------------------------------------------------------------------------------------


class GpasTTP:
    """TTPBackend over gPAS. ``domain_map`` maps the gateway's registry id to the gPAS domain (target)."""

    def __init__(self, base_url: str, *, domain_map: Mapping[str, str], auth: RegistryAuth | None = None,
                 batch_size: int = DEFAULT_BATCH, timeout: float = 30.0, retries: int = 3,
                 verify: bool | str = True, max_concurrency: int = 4, backoff: float = 0.2,
                 max_backoff: float = 5.0, max_retry_after: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not domain_map:
            raise ValueError("gPAS needs a domain per registry (domain_map)")
        self.base_url = base_url.rstrip("/")
        self.domain_map = dict(domain_map)
        self.batch_size = batch_size
        self._auth = auth
        self._http = http_client(base_url, timeout=timeout, verify=verify, max_concurrency=max_concurrency,
                                 auth=auth, transport=transport)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._retry = RetryPolicy(retries, backoff, max_backoff, max_retry_after)

    async def __aenter__(self) -> GpasTTP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def domain(self, registry: str) -> str:
        try:
            return self.domain_map[registry]
        except KeyError:
            # Fixed text: the registry id is configuration, not patient data.
            raise TTPRejected(404, f"no gPAS domain configured for registry {registry!r}") from None

    # --- TTPBackend ------------------------------------------------------------------------------------
    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        domain = self.domain(registry)
        with service.paused_gc(len(items)):
            originals = [original_string(i) for i in items]
            answers = await self._resolve("pseudonymizeAllowCreate", domain, originals, "original")
            pairs = zip(items, originals, strict=True)
            return [TTPResult(n, item.type, *answers[original]) for n, (item, original) in enumerate(pairs)]

    async def probe(self) -> None:
        try:
            headers = {"Accept": FHIR_JSON, **await auth_headers(self._auth, self._http)}
            response = await self._http.get("/metadata", headers=headers)
        except (httpx.HTTPError, _Retryable):
            raise TTPUnavailable("gPAS not reachable") from None
        try:
            ok = response.status_code == 200 and orjson.loads(response.content).get("resourceType") == (
                "CapabilityStatement")
        except (orjson.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise TTPUnavailable(f"gPAS metadata check failed (HTTP {response.status_code})")

    # --- reversal -------------------------------------------------------------------------------------
    async def depseudonymise(self, registry: str, values: Sequence[str]) -> list[TTPResult]:
        """gPAS pseudonyms of MRN values → the hospital's own inner layer (base64url), as ``HttpTTPClient``.

        gPAS itself lets anyone with access to the domain look up originals; the original is the MRN
        pre-pseudonym under the hospital's K_mrn, so only that hospital can open it. Originals that are not
        MRN pre-pseudonyms are refused per value (``not-reversible``), never returned."""
        domain = self.domain(registry)
        unique = list(dict.fromkeys(values))
        answers = await self._resolve("dePseudonymize", domain, unique, "pseudonym")
        out = []
        for n, value in enumerate(values):
            original, code = answers[value]
            if original is None:
                out.append(TTPResult(n, "MRN", None, code))
                continue
            pre = parse_original(original)
            if pre is None or pre.type not in nlps1.REVERSIBLE:
                out.append(TTPResult(n, "MRN", None, service.NOT_REVERSIBLE))
            else:
                out.append(TTPResult(n, "MRN", nlps1.b64u(pre.value), None))
        return out

    # --- plumbing -------------------------------------------------------------------------------------
    async def _resolve(self, operation: str, domain: str, values: list[str],
                       key_part: str) -> dict[str, tuple[str | None, str | None]]:
        """value → (answer, error code) for every distinct value, in batches of ``batch_size``."""
        distinct = list(dict.fromkeys(values))
        if not distinct:
            return {}
        chunks = [distinct[s:s + self.batch_size] for s in range(0, len(distinct), self.batch_size)]
        found = await asyncio.gather(*(self._call(operation, domain, chunk, key_part) for chunk in chunks))
        merged: dict[str, tuple[str | None, str | None]] = {}
        for part in found:
            merged.update(part)
        return merged

    async def _call(self, operation: str, domain: str, chunk: list[str],
                    key_part: str) -> dict[str, tuple[str | None, str | None]]:
        in_name = "original" if key_part == "original" else "pseudonym"
        body = orjson.dumps({"resourceType": "Parameters", "parameter": [
            {"name": "target", "valueString": domain},
            *({"name": in_name, "valueString": v} for v in chunk)]})
        refreshed = [False]

        async def attempt() -> dict[str, Any]:
            headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
            answer = await post_for_json(self._http, self._semaphore, self._auth, refreshed,
                                         f"/${operation}", "gPAS", headers, content=body)
            if not isinstance(answer.get("parameter"), list):
                raise TTPUnavailable("gPAS answer is not a Parameters resource")
            return answer

        answer = await self._retry.run(attempt, "gPAS")
        return read_answer(answer, domain, chunk, key_part)


def _part_value(part: dict[str, Any]) -> str | None:
    """valueIdentifier.value (the published shape) or valueString (older gateways)."""
    value = part["valueIdentifier"].get("value") if "valueIdentifier" in part else part.get("valueString")
    return value if isinstance(value, str) else None


def read_answer(answer: dict[str, Any], domain: str, sent: list[str],
                key_part: str) -> dict[str, tuple[str | None, str | None]]:
    """Map each sent value to (answer, None) or (None, error code), looking parts up by name.

    ``key_part`` is the part that echoes what we sent (``original`` for pseudonymisation, ``pseudonym`` for
    reversal); the other of the two is the answer. Fail closed (TTPUnavailable) when a sent value is not
    answered, is answered twice differently, an answer names another domain or a value we did not send."""
    value_part = "pseudonym" if key_part == "original" else "original"
    wanted = set(sent)
    out: dict[str, tuple[str | None, str | None]] = {}
    try:
        for param in answer["parameter"]:
            name = param.get("name")
            if name not in ("pseudonym", "original", "error"):
                continue
            parts = {p["name"]: p for p in param.get("part") or []}
            if not parts:
                continue
            key = _part_value(parts[key_part])
            if key not in wanted:
                raise ValueError
            target = parts.get("target")
            if target is not None and _part_value(target) != domain:
                raise ValueError
            if name == "error":
                coding = parts.get("error-code", {}).get("valueCoding") or {}
                row: tuple[str | None, str | None] = (None, error_word("gpas", coding.get("code")))
            else:
                value = _part_value(parts[value_part])
                if not value:
                    raise ValueError
                row = (value, None)
            if out.get(key, row) != row:
                raise ValueError
            out[key] = row
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TTPUnavailable("gPAS answer is malformed") from None
    if len(out) != len(wanted):
        raise TTPUnavailable("gPAS answer is incomplete")
    return out
