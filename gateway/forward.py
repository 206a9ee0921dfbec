"""The registry client: POST one pseudonymised transaction Bundle, classify the answer.

`RegistryClient.deliver(payload)` never raises for a registry or network problem: it returns an `Attempt`
that says whether the outbox should mark the delivery delivered, retry it later or give it up (dead).
Long-term backoff belongs to the outbox worker; the only in-call retries here are for connection set-up
failures (nothing was sent, so repeating cannot duplicate) and one token refresh after a 401.
Nothing of the payload ever appears in a log line or an outcome text we write.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
MAX_OUTCOME_TEXT = 8000
MAX_RETRY_AFTER = 24 * 3600.0  # a registry asking for more than a day is treated as a day
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt. `outcome_text` is the registry's OperationOutcome (compact JSON)
    or a fixed text of ours; never payload content."""

    ok: bool
    status: int | None
    retryable: bool
    retry_after: float | None = None
    outcome_text: str | None = None
    elapsed: float = 0.0


# -- authentication -------------------------------------------------------------------------------------


class RegistryAuth(Protocol):
    """How the gateway proves itself to a registry: request headers and/or a TLS client certificate."""

    client_cert: tuple[str, str | None, str | None] | None  # (cert file, key file, key password)

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]: ...

    def invalidate(self) -> None:
        """Forget a cached credential (after a 401)."""


@dataclass
class NoAuth:
    client_cert: tuple[str, str | None, str | None] | None = None

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        pass


@dataclass
class BearerToken:
    token: str = field(repr=False)
    client_cert: tuple[str, str | None, str | None] | None = None

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def invalidate(self) -> None:
        pass


@dataclass
class MutualTLS:
    """A TLS client certificate; `inner` adds headers on top (e.g. OAuth2 with mTLS-bound tokens)."""

    cert_file: str
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    inner: RegistryAuth | None = None

    @property
    def client_cert(self) -> tuple[str, str | None, str | None]:
        return (self.cert_file, self.key_file, self.password)

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        return await self.inner.headers(http) if self.inner else {}

    def invalidate(self) -> None:
        if self.inner:
            self.inner.invalidate()


class TokenError(Exception):
    """The token endpoint did not give us a token (fixed text, never the secret)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class OAuth2ClientCredentials:
    """OAuth2 client-credentials grant (RFC 6749 §4.4); the token is cached until shortly before expiry."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str | None = None
    audience: str | None = None
    refresh_margin: float = 30.0
    client_cert: tuple[str, str | None, str | None] | None = None
    # TLS trust for the token endpoint when it differs from the registry's (e.g. the registry has a private
    # CA but the authorisation server a public certificate); None: use the registry client's settings.
    token_verify: bool | str | None = None
    _token: str | None = field(default=None, init=False, repr=False)
    _expires: float = field(default=0.0, init=False, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def headers(self, http: httpx.AsyncClient) -> dict[str, str]:
        async with self._lock:  # one fetch when many deliveries find the token expired at once
            if self._token is None or time.monotonic() >= self._expires:
                await self._fetch(http)
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        self._token = None

    async def _fetch(self, http: httpx.AsyncClient) -> None:
        if self.token_verify is None:
            await self._request(http)
            return
        async with httpx.AsyncClient(
            verify=ssl_context(self.token_verify, None), timeout=http.timeout
        ) as own:
            await self._request(own)

    async def _request(self, http: httpx.AsyncClient) -> None:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        if self.audience:
            form["audience"] = self.audience
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_CONNECT_ERRORS),
            reraise=True,
            stop=stop_after_attempt(3),
            wait=wait_exponential_jitter(multiplier=0.1, max=1.0, jitter=0.1),
        ):
            with attempt:
                try:
                    resp = await http.post(
                        self.token_url,
                        data=form,
                        auth=(self.client_id, self.client_secret),
                        headers={"Accept": "application/json"},
                    )
                except httpx.TransportError as exc:
                    if isinstance(exc, _CONNECT_ERRORS):
                        raise
                    raise TokenError(f"token endpoint: {type(exc).__name__}", retryable=True) from None
        if resp.status_code != 200:
            raise TokenError(
                f"token endpoint answered {resp.status_code}",
                retryable=resp.status_code >= 500 or resp.status_code in (408, 429),
            )
        try:
            body = orjson.loads(resp.content)
            token = body["access_token"]
            lifetime = float(body.get("expires_in", 300))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise TokenError("token endpoint answer has no access_token", retryable=False) from None
        self._token = token
        self._expires = time.monotonic() + max(0.0, lifetime - self.refresh_margin)


# -- the client -----------------------------------------------------------------------------------------


def ssl_context(verify: bool | str, client_cert: tuple[str, str | None, str | None] | None) -> ssl.SSLContext:
    """TLS settings: system CAs, or a CA bundle file; verification off only when explicitly asked for."""
    ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert:
        cert, key, password = client_cert
        ctx.load_cert_chain(cert, key, password)
    return ctx


class RegistryClient:
    """Delivers transaction Bundles to one registry's FHIR base URL. Reuse one per registry (pooled
    connections); close with `aclose()` or use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: RegistryAuth | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.auth: RegistryAuth = auth or NoAuth()
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=ssl_context(verify, self.auth.client_cert),
            transport=transport,
            follow_redirects=False,  # a redirect would re-send health data somewhere we were not told about
            headers={"Accept": FHIR_JSON},
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def deliver(self, payload: bytes, *, request_id: str | None = None) -> Attempt:
        started = time.monotonic()
        try:
            resp = await self._post(payload, request_id)
            if resp.status_code == 401 and not isinstance(self.auth, NoAuth | BearerToken):
                self.auth.invalidate()  # an expired or revoked token: fetch a fresh one once
                resp = await self._post(payload, request_id)
        except TokenError as exc:
            return Attempt(False, None, exc.retryable, None, str(exc), time.monotonic() - started)
        except httpx.TransportError as exc:
            # The request may or may not have reached the registry; retrying relies on the registry
            # upserting by id (PUT entries), so a repeat changes nothing.
            log.info("registry %s: network error %s", self.base_url, type(exc).__name__)
            return Attempt(
                False, None, True, None, f"network error: {type(exc).__name__}", time.monotonic() - started
            )
        return classify(resp, time.monotonic() - started)

    async def probe(self) -> str | None:
        """A go-live check with our credentials; None when all is well, else what went wrong.

        The registry's CapabilityStatement (GET [base]/metadata) says it is a FHIR server. FHIR servers
        answer that without credentials, so a read of a Bundle that does not exist follows: a 401 there is
        a wrong token or certificate (a 404, or a 403 of a registry that takes writes only, is not). Nothing
        is written, so the check can run against the production registry."""
        base = self.base_url.rstrip("/")
        try:
            headers = await self.auth.headers(self._http)
            resp = await self._http.get(base + "/metadata", headers=headers)
            if resp.status_code != 200:
                return f"GET /metadata answered HTTP {resp.status_code}"
            if _resource_type(resp.content) != "CapabilityStatement":
                return "GET /metadata is not a FHIR CapabilityStatement"
            read = await self._http.get(f"{base}/Bundle/{uuid.uuid4()}", headers=headers)
        except TokenError as exc:
            return f"token: {exc}"
        except httpx.TransportError as exc:
            return f"not reachable ({type(exc).__name__})"
        if read.status_code == 401:
            return "it refused our credentials (HTTP 401 to a read): check the token or client certificate"
        return None

    async def _post(self, payload: bytes, request_id: str | None) -> httpx.Response:
        headers = {"Content-Type": FHIR_JSON, **await self.auth.headers(self._http)}
        if request_id:
            headers["X-Request-Id"] = request_id
        # Connection set-up failures are retried right here: nothing was sent yet.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_CONNECT_ERRORS),
            reraise=True,
            stop=stop_after_attempt(3),
            wait=wait_exponential_jitter(multiplier=0.1, max=1.0, jitter=0.1),
        ):
            with attempt:
                return await self._http.post(self.base_url, content=payload, headers=headers)
        raise AssertionError("unreachable")  # pragma: no cover


def _resource_type(content: bytes) -> str | None:
    try:
        return orjson.loads(content).get("resourceType")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def classify(resp: httpx.Response, elapsed: float = 0.0) -> Attempt:
    """2xx delivered; 408/409/429/5xx retry later (honouring Retry-After); any other status is final. 409:
    a FHIR server's answer to concurrent writes of one resource (HAPI's version conflict), soon gone."""
    status = resp.status_code
    if 200 <= status < 300:
        return Attempt(True, status, False, None, None, elapsed)
    retryable = status in (408, 409, 429) or status >= 500
    retry_after = parse_retry_after(resp.headers.get("Retry-After")) if retryable else None
    return Attempt(False, status, retryable, retry_after, outcome_text(resp), elapsed)


def outcome_text(resp: httpx.Response) -> str:
    """The registry's OperationOutcome as compact JSON, or a fixed text when it sent none."""
    try:
        body: Any = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return orjson.dumps(body).decode()[:MAX_OUTCOME_TEXT]
    return f"registry answered HTTP {resp.status_code} without an OperationOutcome"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date (RFC 9110 §10.2.3) → seconds from now, bounded."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return min(max(0.0, seconds), MAX_RETRY_AFTER) if seconds == seconds else None  # NaN check
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delta), MAX_RETRY_AFTER)


def auth_from_settings(
    kind: str,
    *,
    token: str | None = None,
    token_url: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    scope: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> RegistryAuth:
    """Build an auth from plain settings (`none` | `bearer` | `oauth2` | `mtls`), e.g. from the YAML config.

    With `mtls`, a token or OAuth2 settings given as well are sent on top of the client certificate.
    """
    cert = (cert_file, key_file, None) if cert_file else None
    if kind == "none":
        return NoAuth(client_cert=cert)
    if kind == "bearer":
        if not token:
            raise ValueError("bearer auth needs a token")
        return BearerToken(token, client_cert=cert)
    if kind == "oauth2":
        if not (token_url and client_id and client_secret):
            raise ValueError("oauth2 auth needs token_url, client_id and client_secret")
        return OAuth2ClientCredentials(token_url, client_id, client_secret, scope, client_cert=cert)
    if kind == "mtls":
        if not cert_file:
            raise ValueError("mtls auth needs cert_file")
        inner: RegistryAuth | None = None
        if token_url and client_id and client_secret:
            inner = OAuth2ClientCredentials(token_url, client_id, client_secret, scope)
        elif token:
            inner = BearerToken(token)
        return MutualTLS(cert_file, key_file, inner=inner)
    raise ValueError(f"unknown registry auth type {kind!r}")


def auth_from_config(cfg: Any, secret: Callable[[str | None], str | None]) -> RegistryAuth:
    """From the YAML `registries.<name>.auth` block (`gateway.config.RegistryAuth`): secrets are read through
    `secret` (e.g. `secret_from_env`) from the environment variables the config names, never from the file."""
    return auth_from_settings(
        cfg.type,
        token=secret(cfg.token_env),
        token_url=cfg.token_url,
        client_id=cfg.client_id,
        client_secret=secret(cfg.client_secret_env),
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
    )
