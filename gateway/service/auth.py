"""Who is calling: EHR clients (API key or mTLS identity from a trusted proxy) and administrators.

API keys are stored as SHA-256 hashes and compared in constant time against every configured hash, so the
time taken does not reveal which client (if any) a key was close to.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from gateway.config import ClientConfig, GatewayConfig
from gateway.outcome import FhirError

MTLS_HEADER = "x-client-cert-subject"


@dataclass(frozen=True)
class Caller:
    client_id: str
    provider: str | None  # None for the administrator
    registries: frozenset[str]
    admin: bool = False


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self._clients = list(config.clients)
        self._admin_hash = config.admin_api_key_sha256
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]

    def authenticate(self, headers: dict[str, str], peer: str | None) -> Caller:
        key = _presented_key(headers)
        if key is not None:
            return self._by_key(key)
        subject = headers.get(MTLS_HEADER)
        if subject and self._trusted(peer):
            for client in self._clients:
                if client.mtls_subject and hmac.compare_digest(client.mtls_subject, subject):
                    return _caller(client)
        raise FhirError.single(
            401, "login", "authentication required", headers={"WWW-Authenticate": "Bearer"}
        )

    def _by_key(self, key: str) -> Caller:
        digest = hash_api_key(key)
        found: Caller | None = None
        for client in self._clients:
            if client.api_key_sha256 and hmac.compare_digest(client.api_key_sha256, digest):
                found = _caller(client)
        if self._admin_hash and hmac.compare_digest(self._admin_hash, digest):
            found = Caller("admin", None, frozenset(), admin=True)
        if found is None:
            raise FhirError.single(401, "login", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        return found

    def trusts(self, peer: str | None) -> bool:
        """Whether `peer` is a trusted proxy (whose certificate-subject header is believed)."""
        return self._trusted(peer)

    def _trusted(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._proxies)


def _presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def _caller(client: ClientConfig) -> Caller:
    return Caller(client.id, client.provider, frozenset(client.registries))


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise FhirError.single(403, "forbidden", "this operation needs the admin credential")


def require_registry(caller: Caller, registry: str, known: set[str] | dict) -> None:
    if registry not in known:
        raise FhirError.single(404, "not-found", "unknown registry", "registry")
    if caller.admin:  # deliveries belong to a provider: only an EHR client's key says which
        raise FhirError.single(403, "forbidden", "the admin key cannot deliver; use an EHR client's key")
    if registry not in caller.registries:
        raise FhirError.single(403, "forbidden", "this client may not deliver to this registry", "registry")
