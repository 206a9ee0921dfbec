"""RegistryClient against the real receiver under uvicorn: classification, Retry-After, auth variants."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI, Request

from gateway.forward import (
    BearerToken,
    MutualTLS,
    NoAuth,
    OAuth2ClientCredentials,
    RegistryClient,
    auth_from_config,
    auth_from_settings,
    parse_retry_after,
)
from gateway.receiver import create_receiver_app
from tests.servers import free_port, serve
from tests.test_receiver import make_bundle


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    with serve(create_receiver_app(tmp_path / "recv", test_faults=True)) as base:
        yield base


def deliver(base: str, payload: bytes, **kw) -> object:
    async def go():
        async with RegistryClient(base, **kw) as client:
            return await client.deliver(payload, request_id="d-1")

    return asyncio.run(go())


PAYLOAD = orjson.dumps(make_bundle(1))


def test_success(receiver: str) -> None:
    attempt = deliver(receiver, PAYLOAD)
    assert attempt.ok and attempt.status == 200 and not attempt.retryable and attempt.outcome_text is None
    assert httpx.get(f"{receiver}/_accepted").json() == {"urn:test:delivery|d-1": 1}


def test_503_is_retryable_with_the_registry_outcome(receiver: str) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 503})
    attempt = deliver(receiver, PAYLOAD)
    assert not attempt.ok and attempt.retryable and attempt.status == 503 and attempt.retry_after is None
    assert orjson.loads(attempt.outcome_text)["issue"][0]["diagnostics"] == "test fault injection"


def test_429_and_408_carry_retry_after(receiver: str) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    httpx.post(
        f"{receiver}/_faults",
        json=[{"status": 429, "retry_after": "7"}, {"status": 408, "retry_after": when}],
    )
    throttled = deliver(receiver, PAYLOAD)
    assert throttled.retryable and throttled.status == 429 and throttled.retry_after == 7.0
    timeout = deliver(receiver, PAYLOAD)
    assert timeout.retryable and timeout.status == 408 and 100 < timeout.retry_after <= 120


def test_409_a_write_conflict_at_the_registry_is_retried(receiver: str) -> None:
    """A probe: a registry's 409 (HAPI's answer to two writes of one resource at once) was a dead letter
    after one attempt, and the EHR was told 422."""
    httpx.post(f"{receiver}/_faults", json={"status": 409})
    conflict = deliver(receiver, PAYLOAD)
    assert not conflict.ok and conflict.retryable and conflict.status == 409
    assert deliver(receiver, PAYLOAD).ok  # the next attempt goes through


def test_400_is_final_with_the_registry_outcome(receiver: str) -> None:
    httpx.post(f"{receiver}/_faults", json={"status": 400, "diagnostics": "Observation.code: unknown code"})
    attempt = deliver(receiver, PAYLOAD)
    assert not attempt.ok and not attempt.retryable and attempt.status == 400
    outcome = orjson.loads(attempt.outcome_text)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == "Observation.code: unknown code"
    # and a real validation refusal of the receiver itself (not a fault): a bundle that is not a transaction
    bad = deliver(receiver, orjson.dumps({**make_bundle(2), "type": "collection"}))
    assert bad.status == 422 and not bad.retryable


def test_network_error_is_retryable_with_a_fixed_text() -> None:
    attempt = deliver(f"http://127.0.0.1:{free_port()}/", PAYLOAD, timeout=2)
    assert not attempt.ok and attempt.retryable and attempt.status is None
    assert attempt.outcome_text == "network error: ConnectError"


def test_error_without_operation_outcome_gets_a_fixed_text() -> None:
    app = FastAPI()

    @app.post("/")
    async def teapot() -> None:
        from fastapi import HTTPException

        raise HTTPException(418, "body text that must not be kept")

    with serve(app) as base:
        attempt = deliver(base, PAYLOAD)
    assert attempt.status == 418 and not attempt.retryable
    assert attempt.outcome_text == "registry answered HTTP 418 without an OperationOutcome"


def test_parse_retry_after() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(email.utils.formatdate(now + 60, usegmt=True), now=now) == 60.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0
    assert parse_retry_after("10000000") == 86400.0  # bounded
    assert (
        parse_retry_after("soon") is None
        and parse_retry_after(None) is None
        and parse_retry_after("") is None
    )


def test_bearer_token(tmp_path: Path) -> None:
    with serve(create_receiver_app(tmp_path / "r", token="tok")) as base:
        assert deliver(base, PAYLOAD, auth=BearerToken("tok")).ok
        refused = deliver(base, PAYLOAD, auth=NoAuth())
        assert refused.status == 401 and not refused.retryable


def token_server(issued: list[str], token: str, *, lifetime: int = 3600) -> FastAPI:
    """A minimal OAuth2 token endpoint (client-credentials grant, HTTP Basic client auth)."""
    app = FastAPI()

    @app.post("/token")
    async def issue(request: Request) -> dict:
        form = (await request.body()).decode()
        auth = request.headers.get("authorization", "")
        if "grant_type=client_credentials" not in form or not auth.startswith("Basic "):
            from fastapi import HTTPException

            raise HTTPException(400, "invalid_request")
        issued.append(token)
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}

    return app


def test_oauth2_client_credentials_caches_and_refreshes_after_401(tmp_path: Path) -> None:
    issued: list[str] = []
    with (
        serve(token_server(issued, "fresh-token")) as tokens,
        serve(create_receiver_app(tmp_path / "r", token="fresh-token")) as base,
    ):
        auth = OAuth2ClientCredentials(f"{tokens}/token", "gateway", "secret", scope="system/*.write")

        async def go() -> list:
            async with RegistryClient(base, auth=auth) as client:
                first = await client.deliver(PAYLOAD)
                second = await client.deliver(PAYLOAD)
                auth._token = "revoked-token"  # the registry revoked it before it expired
                third = await client.deliver(PAYLOAD)
                return [first, second, third]

        attempts = asyncio.run(go())
    assert [a.ok for a in attempts] == [True, True, True]
    assert len(issued) == 2  # cached for the second delivery; fetched again once after the 401


def test_oauth2_token_endpoint_down_is_retryable(tmp_path: Path) -> None:
    auth = OAuth2ClientCredentials(f"http://127.0.0.1:{free_port()}/token", "gw", "secret")
    with serve(create_receiver_app(tmp_path / "r")) as base:
        attempt = deliver(base, PAYLOAD, auth=auth, timeout=2)
    assert not attempt.ok and attempt.retryable and attempt.status is None


def test_auth_from_settings_and_config() -> None:
    assert isinstance(auth_from_settings("none"), NoAuth)
    assert isinstance(auth_from_settings("bearer", token="t"), BearerToken)
    oauth = auth_from_settings("oauth2", token_url="https://as/token", client_id="c", client_secret="s3cr3t")
    assert isinstance(oauth, OAuth2ClientCredentials) and "s3cr3t" not in repr(oauth)
    mtls = auth_from_settings("mtls", cert_file="c.pem", key_file="k.pem", token="t")
    assert isinstance(mtls, MutualTLS) and isinstance(mtls.inner, BearerToken)
    with pytest.raises(ValueError):
        auth_from_settings("bearer")
    with pytest.raises(ValueError):
        auth_from_settings("kerberos")

    class Cfg:  # the shape of gateway.config.RegistryAuth
        type = "bearer"
        token_env = "REG_TOKEN"
        token_url = client_id = client_secret_env = cert_file = key_file = None

    env = {"REG_TOKEN": "from-env"}
    auth = auth_from_config(Cfg(), lambda name: env.get(name) if name else None)
    assert isinstance(auth, BearerToken) and auth.token == "from-env"


def test_verify_is_on_by_default() -> None:
    client = RegistryClient("https://registry.example/fhir")
    ctx = client._http._transport._pool._ssl_context  # white-box: the context httpx will use
    import ssl

    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    asyncio.run(client.aclose())


def _write_pki(d: Path) -> dict[str, str]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (test keys only)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer_key, issuer: str, *, ca: bool = False, san=None, usage=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    paths: dict[str, str] = {}

    def save(label: str, cert, key) -> None:
        (d / f"{label}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{label}_cert"] = str(d / f"{label}.crt")
        if key is not None:
            (d / f"{label}.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            paths[f"{label}_key"] = str(d / f"{label}.key")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    save("ca", issue("test CA", ca_key, ca_key, "test CA", ca=True), None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    save(
        "server",
        issue(
            "127.0.0.1",
            server_key,
            ca_key,
            "test CA",
            san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        ),
        server_key,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    save(
        "client",
        issue("gateway", client_key, ca_key, "test CA", usage=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        client_key,
    )
    return paths


@contextmanager
def serve_mtls(app, pki: dict[str, str]) -> Iterator[str]:
    """Like tests.servers.serve, but HTTPS with a required client certificate."""
    import ssl
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=pki["server_cert"],
        ssl_keyfile=pki["server_key"],
        ssl_ca_certs=pki["ca_cert"],
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "TLS test server did not start"
        time.sleep(0.02)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_mutual_tls_with_a_private_ca(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    with serve_mtls(create_receiver_app(tmp_path / "r"), pki) as base:
        ok = deliver(
            base, PAYLOAD, auth=MutualTLS(pki["client_cert"], pki["client_key"]), verify=pki["ca_cert"]
        )
        assert ok.ok and ok.status == 200
        no_cert = deliver(base, PAYLOAD, verify=pki["ca_cert"], timeout=5)
        assert not no_cert.ok and no_cert.status is None and no_cert.retryable
        untrusted = deliver(base, PAYLOAD, auth=MutualTLS(pki["client_cert"], pki["client_key"]), timeout=5)
        assert not untrusted.ok and untrusted.status is None  # the private CA is not in the system store
        assert untrusted.outcome_text.startswith("network error")


def test_oauth2_token_endpoint_with_its_own_tls_settings(tmp_path: Path) -> None:
    issued: list[str] = []
    with (
        serve(token_server(issued, "tok")) as tokens,
        serve(create_receiver_app(tmp_path / "r", token="tok")) as base,
    ):
        auth = OAuth2ClientCredentials(f"{tokens}/token", "gw", "secret", token_verify=True)
        assert deliver(base, PAYLOAD, auth=auth).ok
    assert issued == ["tok"]
