"""Gateway configuration: one YAML file, with environment variables for secrets and per-machine overrides.

Secrets never live in the YAML file: it names environment variables or key files (mode 0600) instead.
Every setting, its environment variable and its default is listed in README.md ("Configuration").
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway import yamlfile

REPO_ROOT = Path(__file__).resolve().parent.parent


def _sha256_hex(value: str) -> str:
    """A key's hash as `fhir-gateway clients new-key` prints it: 64 hex digits, not a placeholder."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError("must be the SHA-256 (64 hex digits) that `fhir-gateway clients new-key` prints")
    return value.lower()


KeyHash = Annotated[str, AfterValidator(_sha256_hex)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    """A care provider (hospital) whose EHR delivers through this gateway."""

    id: str = Field(description="AGB or URA code, e.g. 'ura:00000000'")
    name: str = ""
    mrn_system: str | None = Field(None, description="identifier.system of the provider's own patient number")
    ttp_api_key_env: str | None = Field(
        None, description="environment variable with this provider's TTP API key (default: ttp.api_key_env)"
    )
    import_dir: Path | None = Field(
        None,
        description="the only folder this provider's $import manifests may name files in (default: "
        "FHIR_GATEWAY_BULK_IMPORT_DIR, which serves a gateway of one provider only)",
    )


class ClientConfig(_Strict):
    """An EHR integration that may post bundles (authenticated by API key, stored as SHA-256)."""

    id: str
    provider: str
    api_key_sha256: KeyHash | None = None
    mtls_subject: str | None = Field(None, description="client certificate subject passed by a trusted proxy")
    registries: list[str] = Field(default_factory=list)



class RegistryAuth(_Strict):
    type: Literal["none", "bearer", "oauth2", "mtls"] = "none"
    token_env: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class RegistryConfig(_Strict):
    """Where and how one registry receives its deliveries."""

    profile: str = Field(description="id of the delivery profile in profiles/")
    endpoint: str = Field(description="base URL of the registry's FHIR endpoint")
    auth: RegistryAuth = RegistryAuth()
    optout: list[Literal["register", "bundle-consent", "ehr-consent", "gics"]] = [
        "register",
        "bundle-consent",
    ]
    ehr_consent_url: str | None = None
    consent_policy: dict[str, Any] | None = Field(
        None,
        description="which Consents concern this registry: purposes, not_applicable_scopes, registry_actors, "
        "registry_policies (gateway/optout/consent.py ConsentPolicy)",
    )
    gics: dict[str, Any] | None = Field(
        None, description="gICS consent source options (docs/backends/gics.md)"
    )
    timeout_seconds: float = 30.0
    ca_bundle: str | None = None
    bulk_bundle_size: int = Field(
        500, ge=1, description="entries per transaction Bundle of a bulk delivery (the registry's limit)"
    )
    identifier_system: str = Field(
        "urn:nlps1:{registry}:{type}", description="Patient.identifier.system of each pseudonym"
    )
    strict: bool = Field(
        False,
        description="also check every posted and every delivered resource with its fhir.resources R4B model "
        "(six to seven times the chain's cost; gateway/pipeline/strict.py)",
    )


class TTPConfig(_Strict):
    kind: Literal["nlps1", "gpas", "tres+nlps1", "tres+gpas"] = Field(
        "nlps1", description="the reference NLPS1 TTP, or an adapter (docs/backends/)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="adapter options for kinds other than nlps1 (gateway/ttp/factory.py)",
    )
    url: str = Field(
        "embedded", description="base URL of the TTP, or 'embedded' for the in-process reference TTP"
    )
    api_key_env: str = "FHIR_GATEWAY_TTP_API_KEY"
    timeout_seconds: float = 10.0
    max_concurrency: int = 4
    max_batch: int = 100_000
    ca_bundle: str | None = None


class GatewayConfig(_Strict):
    providers: list[ProviderConfig]
    clients: list[ClientConfig] = Field(default_factory=list)
    registries: dict[str, RegistryConfig]
    ttp: TTPConfig = TTPConfig()
    admin_api_key_sha256: KeyHash | None = None
    trusted_proxies: list[str] = Field(default_factory=list)
    profiles_dir: str = str(REPO_ROOT / "profiles")

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, value: list[ProviderConfig]) -> list[ProviderConfig]:
        ids = [p.id for p in value]
        if len(ids) != len(set(ids)):
            raise ValueError("provider ids must be unique")
        return value

    @model_validator(mode="after")
    def _clients_name_what_is_configured(self) -> GatewayConfig:
        """A client of an unknown provider failed every post with a 500; a misspelled registry showed only
        at the first post (403). Both are configuration mistakes, said at start-up and by `check`."""
        providers = {p.id for p in self.providers}
        for n, client in enumerate(self.clients):
            if client.provider not in providers:
                raise ValueError(f"clients[{n}] ({client.id}): {client.provider!r} is not in providers")
            unknown = sorted(set(client.registries) - set(self.registries))
            if unknown:
                raise ValueError(f"clients[{n}] ({client.id}): registries {unknown} are not in registries")
        return self

    def provider(self, provider_id: str) -> ProviderConfig:
        for p in self.providers:
            if p.id == provider_id:
                return p
        raise KeyError(provider_id)


def provider_share(limit: int, providers: int) -> int:
    """What one provider may hold of `limit` slots (intake, bulk jobs): half where several providers share the
    gateway, so that one hospital cannot lock the others out (at least one); all where one does; 0 (no
    limit) stays 0."""
    if not limit or providers <= 1:
        return limit
    return max(1, limit // 2)


class Settings(BaseSettings):
    """Per-machine settings, from the environment (prefix FHIR_GATEWAY_)."""

    model_config = SettingsConfigDict(env_prefix="FHIR_GATEWAY_", extra="ignore")

    config: Path = Path("gateway.yaml")
    store_url: str = "sqlite:///var/gateway.db"
    key_dir: Path = Path("var/keys")
    # the check value the ecosystem publishes of its source key (K_src, the same at every provider): the
    # gateway does not start with another key, and `check` fails while this is not set (gateway.keys)
    source_key_check: str | None = None

    @field_validator("source_key_check")
    @classmethod
    def _check_value(cls, value: str | None) -> str | None:
        """Blank is unset (a templated variable left empty must not count as verified); case is ignored."""
        if value is None:
            return None
        return value.strip().lower() or None
    host: str = "127.0.0.1"
    port: int = 8200
    # HTTPS served by the gateway itself (PEM files); without them it serves plain HTTP, for loopback or
    # behind a TLS-terminating proxy (`serve` warns when it listens elsewhere without them)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    log_level: str = "INFO"
    max_body_bytes: int = 50 * 1024 * 1024
    # a request whose headers have not all arrived this long after its connection (or its first byte) is
    # dropped: connections that send nothing would otherwise stay open for good (gateway/service/protocol.py)
    header_timeout_seconds: float = Field(15.0, gt=0)
    # a request body that sends nothing for this long is refused (408): stalled bodies hold intake slots
    body_idle_timeout_seconds: float = Field(15.0, gt=0)
    # Bundles one gateway process works on at once; a post beyond that is answered 429 + Retry-After at once
    # instead of queueing (latency stays bounded under overload; the EHR retries). 0: no limit.
    max_inflight_bundles: int = 64
    # of those, what one provider may hold (None: half where several providers share this gateway, else all)
    max_inflight_per_provider: int | None = Field(None, ge=0)
    # False: this process serves the API only, and `fhir-gateway worker` processes forward (scale-out)
    run_worker: bool = True
    worker_concurrency: int = 4
    worker_poll_seconds: float = 0.2
    # How long a claimed delivery stays leased to this worker (renewed while sending). After a crash, its
    # in-flight deliveries wait this long before another worker (or the restarted one) sends them again.
    worker_lease_seconds: float = 120.0
    # Data minimisation: a delivered Bundle's payload (pseudonymised) is emptied this many days after the
    # registry took it; the row, its counts and the audit trail stay. 0: emptied as soon as it is delivered.
    payload_retention_days: float = Field(30.0, ge=0)
    bulk_work_dir: Path = Path("var/bulk")  # bulk job state, index and uploads (removed when a job ends)
    bulk_import_dir: Path | None = None  # the only folder a $import manifest may name files in
    # worker processes (niced) that run a $import job's chain; 0: a thread of this process
    bulk_workers: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1), ge=0)
    bulk_max_upload_bytes: int = Field(20 * 1024**3, ge=1)  # one $import NDJSON upload (it is kept on disk)
    bulk_max_jobs: int = Field(2, ge=1)  # $import jobs running at once; one more is answered 429

    @model_validator(mode="after")
    def _relative_to_the_configuration(self) -> Settings:
        """A relative path is in the folder of the configuration file, not the current one: an operator
        command run elsewhere with `--config` wrote into a new, empty store that no gateway reads (a
        probe's objection import did, and the objector was delivered)."""
        home = self.config.resolve().parent  # a symlinked configuration's home is its real folder
        for name in ("key_dir", "bulk_work_dir", "bulk_import_dir"):
            path = getattr(self, name)
            if path is not None and not path.is_absolute():
                setattr(self, name, home / path)
        if self.store_url.startswith("sqlite:///") and not self.store_url.startswith("sqlite:////"):
            self.store_url = f"sqlite:///{home / self.store_url[len('sqlite:///') :]}"
        return self


def load_config(path: Path) -> GatewayConfig:
    """Load and check the YAML configuration; raises ValueError with one clear line."""
    try:
        data = yamlfile.load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"configuration file {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"configuration file {path} is {yamlfile.problem(exc)}") from None
    try:
        return GatewayConfig.model_validate(_anchored(data, Path(path).resolve().parent))
    except ValidationError as exc:
        raise ValueError(f"configuration file {path} is invalid: {validation_summary(exc)}") from None


def _anchored(data: Any, home: Path) -> Any:
    """The file's relative paths (profiles_dir, import folders, certificates) made relative to its folder:
    `check --config` run from elsewhere found no profiles."""
    if not isinstance(data, dict):
        return data  # the model says what is wrong with it

    def anchor(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            holder[key] = str(home / holder[key])  # an absolute path stays as it is

    data = {**data}
    anchor(data, "profiles_dir")
    anchor(data.get("ttp"), "ca_bundle")
    for provider in data.get("providers") or () if isinstance(data.get("providers"), list) else ():
        anchor(provider, "import_dir")
    registries = data.get("registries")
    for registry in registries.values() if isinstance(registries, dict) else ():
        anchor(registry, "ca_bundle")
        for key in ("cert_file", "key_file"):
            anchor(registry.get("auth") if isinstance(registry, dict) else None, key)
    return data


def validation_summary(exc: ValidationError) -> str:
    """pydantic's errors as one line: where and what, never the input value or a documentation URL."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(x) for x in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def secret_from_env(name: str | None) -> str | None:
    return os.environ.get(name) if name else None
