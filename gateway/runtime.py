"""The running gateway: configuration turned into compiled chains, a store, a TTP client and a worker.

Built once at start-up (`build_runtime`); everything that needs I/O hangs off this object, so the stages
themselves stay plain functions and there is no global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway import __version__
from gateway.config import GatewayConfig, RegistryConfig, Settings, secret_from_env
from gateway.deid.engine import compile_plan
from gateway.deid.profile import Profile, load_profiles
from gateway.deid.rules import load_rules
from gateway.forward import RegistryClient, auth_from_config
from gateway.idempotency import content_digest
from gateway.keys import GatewayKeys, load_keys
from gateway.metrics import GatewayMetrics
from gateway.optout import (
    ConsentPolicy,
    EhrConsentSearch,
    OptOutSource,
    RegisterOptOut,
    objection_digest,
    registered_form,
    stored_forms,
)
from gateway.optout.base import OUTAGE_REASONS, OptOutUnavailable
from gateway.outcome import FhirError
from gateway.pipeline.validate import SchemaValidator, validate_bundle
from gateway.process import (
    REPORT_COUNTS,
    Processed,
    ProviderChain,
    RegistryChain,
    cpu_work,
    dropped_by_reason,
    process_bundle,
)
from gateway.pseudonym.mapping import InputMapping, load_input_mapping
from gateway.pseudonym.source import SourceStage
from gateway.service.auth import Authenticator, Caller
from gateway.service.logs import request_id
from gateway.store import AuditInput, Delivery, Store, StoreUnavailable, open_store
from gateway.ttp.backend import TTPBackend, TTPRejected, TTPUnavailable, round_trip
from gateway.ttp.client import CachingTTP
from gateway.ttp.timed import TimedTTP
from gateway.worker import OutboxWorker

log = logging.getLogger("gateway.runtime")

DELIVERY_SYSTEM = "urn:fhir-gateway:delivery"
# How long a pseudonym from the TTP is reused: a key rotation at the TTP reaches new deliveries within this.
CACHE_TTL_SECONDS = 600.0
READINESS_SECONDS = 1.0  # how long a /readyz answer is kept (see Runtime.readiness)
SCHEMA_PATH = Path(__file__).parent / "data" / "fhir-r4.schema.json"


@dataclass
class Accepted:
    delivery_id: str | None
    report: dict[str, Any]
    created: bool = True


@dataclass
class Runtime:
    config: GatewayConfig
    settings: Settings
    keys: GatewayKeys
    store: Store
    validator: SchemaValidator
    mapping: InputMapping
    profiles: dict[str, Profile]
    registries: dict[str, RegistryChain]
    providers: dict[str, ProviderChain]
    forwarders: dict[str, RegistryClient]
    metrics: GatewayMetrics
    version: str = __version__
    authenticator: Authenticator = field(init=False)
    # True when built from the configuration alone (`startup_runtime`): another process can then build the
    # same chain from `config` + `settings` (bulk worker processes); False when parts were handed in.
    from_config_alone: bool = field(default=False, init=False)
    _worker: OutboxWorker | None = field(default=None, init=False)
    _worker_task: asyncio.Task | None = field(default=None, init=False)
    _outcome_waiters: dict[str, set[asyncio.Event]] = field(default_factory=dict, init=False)
    _ready_at: float | None = field(default=None, init=False)  # when readiness last found no problem
    _readiness_asked: asyncio.Future[list[str]] | None = field(default=None, init=False)  # in flight

    def __post_init__(self) -> None:
        self.authenticator = Authenticator(self.config)

    # -- life cycle -------------------------------------------------------------------------------------
    async def start(self, *, run_worker: bool = True, intake: bool = True) -> None:
        """A TTP that refuses us (wrong key, wrong URL) stops the start; one that is merely down does not:
        the outbox still drains to the registries (no TTP needed) and intake answers 503 until it is back.
        `intake=False` (a worker-only process) never asks the TTP anything."""
        for name, provider in self.providers.items() if intake else ():
            try:
                await provider.ttp.probe()
                if self.ttp_is_stateless:
                    # the probe needs no key: a wrong API key, or a registry the TTP has no domain for, shows
                    # only when a pseudonym is asked for (as `fhir-gateway check` does, per registry)
                    for registry in self.registries:
                        await _pseudonym_in_domain(provider, name, registry)
            except TTPRejected:
                raise
            except TTPUnavailable:
                log.warning(
                    "TTP not reachable at start-up; intake answers 503 until it is", extra={"provider": name}
                )
        if run_worker:
            self._worker = OutboxWorker(
                self.store,
                self.forwarders,
                poll_interval=self.settings.worker_poll_seconds,
                lease_seconds=self.settings.worker_lease_seconds,
                concurrency=self.settings.worker_concurrency,
                metrics=self.metrics,
                payload_retention=self.settings.payload_retention_days * 86400,
                on_recorded=self._outcome_recorded,
            )
            self._worker_task = asyncio.create_task(self._worker.run())

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
        if self._worker_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        log.info("gateway stopped: in-flight deliveries finished")
        await self.close_clients()

    async def close_clients(self) -> None:
        """The registry and TTP connections (also after `fhir-gateway check`, which never starts)."""
        for client in self.forwarders.values():
            await client.aclose()
        for provider in self.providers.values():
            aclose = getattr(provider.ttp, "aclose", None)  # an in-process TTP holds no connections
            if aclose is not None:
                await aclose()

    @property
    def ttp_is_stateless(self) -> bool:
        """The reference TTP (NLPS1) keeps nothing per value, so asking it for a pseudonym of random bytes
        checks our credentials without leaving a trace; gPAS or TRES would store the value."""
        return self.config.ttp.kind == "nlps1"

    async def readiness(self) -> list[str]:
        """What cannot answer now. /readyz needs no login and each answer asks every provider's TTP (a
        probe's 50 calls made 100 TTP requests): "ready" is kept for READINESS_SECONDS; a problem is asked
        again at once, so that recovery shows without delay."""
        ready_at = self._ready_at
        if ready_at is not None and time.monotonic() - ready_at < READINESS_SECONDS:
            return []
        asking = self._readiness_asked
        if asking is None or asking.done() or asking.get_loop() is not asyncio.get_running_loop():
            # one question at a time: 200 concurrent calls made 400 TTP requests (a re-probe)
            asking = self._readiness_asked = asyncio.ensure_future(self._ask_readiness())
        return list(await asyncio.shield(asking))

    async def _ask_readiness(self) -> list[str]:
        problems = []
        try:
            await asyncio.to_thread(self.store.depth)
        except Exception:
            problems.append("store")
        for name, provider in self.providers.items():
            try:
                await provider.ttp.probe()
            except Exception:
                problems.append(f"ttp:{name}")
        # set as the answer is known, not by its waiters as they resume: a call in between asked again
        self._ready_at = None if problems else time.monotonic()
        return problems

    # -- deliveries -------------------------------------------------------------------------------------
    async def accept_bundle(
        self,
        bundle: dict[str, Any],
        *,
        caller: Caller,
        registry: str,
        idempotency_key: str | None,
        body_digest: str | None = None,
        large: bool = False,
    ) -> Accepted:
        """Run the chain and commit the pseudonymised result to the outbox; only then is it accepted.

        Idempotency: the `Idempotency-Key` header, else `Bundle.identifier`, else the content's digest
        (gateway/idempotency.py: a Bundle serialised again, re-stamped or with new urn:uuids is the same);
        each stored only as a keyed hash (with sender's provider and registry), so a re-post is one
        delivery. A key or Bundle.identifier used again for other content is refused (422), not answered
        with the earlier delivery: that content would never be delivered, and the EHR would not know.
        `large`: a large body, whose CPU work runs in a worker thread (the event loop serves others).
        """
        provider = caller.provider or ""
        digest = await cpu_work(large, content_digest, bundle)
        named = idempotency_key or _bundle_identifier(bundle)
        key = self._idempotency(provider, registry, named or digest)
        request = self._idempotency(provider, registry, f"content:{digest}") if named else None
        # a delivery stored before content digests holds the body's digest (until its key expires)
        earlier = None
        if named and body_digest:
            earlier = self._idempotency(provider, registry, f"body:{body_digest}")
        # cheap look-up first: a re-post costs no TTP round trip
        existing = await asyncio.to_thread(self.store.find_by_idempotency, provider, registry, key)
        if existing is not None and not named:
            existing, key = await self._latest_version(provider, registry, key, existing)
        if existing is not None:
            # Valid before it is answered with the earlier delivery: the digest leaves out what a re-post may
            # change (the Bundle's own elements, fullUrls, meta stamps; a probe's `lastUpdated: "garbage"`
            # was answered 200). And other content under a used key that is not valid either: what is wrong
            # with it helps the EHR more than the key (a probe's integrator saw only that).
            try:
                chain = self.registries[registry]
                await cpu_work(
                    large, validate_bundle, bundle, self.validator, require_patient=chain.require_patient
                )
            except FhirError as err:
                await self.record_refusal(caller, registry, err)
                raise
            if not await self._same_request(provider, registry, key, request, earlier):
                raise _conflict(self.metrics)
            self.metrics.bundles.labels(outcome="duplicate").inc()
            return Accepted(existing.id, _report_of(existing.counts), created=False)
        try:
            processed = await process_bundle(
                bundle,
                registry=self.registries[registry],
                provider=self.providers[provider],
                validator=self.validator,
                mapping=self.mapping,
                serving=True,
                large=large,
            )
        except FhirError as err:
            await self.record_refusal(caller, registry, err)
            raise
        if OUTAGE_REASONS & (processed.report.get("optOutReasons") or {}).keys():
            # fail closed and say so: dropping the patient would answer 200, and the EHR would never send
            # again what the registry must get once the source answers
            raise OptOutUnavailable("an opt-out source could not answer")
        delivered = _delivered_types(processed)
        self._count_resources(processed, delivered)
        if processed.bundle is None:
            self.metrics.bundles.labels(outcome="nothing-to-deliver").inc()
            # once per request, as a re-posted delivery is one delivery: an EHR's retries are not more
            # patients withheld (a changed Bundle, or the same patients in another one, is another request)
            once = f"nothing-to-deliver|{key}|{request or ''}"
            event = _audit(caller, registry, "nothing-to-deliver", processed.report, once_key=once)
            await asyncio.to_thread(self.store.record_audit, event)
            return Accepted(None, processed.report)
        identifier = _delivery_identifier(key)
        processed.bundle["identifier"] = identifier
        payload = _with_last_member(processed.payload, "identifier", identifier)
        delivery_id, created = await asyncio.to_thread(
            self.store.enqueue,
            provider=provider,
            client=caller.client_id,
            registry=registry,
            idempotency_key=key,
            request_digest=request,
            payload=payload,
            patient_keys=processed.patient_keys,  # every patient: a later post of any waits for this one
            # per type as delivered, as a bulk delivery's: the processing record adds both up
            counts=_counts(processed.report) | {"resources": delivered},
            pseudonym_types=sorted(processed.report.get("pseudonymTypes") or {}),
            audit=_audit(caller, registry, "accepted", processed.report),
        )
        if not created and not await self._same_request(provider, registry, key, request, earlier):
            raise _conflict(self.metrics)  # the same key, posted at the same time by another request
        self.metrics.bundles.labels(outcome="accepted" if created else "duplicate").inc()
        if created and self._worker is not None:
            self._worker.wake()
        return Accepted(delivery_id, processed.report, created)

    async def _latest_version(
        self, provider: str, registry: str, key: str, first: Delivery
    ) -> tuple[Delivery | None, str]:
        """A Bundle known by its content alone (no Idempotency-Key, no Bundle.identifier), posted again after
        a newer delivery of its patients (A, B, A: a correction taken back) goes again, as a delivery of its
        own keyed after the newer one: answered with A's first delivery, the registry kept B (a registry
        holder's probe). Posted once more, it is that delivery. The delivery to answer with, and the key."""
        newest = await asyncio.to_thread(self.store.newest_of_patients, first.id)
        if newest is None or newest.idempotency_key.startswith(key):
            return newest or first, key
        again = f"{key}|after|{newest.id}"
        return await asyncio.to_thread(self.store.find_by_idempotency, provider, registry, again), again

    async def _same_request(
        self, provider: str, registry: str, key: str, request: str | None, earlier: str | None = None
    ) -> bool:
        """Is the content the key was first used for (as far as its digest was stored) this content?"""
        if request is None:
            return True
        stored = await asyncio.to_thread(self.store.request_digest, provider, registry, key)
        return stored is None or any(hmac.compare_digest(stored, d) for d in (request, earlier) if d)

    async def record_refusal(self, caller: Caller, registry: str, err: FhirError) -> None:
        """The privacy officer sees what the chain refused (a leak-gate finding above all) in the audit trail
        and the metrics; the EHR gets the error. A store that cannot take the line does not hide the error."""
        self.metrics.bundles.labels(outcome="refused").inc()
        with contextlib.suppress(StoreUnavailable):
            await asyncio.to_thread(self.store.record_audit, _refusal(caller, registry, err))

    def _count_resources(self, processed: Processed, delivered: dict[str, int]) -> None:
        for rtype, n in delivered.items():
            self.metrics.resources.labels(rtype, "delivered").inc(n)
        for reason, per_type in dropped_by_reason(processed.report).items():
            for rtype, n in per_type.items():
                self.metrics.resources.labels(rtype, f"dropped:{reason}").inc(n)

    def _idempotency(self, provider: str, registry: str, key: str) -> str:
        msg = f"{provider}|{registry}|{key}".encode()
        return hmac.new(self.keys.idempotency_key(), msg, hashlib.sha256).hexdigest()

    async def wait_for(self, delivery_id: str, timeout: float) -> Any:
        """The delivery once delivered or dead, or once an attempt failed and it waits for its retry, or it
        waits behind an older one of its patients that does (the registry is down: the EHR is told so now,
        not after `timeout`), or as it stands after `timeout`.
        Woken by this process's worker when it records an outcome; the store is polled as well, for another
        process's worker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        recorded = asyncio.Event()
        self._outcome_waiters.setdefault(delivery_id, set()).add(recorded)
        try:
            while True:
                d = await asyncio.to_thread(self.store.get, delivery_id)
                if d is None or d.status in ("delivered", "dead") or loop.time() > deadline:
                    return d
                if d.status == "queued" and (
                    d.attempts > 0  # an attempt failed: queued for its retry
                    or await asyncio.to_thread(self.store.behind_a_retry, delivery_id)  # or an older one's
                ):
                    return d
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(recorded.wait(), min(delay, max(0.0, deadline - loop.time())))
                recorded.clear()
                delay = min(delay * 1.5, 0.25)
        finally:
            waiters = self._outcome_waiters.get(delivery_id, set())
            waiters.discard(recorded)
            if not waiters:
                self._outcome_waiters.pop(delivery_id, None)

    def _outcome_recorded(self, delivery_id: str) -> None:
        for recorded in self._outcome_waiters.get(delivery_id, ()):
            recorded.set()

    # -- objection register -----------------------------------------------------------------------------
    # Every change is in the audit trail (who, when, which registry; never the patient), so the privacy
    # officer can say who registered or withdrew an objection.
    async def objections_add(self, caller: Caller, patient_number: str, registry: str) -> bool:
        """Register an objection; True if it was new."""
        number = registered_form(patient_number)
        digest = objection_digest(self.keys.objection_key(), caller.provider or "", number)
        new = await asyncio.to_thread(self.store.optout_add, caller.provider or "", registry, digest)
        outcome = "new" if new else "already-registered"
        await asyncio.to_thread(
            self.store.record_audit, objection_audit(caller, registry, "registered", outcome)
        )
        return new

    async def objections_withdraw(self, caller: Caller, patient_number: str, registry: str) -> bool:
        """Withdraw an objection; False if none was registered for this number and registry."""
        provider, gone = caller.provider or "", False
        for number in stored_forms(patient_number):
            digest = objection_digest(self.keys.objection_key(), provider, number)
            gone |= await asyncio.to_thread(self.store.optout_withdraw, provider, registry, digest)
        outcome = "withdrawn" if gone else "not-registered"
        await asyncio.to_thread(
            self.store.record_audit, objection_audit(caller, registry, "withdrawn", outcome)
        )
        return gone

    def processing_context(self, registry: str) -> dict[str, Any]:
        profile = self.profiles[self.config.registries[registry].profile]
        return {
            "purpose": profile.purpose,
            "legalBasis": profile.legal_basis,
            # what the profile asks for; `pseudonymTypes` is what was delivered in the period
            "pseudonymTypesOfProfile": list(profile.pseudonym_types),
            "recipient": profile.name,
        }


async def _pseudonym_in_domain(provider: ProviderChain, name: str, registry: str) -> None:
    """One pseudonym of random bytes in the registry's domain; a refusal names the provider and registry."""
    try:
        await round_trip(provider.ttp, registry, provider.source.source_version)
    except TTPRejected as exc:
        where = f"{exc.diagnostics} (provider {name}, registry {registry})"
        raise TTPRejected(exc.status, where) from None


def _bundle_identifier(bundle: dict[str, Any]) -> str | None:
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return f"{ident.get('system', '')}|{ident['value']}"
    return None


def _delivered_types(processed: Processed) -> dict[str, int]:
    """Resources per type of the Bundle that goes to the registry (the Provenance included)."""
    entries = processed.bundle["entry"] if processed.bundle is not None else ()
    return dict(sorted(Counter(e["resource"]["resourceType"] for e in entries).items()))


def _counts(report: dict[str, Any]) -> dict[str, Any]:
    """Counts only: what the outbox row and the audit trail keep of a delivery."""
    deid = report.get("deidentification") or {}
    return {k: report[k] for k in REPORT_COUNTS if k in report} | {
        "resourcesDelivered": deid.get("resourcesKept"),
        "dropped": dropped_by_reason(report) or None,
        # why patients were withheld and pseudonym types not made, in fixed codes (the EHR's answer has
        # them; a probe's privacy officer could read only "opt-out-unknown" in the audit trail)
        "optOutReasons": report.get("optOutReasons") or None,
        "pseudonymsSkipped": report.get("pseudonymsSkipped") or None,
    }


def bundle_identifier(idempotency_key: str) -> str:
    """`system|value` of the Bundle.identifier a delivery has at the registry: where the registry holder
    finds it (a probe's privacy officer could not match a delivery to the registry's record)."""
    from gateway.bulk.chunks import IDENTIFIER_SYSTEM as BULK_SYSTEM  # a bulk Bundle's key is its tag

    if idempotency_key.startswith("bulk|"):
        return f"{BULK_SYSTEM}|{idempotency_key}"
    identifier = _delivery_identifier(idempotency_key)
    return f"{identifier['system']}|{identifier['value']}"


def _delivery_identifier(key: str) -> dict[str, str]:
    """A posted Bundle's identifier at the registry, from its idempotency key: stable, so that the registry
    (and our receiver) recognise a re-sent delivery. A version posted again after a newer one is keyed
    after it (`_latest_version`): another delivery, so another identifier."""
    value = hashlib.sha256(key.encode()).hexdigest() if "|" in key else key
    return {"system": DELIVERY_SYSTEM, "value": value[:32]}


def _report_of(counts: dict[str, Any] | None) -> dict[str, Any]:
    """A re-posted Bundle's answer from the counts stored with its delivery, as the first answer had them
    (a probe's re-post got a status and no counts)."""
    counts = counts or {}
    report: dict[str, Any] = {k: counts[k] for k in REPORT_COUNTS if isinstance(counts.get(k), int)}
    if isinstance(counts.get("resourcesDelivered"), int):
        report["deidentification"] = {"resourcesKept": counts["resourcesDelivered"]}
    if counts.get("dropped"):
        report["resourcesDroppedByReason"] = counts["dropped"]
    for key in ("optOutReasons", "pseudonymsSkipped"):
        if counts.get(key):
            report[key] = counts[key]
    return report | {"duplicate": True}


def _registry_auth(name: str, auth: Any) -> Any:
    """The registry's auth; a missing secret names the registry and the variable to set."""
    try:
        return auth_from_config(auth, secret_from_env)
    except ValueError as err:
        variables = [v for v in (auth.token_env, auth.client_secret_env) if v and not os.environ.get(v)]
        hint = f" (set {', '.join(variables)})" if variables else ""
        raise ValueError(f"registries.{name}.auth: {err}{hint}") from None


def _request_id() -> str | None:
    """The X-Request-ID of the post being handled (as on its log lines), or None outside a request."""
    current = request_id.get()
    return None if current == "-" else current


def objection_audit(caller: Caller, registry: str, change: str, outcome: str) -> AuditInput:
    return AuditInput(
        actor=caller.client_id,
        provider=caller.provider or "",
        registry=registry,
        event=f"objection-{change}",
        outcome=outcome,
        request_id=_request_id(),
    )


def _refusal(caller: Caller, registry: str, err: FhirError) -> AuditInput:
    """A Bundle the chain refused, for the audit trail: the status and the kinds of issue (FHIR's fixed
    issue-type codes, `security` for the leak gate), never a path or a text."""
    kinds = Counter(issue.code for issue in err.issues)
    return AuditInput(
        actor=caller.client_id,
        provider=caller.provider or "",
        registry=registry,
        event="refused",
        outcome=f"{err.status}-{err.issues[0].code}" if err.issues else str(err.status),
        counts={"issues": dict(kinds)},
        request_id=_request_id(),
    )


def _audit(
    caller: Caller, registry: str, outcome: str, report: dict[str, Any], once_key: str | None = None
) -> AuditInput:
    return AuditInput(
        actor=caller.client_id,
        provider=caller.provider or "",
        registry=registry,
        event="accepted" if outcome == "accepted" else "received",
        outcome=outcome,
        counts=_counts(report),
        pseudonym_types=tuple(sorted(report.get("pseudonymTypes") or {})),
        request_id=_request_id(),
        once_key=once_key,
    )


# -- building -------------------------------------------------------------------------------------------
def build_runtime(
    config: GatewayConfig,
    settings: Settings,
    *,
    ttps: dict[str, tuple[TTPBackend, str]],
    store: Store | None = None,
) -> Runtime:
    """`ttps` maps each provider id to its TTP backend (authenticated as that provider) and a display name."""
    keys = load_keys(settings.key_dir, [p.id for p in config.providers])
    expected = settings.source_key_check
    if expected and expected != keys.source_check_value:
        raise ValueError(
            f"the source key v{keys.source_version} is not the ecosystem's: its check value is "
            f"{keys.source_check_value}, FHIR_GATEWAY_SOURCE_KEY_CHECK says {expected} (pseudonyms made with "
            "it would link to nobody's at other providers)"
        )
    for p in config.providers:
        if p.mrn_system and p.id not in keys.provider_mrn:
            raise ValueError(
                f"provider {p.id}: an mrn_system is configured but its MRN key is missing "
                "(fhir-gateway keys init --provider ...)"
            )
    metrics = GatewayMetrics.create()
    store = store or open_store(settings.store_url)
    profiles = load_profiles(Path(config.profiles_dir))
    rules = load_rules()
    registries = {
        name: _registry_chain(name, reg, profiles, rules, keys, store)
        for name, reg in config.registries.items()
    }
    providers = {
        p.id: ProviderChain(
            p.id,
            SourceStage(keys.source_keys, keys.source_version, keys.provider_mrn.get(p.id), p.id),
            p.mrn_system,
            # misses only reach the TTP (and its latency histogram); the cache is keyed by pre-pseudonym
            CachingTTP(TimedTTP(ttps[p.id][0], metrics.ttp_seconds), ttl=CACHE_TTL_SECONDS),
            ttps[p.id][1],
        )
        for p in config.providers
    }
    forwarders = {
        name: RegistryClient(
            reg.endpoint,
            auth=_registry_auth(name, reg.auth),
            timeout=reg.timeout_seconds,
            verify=reg.ca_bundle or True,
        )
        for name, reg in config.registries.items()
    }
    return Runtime(
        config=config,
        settings=settings,
        keys=keys,
        store=store,
        validator=SchemaValidator.from_file(SCHEMA_PATH),
        mapping=load_input_mapping(),
        profiles=profiles,
        registries=registries,
        providers=providers,
        forwarders=forwarders,
        metrics=metrics,
    )


def _registry_chain(
    name: str, reg: RegistryConfig, profiles: dict[str, Profile], rules: Any, keys: GatewayKeys, store: Store
) -> RegistryChain:
    if reg.profile not in profiles:
        raise ValueError(f"registry {name}: profile {reg.profile!r} not found")
    profile = profiles[reg.profile]
    return RegistryChain(
        registry=name,
        plan=compile_plan(profile, rules),
        types=tuple(profile.pseudonym_types),
        optout=_optout(reg, keys, store),
        bundle_consent="bundle-consent" in reg.optout,
        consent_policy=_consent_policy(reg),
        id_key=keys.id_key(name),
        identifier_system=reg.identifier_system,
        strict=reg.strict,
    )


def _consent_policy(reg: RegistryConfig) -> ConsentPolicy | None:
    return ConsentPolicy.from_mapping(reg.consent_policy) if reg.consent_policy else None


def _optout(reg: RegistryConfig, keys: GatewayKeys, store: Store) -> tuple[OptOutSource, ...]:
    """The bundle-independent sources; Consents in the posted bundle are read per bundle."""
    sources: list[OptOutSource] = []
    if "register" in reg.optout:
        sources.append(RegisterOptOut(store.objection_lookup, keys.objection_key()))
    if "ehr-consent" in reg.optout:
        if not reg.ehr_consent_url:
            raise ValueError("ehr-consent opt-out needs ehr_consent_url")
        sources.append(EhrConsentSearch(reg.ehr_consent_url, policy=_consent_policy(reg)))
    if "gics" in reg.optout:
        from gateway.optout.gics import gics_from_config, hmac_signer_id

        if not reg.gics:
            raise ValueError("gics opt-out needs a gics block")
        # the same keyed id as the objection register: gICS never sees a plain patient number
        sources.append(
            gics_from_config(reg.gics, secret_from_env, signer_id=hmac_signer_id(keys.objection_key()))
        )
    return tuple(sources)


def _with_last_member(payload: bytes | None, name: str, value: Any) -> bytes:
    """`payload` (an orjson-serialised object) with one more member at the end: the same bytes as dumping the
    object after adding it (a new key goes last), without serialising the whole bundle again."""
    if payload is None or not payload.endswith(b"}") or payload == b"{}":
        raise ValueError("expected a serialised, non-empty JSON object")
    return payload[:-1] + b',"' + name.encode() + b'":' + orjson.dumps(value) + b"}"


def _conflict(metrics: GatewayMetrics) -> FhirError:
    metrics.bundles.labels(outcome="idempotency-conflict").inc()
    return FhirError.single(
        422,
        "business-rule",
        "this Idempotency-Key (or Bundle.identifier) was used for a Bundle with other content; "
        "send changed content with a new key and a new Bundle.identifier",
        "Idempotency-Key",
    )
