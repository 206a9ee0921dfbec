"""HttpTTPClient (the gateway's way to the NLPS1 TTP) and CachingTTP (an LRU in front of any TTPBackend).

One HTTP request per ``pseudonymise`` call: the whole bundle's pre-pseudonyms go together; only batches above
``max_batch`` values are split (and then sent concurrently, bounded by ``max_concurrency``). Transport errors,
5xx and 429 are retried with exponential backoff, honouring ``Retry-After`` (capped); each attempt is sealed
afresh, because the TTP refuses a request id it has already seen. When the retries are used up, or the TTP
refuses the call (4xx), ``TTPUnavailable`` is raised: the caller fails closed.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric import x25519
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from gateway.forward import parse_retry_after
from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp import envelope, service
from gateway.ttp.backend import TTPBackend, TTPRejected, TTPResult, TTPUnavailable

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class RetryPolicy:
    """Retries transport errors, 5xx and 429 (``_Retryable``) with jittered exponential backoff, honouring
    Retry-After up to a cap; then ``TTPUnavailable`` (fail closed). Every TTP and consent backend uses it."""

    retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_retry_after: float = 30.0

    async def run(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        retrying = AsyncRetrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait,
                                 retry=retry_if_exception_type(_Retryable), reraise=True)
        try:
            async for state in retrying:
                with state:
                    return await attempt()
        except _Retryable as exc:
            raise TTPUnavailable(f"{what} unavailable after {self.retries + 1} attempts ({exc})") from None
        raise TTPUnavailable(f"{what} unavailable")  # not reached: AsyncRetrying returns or raises

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        # Full jitter, so many gateways do not retry in lockstep.
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (state.attempt_number - 1)))


def _diagnostics(response: httpx.Response) -> str:
    """The TTP's own fixed diagnostics text (it never contains values), else the bare status."""
    try:
        issue = orjson.loads(response.content)["issue"][0]
        return str(issue.get("diagnostics") or issue.get("code"))[:200]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return f"HTTP {response.status_code}"


class HttpTTPClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0, max_concurrency: int = 4,
                 retries: int = 3, verify: bool | str = True, sealed: bool = True, max_batch: int = 100_000,
                 backoff: float = 0.2, max_backoff: float = 5.0, max_retry_after: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if isinstance(verify, str):
            verify_arg: bool | ssl.SSLContext = ssl.create_default_context(cafile=verify)
        else:
            verify_arg = verify
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, verify=verify_arg, transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": FHIR_JSON},
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency))
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.sealed, self.max_batch, self.retries = sealed, max_batch, retries
        self._retry = RetryPolicy(retries, backoff, max_backoff, max_retry_after)
        # One call never takes longer than its own retries would: waiting for a concurrency slot counts too,
        # so a slow TTP makes EHR requests fail closed in bounded time instead of queueing behind each other.
        self._budget = (retries + 1) * timeout + min(max_backoff, backoff * 2**retries)
        self._public: tuple[x25519.X25519PublicKey, str] | None = None

    async def __aenter__(self) -> HttpTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- TTPBackend ----------------------------------------------------------------------------------------
    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        with service.paused_gc(len(items)):  # large batches: see service.paused_gc
            originals = [service.pre_string(i.type, i.key_version, i.value) for i in items]
            types = [i.type for i in items]
            return await self._batched("pseudonymize", registry, originals, types, "pseudonym")

    async def probe(self) -> None:
        try:
            response = await self._http.get("/metadata")
        except httpx.HTTPError:
            raise TTPUnavailable("TTP not reachable") from None
        try:
            ok = response.status_code == 200 and orjson.loads(response.content).get("resourceType") == (
                "CapabilityStatement")
        except (orjson.JSONDecodeError, AttributeError):
            ok = False
        if ok:
            return
        if response.status_code >= 500:
            raise TTPUnavailable(f"TTP metadata check failed (HTTP {response.status_code})")
        # it answered, but not as a TTP: a wrong URL is configuration, not an outage
        raise TTPRejected(response.status_code, "the configured TTP URL serves no NLPS1 CapabilityStatement")

    # --- the other operations ------------------------------------------------------------------------------
    async def translate(self, registry: str,
                        values: Sequence[tuple[str, str, str | None]]) -> list[TTPResult]:
        """(type, stored ``v<n>.`` value, provider for MRN else None) → the value under the current key."""
        originals = [f"{t}:{v}:{p}" if p else f"{t}:{v}" for t, v, p in values]
        return await self._batched("translate", registry, originals, [t for t, _, _ in values], "pseudonym")

    async def depseudonymise(self, registry: str, values: Sequence[str]) -> list[TTPResult]:
        """MRN ``v<n>.`` values → this provider's own inner layer (base64url) in ``identifier_value``."""
        return await self._batched("de-pseudonymize", registry, [f"MRN:{v}" for v in values],
                                   ["MRN"] * len(values), "original")

    async def rotate(self, registry: str) -> int:
        body = {"resourceType": "Parameters", "parameter": [{"name": "target", "valueString": registry}]}
        answer = await self._send("rotate", registry, body, None)
        return int(next(p["valueInteger"] for p in answer["parameter"] if p.get("name") == "version"))

    async def public_key(self, refresh: bool = False) -> tuple[x25519.X25519PublicKey, str]:
        if self._public is None or refresh:
            try:
                response = await self._http.get("/.well-known/nlps1-public-key")
                response.raise_for_status()
                jwk = orjson.loads(response.content)["keys"][0]
                self._public = (x25519.X25519PublicKey.from_public_bytes(nlps1.unb64u(jwk["x"])), jwk["kid"])
            except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                raise TTPUnavailable("TTP public key not available") from None
        return self._public

    # --- plumbing ------------------------------------------------------------------------------------------
    async def _batched(self, operation: str, registry: str, originals: list[str], types: list[str],
                       name: str) -> list[TTPResult]:
        if not originals:
            return []
        size = self.max_batch
        chunks = [(start, originals[start:start + size]) for start in range(0, len(originals), size)]
        answers = await asyncio.gather(*(self._call(operation, registry, chunk) for _, chunk in chunks))
        results: list[TTPResult | None] = [None] * len(originals)
        for (start, chunk), answer in zip(chunks, answers, strict=True):
            for index, value, code in _read_answer(answer, len(chunk), name):
                i = start + index
                results[i] = TTPResult(i, types[i], value, code)
        return results  # type: ignore[return-value]  # _read_answer guarantees every index is filled

    async def _call(self, operation: str, registry: str, originals: list[str]) -> dict[str, Any]:
        if not self.sealed:
            body = {"resourceType": "Parameters", "parameter": [
                {"name": "target", "valueString": registry},
                *({"name": "original", "valueString": o} for o in originals)]}
            return await self._send(operation, registry, body, None)
        return await self._send(operation, registry, None, originals)

    async def _send(self, operation: str, registry: str, body: dict[str, Any] | None,
                    sealed_originals: list[str] | None) -> dict[str, Any]:
        plain = orjson.dumps(body) if body is not None else b""

        async def attempt() -> dict[str, Any]:
            async with self._semaphore:
                return await self._attempt(operation, registry, plain, sealed_originals)

        try:
            async with asyncio.timeout(self._budget):
                return await self._retry.run(attempt, "TTP")
        except TimeoutError:
            raise TTPUnavailable(f"TTP did not answer within {self._budget:.1f} s") from None

    async def _attempt(self, operation: str, registry: str, plain: bytes,
                       sealed_originals: list[str] | None) -> dict[str, Any]:
        opened: tuple[bytes, bytes] | None = None
        if sealed_originals is not None:
            public, kid = await self.public_key()
            params, response_key, info = envelope.seal_request(public, kid, operation, registry,
                                                               sealed_originals)
            plain, opened = orjson.dumps(params), (response_key, info)
        try:
            response = await self._http.post(f"/${operation}", content=plain,
                                              headers={"Content-Type": FHIR_JSON})
        except httpx.TransportError as exc:
            raise _Retryable(type(exc).__name__) from None
        status = response.status_code
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}", parse_retry_after(response.headers.get("retry-after")))
        if status == 409 and opened is not None:
            await self.public_key(refresh=True)  # the TTP's HPKE key changed (or a replay clash): re-seal
            raise _Retryable("HTTP 409")
        if status != 200:
            raise TTPRejected(status, _diagnostics(response))
        try:
            content = response.content
            if opened is not None:
                content = envelope.open_response(orjson.loads(content), *opened)
            answer = orjson.loads(content)
        except (orjson.JSONDecodeError, envelope.EnvelopeError):
            raise TTPUnavailable("TTP answer is not valid") from None
        if not isinstance(answer, dict):
            raise TTPUnavailable("TTP answer is not valid")
        if opened is None and not isinstance(answer.get("parameter"), list):
            raise TTPUnavailable("TTP answer is not a Parameters resource")
        return answer

Row = tuple[int, str | None, str | None]


def _read_answer(answer: dict[str, Any], expected: int, name: str) -> list[Row]:
    """(index, value, error code) per original; TTPUnavailable unless every index is answered exactly once."""
    if "parameter" not in answer:
        return _read_compact(answer, expected, "pseudonym" if name == "pseudonym" else "pre")
    out: list[Row] = []
    seen = bytearray(expected)
    value_part = "pseudonym" if name == "pseudonym" else "pre"
    try:
        for p in answer["parameter"]:
            kind = p["name"]
            if kind not in (name, "error"):
                continue
            parts = p["part"]
            first, last = parts[0], parts[-1]
            if first["name"] != "index" or last["name"] not in (value_part, "code"):
                parts = {q["name"]: q for q in parts}  # not our TTP's order: look the parts up by name
                first, last = parts["index"], parts["code" if kind == "error" else value_part]
            index = first["valueInteger"]
            if kind == "error":
                out.append((index, None, str(last["valueCode"])))
            else:
                value = last["valueIdentifier"]["value"]
                if not isinstance(value, str):
                    raise TypeError
                out.append((index, value, None))
            if seen[index]:
                raise ValueError
            seen[index] = 1
    except (KeyError, TypeError, ValueError, IndexError):
        raise TTPUnavailable("TTP answer is malformed") from None
    if len(out) != expected:
        raise TTPUnavailable("TTP answer is incomplete")
    return out


def _read_compact(answer: dict[str, Any], expected: int, value_part: str) -> list[Row]:
    """The sealed variant's inner answer (see gateway.ttp.app._compact_answer)."""
    values, errors = answer.get(value_part), answer.get("error")
    if not isinstance(values, list) or len(values) != expected or not isinstance(errors, list):
        raise TTPUnavailable("TTP answer is malformed")
    try:
        codes = {int(i): str(code) for i, code in errors}
    except (TypeError, ValueError):
        raise TTPUnavailable("TTP answer is malformed") from None
    out: list[Row] = []
    for i, value in enumerate(values):
        if type(value) is str:
            out.append((i, value, None))
        elif value is None and i in codes:
            out.append((i, None, codes[i]))
        else:
            raise TTPUnavailable("TTP answer is malformed")
    return out


class CachingTTP:
    """An in-memory LRU of final pseudonyms in front of any backend.

    Keyed by (registry, type, source key version, pre-pseudonym bytes): never by a plain input. Only successes
    are cached; misses of one call go to the backend together in one call. A registry key rotation at the TTP
    shows in the version of every fresh NLPS1 pseudonym (`v<n>.`): once a fresh answer carries a newer
    version than a cached one, cached pseudonyms under older versions are misses, and a call that learnt it
    fetches its stale hits again, so one Bundle never mixes versions. Entries also expire after `ttl` seconds,
    which bounds how long a gateway that sees no new patient keeps the old version.
    """

    def __init__(self, backend: TTPBackend, max_entries: int = 100_000, ttl: float | None = 3600.0) -> None:
        self.backend, self.max_entries, self.ttl = backend, max_entries, ttl
        self._lru: OrderedDict[tuple[str, str, int, bytes], tuple[str, float, int]] = OrderedDict()
        self._current: dict[str, int] = {}  # registry -> newest domain key version the TTP answered with
        self.hits = self.misses = 0

    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        now = time.monotonic()
        results, wanted, oldest_hit = self._lookup(registry, items, now)
        if wanted:
            await self._fetch(registry, items, results, wanted, now)
            if self._current.get(registry, 0) > oldest_hit:  # rotated since some of these hits were cached
                results, wanted, _ = self._lookup(registry, items, now)
                if wanted:
                    await self._fetch(registry, items, results, wanted, now)
        return results  # type: ignore[return-value]

    def _lookup(
        self, registry: str, items: Sequence[PrePseudonym], now: float
    ) -> tuple[list[TTPResult | None], dict[tuple[str, str, int, bytes], list[int]], int]:
        """Hits, the misses by cache key, and the oldest domain key version among the hits (none: a version
        no answer can exceed)."""
        current = self._current.get(registry, 0)
        results: list[TTPResult | None] = [None] * len(items)
        wanted: dict[tuple[str, str, int, bytes], list[int]] = {}
        oldest_hit = _NO_HIT
        for i, item in enumerate(items):
            key = (registry, item.type, item.key_version, item.value)
            hit = self._lru.get(key)
            if hit is not None and (self.ttl is None or now - hit[1] < self.ttl) and hit[2] >= current:
                self._lru.move_to_end(key)
                results[i] = TTPResult(i, item.type, hit[0], None)
                oldest_hit = min(oldest_hit, hit[2])
                self.hits += 1
            else:
                wanted.setdefault(key, []).append(i)
        return results, wanted, oldest_hit

    async def _fetch(
        self,
        registry: str,
        items: Sequence[PrePseudonym],
        results: list[TTPResult | None],
        wanted: dict[tuple[str, str, int, bytes], list[int]],
        now: float,
    ) -> None:
        keys = list(wanted)
        self.misses += len(keys)
        fetched = await self.backend.pseudonymise(registry, [PrePseudonym(k[1], k[2], k[3]) for k in keys])
        for r in fetched:
            key = keys[r.index]
            for i in wanted[key]:
                results[i] = TTPResult(i, items[i].type, r.identifier_value, r.error_code)
            if r.identifier_value is not None:
                version = _domain_version(r.identifier_value)
                if version > self._current.get(registry, 0):
                    self._current[registry] = version
                self._store(key, r.identifier_value, now, version)

    def _store(self, key: tuple[str, str, int, bytes], value: str, now: float, version: int) -> None:
        self._lru[key] = (value, now, version)
        self._lru.move_to_end(key)
        while len(self._lru) > self.max_entries:
            self._lru.popitem(last=False)

    def clear(self) -> None:
        self._lru.clear()

    async def probe(self) -> None:
        await self.backend.probe()


_NO_HIT = 1 << 62
_NLPS1_VERSION = re.compile(r"v(\d{1,9})\.")


def _domain_version(value: str) -> int:
    """The TTP domain key version of an NLPS1 pseudonym (`v<n>.<base64url>`); 0 for other backends'."""
    match = _NLPS1_VERSION.match(value)
    return int(match.group(1)) if match else 0
