"""TresTTP (ZorgTTP's Trusted Reversible Encryption Service) for the reversible type, and RoutingTTP.

Wire (ZorgTTP/rtres ``R/request.R``; domain spec §2.4): form-encoded ``POST {base}/Service/encryptpost`` and
``/Service/decryptpost`` with ``Accept: application/json`` and the fields ``text`` (the values joined by
``#``), ``dn`` (domain), ``pn`` (project), ``un``/``pw`` (credentials), ``si`` (search image), ``se``
(salted encryption; always FALSE here), ``separator``. The answer is JSON with ``ResponseCode`` and
``ResponseMessage``, each ``#``-joined with one entry per value; code 0 = success, the message is the result.

- Codes 100, 200, 313, 314 and 999 abort the whole call (rtres aborts on them): ``TTPUnavailable``.
- Any other non-zero code (310 "plain text not specified", 316 "encrypted value not valid", ...) is a
  per-value error ``tres-<code>``; the message text is never copied (it may describe the value).
- TRES cannot encrypt whitespace-only values and ``#`` would split a value: such values are refused per
  value BEFORE anything is sent (``blank-value`` / ``invalid-format``).
- At most 1,000 values per request (rtres' chunk size); larger batches are split.

Only MRN goes to TRES, as its source-stage pre-pseudonym ``MRN.v<k>.<base64url>`` (never the plain patient
number). Unsalted TRES encryption is deterministic (rtres' tests pin the ciphertexts), so the ciphertext
serves as the pseudonym: ``identifier_value`` is the TRES ciphertext string; salted encryption would break
linkage and is not offered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from gateway.config import secret_from_env
from gateway.forward import RegistryAuth
from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp import service
from gateway.ttp.backend import TTPBackend, TTPResult, TTPUnavailable
from gateway.ttp.client import RetryPolicy
from gateway.ttp.gpas import (
    error_word,
    http_client,
    original_string,
    parse_original,
    post_for_json,
)

MAX_VALUES = 1_000
SEPARATOR = "#"
ABORT_CODES = frozenset({100, 200, 313, 314, 999})
BLANK = "blank-value"
UNSUPPORTED = "unsupported-type"
_NULL_TEXT = "Value cannot be null."  # TRES' answer when the whole text is empty (rtres maps it per value)


class TresTTP:
    """TTPBackend for the MRN type over TRES; other types get ``unsupported-type`` (use RoutingTTP)."""

    types = frozenset(nlps1.REVERSIBLE)

    def __init__(self, base_url: str, *, domain: str, project: str, username: str,
                 password_env: str | None = None, password: str | None = None,
                 secret: Callable[[str | None], str | None] = secret_from_env, search_image: bool = False,
                 timeout: float = 30.0, retries: int = 3,
                 chunk_size: int = MAX_VALUES, max_concurrency: int = 2, verify: bool | str = True,
                 backoff: float = 0.2, max_backoff: float = 5.0, max_retry_after: float = 30.0,
                 on_behalf_of_username: str | None = None, auth: RegistryAuth | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """The password comes from the environment variable ``password_env`` (through ``secret``), or directly
        as ``password``; it is never logged or put in an error text."""
        password = password if password is not None else secret(password_env)
        if not (domain and project and username and password):
            raise ValueError("TRES needs domain, project, username and password_env (a set variable)")
        if not 1 <= chunk_size <= MAX_VALUES:
            raise ValueError(f"chunk_size must be between 1 and {MAX_VALUES}")
        self.base_url = base_url.rstrip("/")
        self.domain, self.project, self.search_image = domain, project, search_image
        self.chunk_size = chunk_size
        self._credentials = {"un": username, "pw": password}
        self._obo = on_behalf_of_username
        self._auth = auth  # e.g. a client certificate in front of TRES; TRES itself authenticates by un/pw
        self._http = http_client(base_url, timeout=timeout, verify=verify, max_concurrency=max_concurrency,
                                 auth=auth, transport=transport)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._retry = RetryPolicy(retries, backoff, max_backoff, max_retry_after)

    def __repr__(self) -> str:
        return f"TresTTP({self.base_url!r}, domain={self.domain!r}, project={self.project!r})"

    async def __aenter__(self) -> TresTTP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- TTPBackend ------------------------------------------------------------------------------------
    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        """``registry`` is not sent: the MRN pre-pseudonym is already registry-bound (K_mrn per registry)."""
        texts: list[str | None] = []
        refused: dict[int, str] = {}
        for n, item in enumerate(items):
            if item.type not in self.types:
                refused[n] = UNSUPPORTED
                texts.append(None)
            else:
                texts.append(original_string(item))
        answers = await self._run("encryptpost", texts, refused)
        return [TTPResult(n, item.type, *answers[n]) for n, item in enumerate(items)]

    async def probe(self) -> None:
        """TRES has no metadata endpoint: encrypt one synthetic value that stands for nobody."""
        synthetic = PrePseudonym("MRN", 1, b"\0" * 32)
        [result] = await self.pseudonymise("probe", [synthetic])
        if result.identifier_value is None:
            raise TTPUnavailable(f"TRES answers but refused the probe value ({result.error_code})")

    # --- reversal -------------------------------------------------------------------------------------
    async def depseudonymise(self, registry: str, values: Sequence[str]) -> list[TTPResult]:
        """TRES ciphertexts → the hospital's own MRN inner layer (base64url), as ``HttpTTPClient`` does."""
        texts: list[str | None] = list(values)
        refused: dict[int, str] = {}
        answers = await self._run("decryptpost", texts, refused)
        out = []
        for n in range(len(values)):
            plain, code = answers[n]
            pre = parse_original(plain) if plain is not None else None
            if plain is not None and (pre is None or pre.type not in self.types):
                out.append(TTPResult(n, "MRN", None, service.NOT_REVERSIBLE))
            else:
                out.append(TTPResult(n, "MRN", nlps1.b64u(pre.value) if pre else None, code))
        return out

    # --- plumbing -------------------------------------------------------------------------------------
    async def _run(self, endpoint: str, texts: list[str | None],
                   refused: dict[int, str]) -> list[tuple[str | None, str | None]]:
        """(result, error) per position; refused and blank values never leave the gateway."""
        for n, text in enumerate(texts):
            if n in refused or text is None:
                refused.setdefault(n, service.INVALID_FORMAT)
            elif not text.strip():
                refused[n] = BLANK  # TRES cannot work with whitespace-only values
            elif SEPARATOR in text or text != text.strip():
                refused[n] = service.INVALID_FORMAT  # would split into two values, or be changed by TRES
        send = [n for n in range(len(texts)) if n not in refused]
        chunks = [send[s:s + self.chunk_size] for s in range(0, len(send), self.chunk_size)]
        parts = await asyncio.gather(*(self._call(endpoint, [texts[n] for n in c]) for c in chunks))
        out: list[tuple[str | None, str | None]] = [(None, code) for code in
                                                     (refused.get(n) for n in range(len(texts)))]
        for chunk, rows in zip(chunks, parts, strict=True):
            for n, row in zip(chunk, rows, strict=True):
                out[n] = row
        return out

    async def _call(self, endpoint: str, values: list[str | None]) -> list[tuple[str | None, str | None]]:
        form = {"text": SEPARATOR.join(v or "" for v in values), "dn": self.domain, "pn": self.project,
                "si": "TRUE" if self.search_image else "FALSE", "se": "FALSE", **self._credentials,
                "separator": SEPARATOR}
        if self._obo:
            form["oboun"] = self._obo
        refreshed = [False]

        async def attempt() -> dict[str, Any]:
            accept = {"Accept": "application/json"}
            return await post_for_json(self._http, self._semaphore, self._auth, refreshed,
                                       f"/Service/{endpoint}", "TRES", accept, data=form)

        answer = await self._retry.run(attempt, "TRES")
        return read_tres_answer(answer, len(values), endpoint)


def read_tres_answer(answer: dict[str, Any], expected: int,
                     endpoint: str) -> list[tuple[str | None, str | None]]:
    """Split ResponseCode/ResponseMessage; abort codes fail the call closed; others are per-value errors."""
    try:
        codes = [int(c) for c in str(answer["ResponseCode"]).split(SEPARATOR)]
        messages = str(answer["ResponseMessage"]).split(SEPARATOR)
    except (KeyError, TypeError, ValueError):
        raise TTPUnavailable("TRES answer is malformed") from None
    if len(codes) == 1 and codes[0] == 999 and messages[0].startswith(_NULL_TEXT) and expected == 1:
        # TRES' reply to an empty text; rtres maps it to the per-value code (310 encrypt / 316 decrypt).
        codes = [310 if endpoint == "encryptpost" else 316]
    aborts = sorted({c for c in codes if c in ABORT_CODES})
    if aborts:
        raise TTPUnavailable(f"TRES refused the request (code {aborts[0]})")
    if len(codes) != expected or len(messages) != expected:
        raise TTPUnavailable("TRES answer does not have one result per value")
    return [(m, None) if c == 0 and m else (None, error_word("tres", c if c else "empty"))
            for c, m in zip(codes, messages, strict=True)]


class RoutingTTP:
    """Sends each type to its backend (e.g. MRN → TresTTP) and the rest to ``default``: ONE call per
    backend per ``pseudonymise`` call, concurrently; results merged back by index. Any backend failing
    fails the whole call (fail closed: no bundle goes out with some pseudonyms missing)."""

    def __init__(self, routes: Mapping[str, TTPBackend], default: TTPBackend) -> None:
        self.routes, self.default = dict(routes), default

    def backends(self) -> list[TTPBackend]:
        seen: dict[int, TTPBackend] = {id(self.default): self.default}
        for backend in self.routes.values():
            seen.setdefault(id(backend), backend)
        return list(seen.values())

    async def pseudonymise(self, registry: str, items: Sequence[PrePseudonym]) -> list[TTPResult]:
        groups: dict[int, tuple[TTPBackend, list[int]]] = {}
        for n, item in enumerate(items):
            backend = self.routes.get(item.type, self.default)
            groups.setdefault(id(backend), (backend, []))[1].append(n)
        calls = [backend.pseudonymise(registry, [items[n] for n in positions])
                 for backend, positions in groups.values()]
        answers = await asyncio.gather(*calls)
        results: list[TTPResult | None] = [None] * len(items)
        for (_, positions), answer in zip(groups.values(), answers, strict=True):
            if len(answer) != len(positions):
                raise TTPUnavailable("a routed TTP answered with the wrong number of results")
            for r in answer:
                n = positions[r.index]
                results[n] = TTPResult(n, items[n].type, r.identifier_value, r.error_code)
        if any(r is None for r in results):
            raise TTPUnavailable("a routed TTP left values unanswered")
        return results  # type: ignore[return-value]

    async def probe(self) -> None:
        await asyncio.gather(*(b.probe() for b in self.backends()))

    async def depseudonymise(self, registry: str, values: Sequence[str]) -> list[TTPResult]:
        """MRN reversal goes to the backend that made the MRN pseudonyms."""
        backend = self.routes.get("MRN", self.default)
        reverse = getattr(backend, "depseudonymise", None)
        if reverse is None:
            raise TTPUnavailable("the MRN backend cannot reverse pseudonyms")
        return await reverse(registry, values)

    async def aclose(self) -> None:
        for backend in self.backends():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
