"""Build the configured TTP backend from plain options, and check one (``fhir-gateway ttp check --kind ...``).

Kinds and their options (secrets are always named by environment variable and read through ``secret``):

    nlps1        url, api_key_env (default FHIR_GATEWAY_TTP_API_KEY), timeout_seconds, max_concurrency,
                 max_batch, ca_bundle, sealed (default true)                      → HttpTTPClient
    embedded     key_dir                                                          → EmbeddedTTP (tests/demos)
    gpas         url, domains {registry: gPAS domain}, auth {...}, batch_size, timeout_seconds, retries,
                 max_concurrency, ca_bundle                                       → GpasTTP
    tres         url, domain, project, username, password_env, search_image, timeout_seconds, retries,
                 chunk_size, ca_bundle                                  → TresTTP (MRN only; checks, tests)
    tres+nlps1   tres {as above}, nlps1 {as above}                                → RoutingTTP (MRN → TRES)
    tres+gpas    tres {...}, gpas {...}                                           → RoutingTTP (MRN → TRES)

``auth`` is ``gateway.ttp.gpas.auth_from_options``: ``{type: none|basic|bearer|oauth2, ...}``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.pseudonym import nlps1
from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.backend import TTPBackend, TTPRejected, TTPUnavailable
from gateway.ttp.gpas import GpasTTP, auth_from_options
from gateway.ttp.tres import RoutingTTP, TresTTP

KINDS = ("nlps1", "embedded", "gpas", "tres", "tres+nlps1", "tres+gpas")
Secret = Callable[[str | None], str | None]
Step = tuple[str, bool, str]

# Fixed synthetic pre-pseudonyms for the check: they stand for nobody (a hash of a public label, not of any
# input), and being the same every run a check adds at most one entry to a stateful TTP such as gPAS.
_SYNTHETIC = hashlib.sha256(b"fhir-gateway ttp check: synthetic value, no person").digest()
SYNTHETIC_GG = PrePseudonym("GG", 1, _SYNTHETIC)
SYNTHETIC_MRN = PrePseudonym("MRN", 1, _SYNTHETIC + b"\0" * 16)


def _verify(options: Mapping[str, Any]) -> bool | str:
    ca = options.get("ca_bundle")
    return str(ca) if ca else True


def _required(options: Mapping[str, Any], key: str, kind: str) -> Any:
    value = options.get(key)
    if value in (None, "", {}):
        raise ValueError(f"TTP kind {kind!r} needs the option {key!r}")
    return value


def _nlps1(options: Mapping[str, Any], secret: Secret) -> TTPBackend:
    from gateway.ttp.client import HttpTTPClient

    url = _required(options, "url", "nlps1")
    env = options.get("api_key_env") or "FHIR_GATEWAY_TTP_API_KEY"
    api_key = secret(env)
    if not api_key:
        raise ValueError(f"the TTP API key environment variable {env} is not set")
    return HttpTTPClient(str(url), api_key, timeout=float(options.get("timeout_seconds", 10.0)),
                         max_concurrency=int(options.get("max_concurrency", 4)),
                         max_batch=int(options.get("max_batch", 100_000)), verify=_verify(options),
                         sealed=bool(options.get("sealed", True)), retries=int(options.get("retries", 3)))


def _gpas(options: Mapping[str, Any], secret: Secret) -> GpasTTP:
    domains = _required(options, "domains", "gpas")
    if not isinstance(domains, Mapping):
        raise ValueError("gpas option 'domains' maps registry ids to gPAS domains")
    return GpasTTP(str(_required(options, "url", "gpas")),
                   domain_map={str(k): str(v) for k, v in domains.items()},
                   auth=auth_from_options(options.get("auth"), secret),
                   batch_size=int(options.get("batch_size", 1000)),
                   timeout=float(options.get("timeout_seconds", 30.0)),
                   retries=int(options.get("retries", 3)),
                   max_concurrency=int(options.get("max_concurrency", 4)), verify=_verify(options))


def _tres(options: Mapping[str, Any], secret: Secret) -> TresTTP:
    return TresTTP(str(_required(options, "url", "tres")), domain=str(_required(options, "domain", "tres")),
                   project=str(_required(options, "project", "tres")),
                   username=str(_required(options, "username", "tres")),
                   password_env=_required(options, "password_env", "tres"), secret=secret,
                   search_image=bool(options.get("search_image", False)),
                   timeout=float(options.get("timeout_seconds", 30.0)),
                   retries=int(options.get("retries", 3)),
                   chunk_size=int(options.get("chunk_size", 1000)), verify=_verify(options),
                   on_behalf_of_username=options.get("on_behalf_of_username"))


def ttp_from_config(kind: str, options: Mapping[str, Any], *, provider: str, secret: Secret) -> TTPBackend:
    """The backend for one provider. Raises ValueError (one line, no secret) for a configuration problem."""
    if kind == "nlps1":
        return _nlps1(options, secret)
    if kind == "embedded":
        from gateway.ttp.embedded import EmbeddedTTP
        from gateway.ttp.keystore import KeyStore, KeyStoreError

        try:
            return EmbeddedTTP(KeyStore.load(Path(_required(options, "key_dir", kind))), provider=provider)
        except KeyStoreError as exc:
            raise ValueError(f"embedded TTP: {exc}") from None
    if kind == "gpas":
        return _gpas(options, secret)
    if kind == "tres":
        return _tres(options, secret)
    if kind in ("tres+nlps1", "tres+gpas"):
        tres = _tres(_required(options, "tres", kind), secret)
        other_kind = kind.split("+", 1)[1]
        other_options = _required(options, other_kind, kind)
        other = _nlps1(other_options, secret) if other_kind == "nlps1" else _gpas(other_options, secret)
        return RoutingTTP({"MRN": tres}, other)
    raise ValueError(f"unknown TTP kind {kind!r} (one of {', '.join(KINDS)})")


def _hint(exc: TTPRejected) -> str:
    return {401: "the credentials are not accepted", 403: "this caller may not use the registry/domain",
            404: "the TTP does not know this registry domain"}.get(exc.status, exc.diagnostics)


def _check_types(backend: TTPBackend) -> list[PrePseudonym]:
    if isinstance(backend, TresTTP):
        return [SYNTHETIC_MRN]
    if isinstance(backend, RoutingTTP) and "MRN" in backend.routes:
        return [SYNTHETIC_GG, SYNTHETIC_MRN]
    return [SYNTHETIC_GG]


async def check_backend(backend: TTPBackend, *, registry: str = "registry-example") -> list[Step]:
    """(step, ok, detail) for: probe, a round trip with fixed synthetic values (each sent twice: the answer
    must be deterministic), and MRN reversal where the backend offers it. Stops at the first failure."""
    steps: list[Step] = []
    try:
        await backend.probe()
        steps.append(("probe", True, f"{type(backend).__name__} answers"))
    except TTPUnavailable as exc:
        return [("probe", False, str(exc))]
    synthetic = _check_types(backend)
    started = time.perf_counter()
    try:
        results = await backend.pseudonymise(registry, synthetic + synthetic)
    except TTPRejected as exc:
        return [*steps, ("round trip", False, f"HTTP {exc.status}: {_hint(exc)}")]
    except TTPUnavailable as exc:
        return [*steps, ("round trip", False, str(exc))]
    elapsed = (time.perf_counter() - started) * 1000
    n = len(synthetic)
    for first, second in zip(results[:n], results[n:], strict=True):
        good = first.identifier_value is not None and first.identifier_value == second.identifier_value
        detail = (f"{first.type}: deterministic pseudonym ({elapsed:.0f} ms)" if good
                  else f"{first.type}: unexpected answer ({first.error_code or 'not deterministic'})")
        steps.append(("round trip", good, detail))
        if not good:
            return steps
    reverse = getattr(backend, "depseudonymise", None)
    mrn = next((r for r in results[:n] if r.type == "MRN"), None)
    if mrn is not None and reverse is not None and mrn.identifier_value is not None:
        try:
            [back] = await reverse(registry, [mrn.identifier_value])
        except TTPUnavailable as exc:
            return [*steps, ("reversal", False, str(exc))]
        good = back.identifier_value == nlps1.b64u(SYNTHETIC_MRN.value)
        steps.append(("reversal", good, "MRN reversal returns the inner layer" if good
                      else f"MRN reversal failed ({back.error_code or 'wrong value'})"))
    return steps


def options_from_pairs(pairs: list[str], *, kind: str, url: str, registry: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs from the command line (dotted keys nest, ``true``/``false`` are booleans) plus the
    command's ``--url`` and ``--registry`` where the kind needs them (gPAS: ``domain`` defaults to the
    registry id). Values are never secrets: those are named by ``*_env`` keys."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option needs KEY=VALUE, got {key!r}")
        node = options
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = {"true": True, "false": False}.get(value.lower(), value)
    if kind in ("gpas", "tres", "nlps1"):
        options.setdefault("url", url)
    if kind == "gpas" and "domains" not in options:
        options["domains"] = {registry: options.pop("domain", registry)}
    return options


async def check_configured(kind: str, options: dict[str, Any], *, registry: str, provider: str,
                           secret: Secret) -> list[Step]:
    """Build the backend, check it, close it; a configuration problem is one failed ``config`` step."""
    try:
        backend = ttp_from_config(kind, options, provider=provider, secret=secret)
    except ValueError as exc:
        return [("config", False, str(exc))]
    try:
        return await check_backend(backend, registry=registry)
    finally:
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()
