"""Security properties of the running gateway, over real HTTP on loopback.

Authentication on every route (enumerated from the app, so a new route cannot slip through), API keys kept
as hashes only, the mTLS subject header honoured only from a trusted proxy, providers isolated from each
other, the admin scope apart, outbound TLS verified, key files refused when readable by others, request
ids on every answer and no patient data in metric labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo import PROVIDER, embedded_chain
from gateway.forward import RegistryClient
from gateway.service.app import create_app
from gateway.serving import free_port
from tests.identity import identifying_values
from tests.processes import process_chain
from tests.tlsutil import self_signed, serve_https

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BUNDLE = EXAMPLES / "02-nlps1-vector-patients-transaction.json"
REGISTRY = "example-generic"
OTHER = "ura:11111111"
PUBLIC = {"/healthz", "/readyz", "/metadata"}
FHIR = {"Content-Type": "application/fhir+json"}
MTLS_SUBJECT = "CN=ehr-mtls.hospital.example,O=Test hospital,C=NL"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Iterator[Any]:
    with embedded_chain(tmp_path_factory.mktemp("security"), [REGISTRY, "example-cancer-registry"],
                        providers=(PROVIDER, OTHER), receiver_faults=True,
                        client_registries={OTHER: [REGISTRY]}) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def routes(chain: Any) -> list[tuple[str, str, str]]:
    """(method, path template, concrete path) for every route of the app as the gateway builds it."""
    app: FastAPI = create_app(chain.runtime, run_worker=False)  # route table only; the lifespan is not run
    out = []
    for route in app.routes:
        path = getattr(route, "path", None)
        for method in sorted(getattr(route, "methods", None) or ()):
            if method in ("HEAD", "OPTIONS"):
                continue
            concrete = re.sub(r"\{registry\}", REGISTRY, path)
            concrete = re.sub(r"\{[a-z_]+\}", "0" * 32, concrete)
            out.append((method, path, concrete))
    assert len(out) >= 14, out  # the known routes at the time of writing; more may come, fewer may not
    return out


def documentation_paths(chain: Any) -> set[str]:
    app = create_app(chain.runtime, run_worker=False)
    paths = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    return {p for p in paths if p}


def call(chain: Any, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return httpx.request(method, chain.gateway_url + path, content=body, headers={**FHIR, **(headers or {})},
                         timeout=30)


# --- authentication ---------------------------------------------------------------------------------------

def test_every_route_but_health_and_metadata_requires_authentication(chain: Any) -> None:
    docs = documentation_paths(chain)
    checked = []
    for method, template, path in routes(chain):
        if template in PUBLIC or template in docs:
            continue
        for headers in ({}, auth("not-a-key"), {"X-API-Key": "not-a-key"},
                        {"Authorization": "Basic Zm9vOmJhcg=="}):
            response = call(chain, method, path, headers)
            assert response.status_code == 401, (method, template, headers, response.status_code)
            assert response.json()["resourceType"] == "OperationOutcome"
            assert response.headers.get("www-authenticate") == "Bearer"
        checked.append(f"{method} {template}")
    assert "POST /registries/{registry}/Bundle" in checked and "GET /admin/audit" in checked
    for template in PUBLIC:
        assert call(chain, "GET", template).status_code == 200


def test_public_documentation_routes_carry_no_data(chain: Any) -> None:
    """FastAPI's API description and docs pages are open (clients and schemathesis read /openapi.json):
    they may describe the API, never contain deliveries, keys or patients."""
    docs = documentation_paths(chain)
    everything = "".join(httpx.get(chain.gateway_url + p, timeout=30).text for p in docs)
    for value in [chain.admin_api_key, *chain.ehr_api_keys.values()]:
        assert value not in everything


def test_api_keys_are_kept_as_sha256_only(chain: Any, tmp_path: Path) -> None:
    config = chain.runtime.config
    dumped = config.model_dump_json()
    for key in [chain.admin_api_key, *chain.ehr_api_keys.values()]:
        assert key not in dumped
        assert hashlib.sha256(key.encode()).hexdigest() in dumped
        assert key not in repr(vars(chain.runtime.authenticator))
    assert all(c.api_key_sha256 and re.fullmatch(r"[0-9a-f]{64}", c.api_key_sha256) for c in config.clients)
    # the operator's configuration file (as the process chain writes it) holds hashes, never keys
    with process_chain(tmp_path) as pc:
        text = pc.config_path.read_text()
        assert pc.ehr_api_key not in text and pc.admin_api_key not in text
        assert hashlib.sha256(pc.ehr_api_key.encode()).hexdigest() in text


def test_a_key_is_not_accepted_by_its_hash_or_a_prefix(chain: Any) -> None:
    key = chain.ehr_api_key
    for wrong in (hashlib.sha256(key.encode()).hexdigest(), key[:-1], key + "x", key.upper(), f" {key}x"):
        assert call(chain, "GET", "/deliveries", auth(wrong)).status_code == 401
    assert call(chain, "GET", "/deliveries", auth(key)).status_code == 200
    assert call(chain, "GET", "/deliveries", {"X-API-Key": key}).status_code == 200


# --- admin scope ------------------------------------------------------------------------------------------

def test_admin_scope_is_separate(chain: Any) -> None:
    admin_routes = [(m, t, p) for m, t, p in routes(chain) if t.startswith("/admin/") or t == "/metrics"]
    assert len(admin_routes) >= 5
    for method, template, path in admin_routes:
        for key in chain.ehr_api_keys.values():
            response = call(chain, method, path, auth(key))
            assert response.status_code == 403, (method, template, response.status_code)
            assert response.json()["issue"][0]["code"] == "forbidden"
    # and the admin credential cannot deliver data as if it were an EHR
    response = httpx.post(f"{chain.gateway_url}/registries/{REGISTRY}/Bundle", content=BUNDLE.read_bytes(),
                          headers={**FHIR, **auth(chain.admin_api_key)}, timeout=60)
    assert response.status_code == 403 and "the admin key cannot deliver" in response.text


# --- providers are isolated -------------------------------------------------------------------------------

def post_bundle(chain: Any, key: str, idempotency: str, body: bytes | None = None) -> httpx.Response:
    return httpx.post(f"{chain.gateway_url}/registries/{REGISTRY}/Bundle",
                      content=body or BUNDLE.read_bytes(),
                      headers={**FHIR, **auth(key), "Idempotency-Key": idempotency}, timeout=60)


def params(response: httpx.Response) -> dict[str, Any]:
    return {p["name"]: p.get("valueCode", p.get("valueInteger", p.get("valueString")))
            for p in response.json()["parameter"]}


def test_a_provider_sees_and_manages_only_its_own_deliveries_and_dead_letters(chain: Any) -> None:
    mine, theirs = chain.ehr_api_keys[PROVIDER], chain.ehr_api_keys[OTHER]
    httpx.post(f"{chain.receiver_url}/_faults", json={"status": 400, "count": 1})
    dead = post_bundle(chain, mine, "iso-dead")
    assert dead.status_code == 422, dead.text
    dead_id = params(dead)["delivery"]
    assert params(post_bundle(chain, theirs, "iso-theirs"))["status"] == "delivered"

    listed = [d["id"] for d in call(chain, "GET", "/deliveries?status=dead", auth(theirs)).json()]
    assert dead_id not in listed
    assert dead_id not in [d["id"] for d in call(chain, "GET", "/deliveries?limit=1000", auth(theirs)).json()]
    assert call(chain, "GET", f"/deliveries/{dead_id}", auth(theirs)).status_code == 404
    assert call(chain, "POST", f"/deliveries/{dead_id}/$requeue", auth(theirs)).status_code == 404
    assert call(chain, "GET", f"/deliveries/{dead_id}", auth(mine)).json()["status"] == "dead"  # untouched
    assert dead_id in [d["id"] for d in call(chain, "GET", "/deliveries?status=dead", auth(mine)).json()]
    # the administrator sees both providers' deliveries
    everything = [d["id"] for d in call(chain, "GET", "/admin/deliveries?limit=1000",
                                        auth(chain.admin_api_key)).json()]
    assert dead_id in everything and len(everything) >= 2
    assert call(chain, "POST", f"/deliveries/{dead_id}/$requeue", auth(mine)).status_code == 200


def test_objections_are_per_provider(chain: Any) -> None:
    mine, theirs = chain.ehr_api_keys[PROVIDER], chain.ehr_api_keys[OTHER]
    objection = {"patientNumber": "P0001234", "registry": REGISTRY}  # vector-1 of the example bundle

    def objection_call(key: str, path: str) -> int:
        response = httpx.post(f"{chain.gateway_url}{path}", json=objection, headers=auth(key), timeout=30)
        return response.status_code

    def dropped(key: str, tag: str) -> int:
        response = post_bundle(chain, key, tag)
        assert response.status_code == 200, response.text
        return params(response)["patientsDroppedOptOut"]

    assert objection_call(mine, "/objections") == 204
    assert dropped(mine, "obj-mine-1") == 1
    assert dropped(theirs, "obj-theirs-1") == 0  # another hospital's patient number space
    assert objection_call(theirs, "/objections/$withdraw") == 404  # cannot withdraw the other's objection
    assert dropped(mine, "obj-mine-2") == 1
    # an objection for every registry is withdrawn as such, not per registry: said, not silently 204
    assert objection_call(mine, "/objections") == 204
    everywhere = {"patientNumber": "P0001234", "registry": "*"}
    steps = [("/objections", 204), ("/objections/$withdraw", 204), ("/objections/$withdraw", 404)]
    for path, status in steps:
        response = httpx.post(f"{chain.gateway_url}{path}", json=everywhere, headers=auth(mine), timeout=30)
        assert response.status_code == status, (path, response.text)
    assert objection_call(mine, "/objections/$withdraw") == 204
    assert dropped(mine, "obj-mine-3") == 0
    # every change is in the audit trail, with the client and the registry, never the patient number
    audit = httpx.get(f"{chain.gateway_url}/admin/audit", params={"limit": 10000},
                      headers=auth(chain.admin_api_key), timeout=30)
    changes = [(e["event"], e["outcome"], e["registry"]) for e in audit.json()
               if e["event"].startswith("objection-")]
    assert changes[-7:] == [
        ("objection-registered", "new", REGISTRY),
        ("objection-withdrawn", "not-registered", REGISTRY),
        ("objection-registered", "already-registered", REGISTRY),
        ("objection-registered", "new", "*"),
        ("objection-withdrawn", "withdrawn", "*"),
        ("objection-withdrawn", "not-registered", "*"),
        ("objection-withdrawn", "withdrawn", REGISTRY),
    ], changes
    assert "P0001234" not in audit.text
    # the register keeps the registry in clear: only a known one (or '*') is accepted, and not echoed
    unknown = {"patientNumber": "P0001234", "registry": "Zyxwortel-999911120"}
    response = httpx.post(f"{chain.gateway_url}/objections", json=unknown, headers=auth(mine), timeout=30)
    assert response.status_code == 404 and "Zyxwortel" not in response.text


def test_an_objection_body_is_read_as_strictly_as_a_bundle(chain: Any) -> None:
    """A probe: `{"patientNumber": "OBJ-1", "patientNumber": "OBJ-2"}` registered OBJ-2 (the last key won),
    so an EHR or middleware that read the first value believed OBJ-1 objected, and it was delivered. The
    Bundle endpoint refuses duplicate keys; the objection endpoints now too, and take a BOM alike."""
    mine = chain.ehr_api_keys[PROVIDER]
    headers = {**auth(mine), "Content-Type": "application/json"}
    for path in ("/objections", "/objections/$withdraw"):
        for body in (b'{"patientNumber": "OBJ-1", "patientNumber": "OBJ-2"}',
                     b'{"patientNumber": "OBJ-5", "registry": "%s", "registry": "*"}' % REGISTRY.encode()):
            response = httpx.post(f"{chain.gateway_url}{path}", content=body, headers=headers, timeout=30)
            assert response.status_code == 400 and "duplicate" in response.text, (path, response.text)
            assert "OBJ-" not in response.text
    bom = b"\xef\xbb\xbf" + b'{"patientNumber": "OBJ-6", "registry": "%s"}' % REGISTRY.encode()
    for path in ("/objections", "/objections/$withdraw"):
        response = httpx.post(f"{chain.gateway_url}{path}", content=bom, headers=headers, timeout=30)
        assert response.status_code == 204, (path, response.text)


# --- request ids and metrics ------------------------------------------------------------------------------

def test_every_answer_carries_a_request_id(chain: Any) -> None:
    seen = set()
    for method, _, path in routes(chain):
        for headers in ({}, auth(chain.ehr_api_key), auth(chain.admin_api_key)):
            response = call(chain, method, path, headers)
            rid = response.headers.get("x-request-id")
            assert rid and re.fullmatch(r"[0-9a-f]{32}", rid), (method, path, response.status_code)
            seen.add(rid)
    for method, path in (("GET", "/no/such/route"), ("DELETE", "/deliveries"), ("PUT", "/metadata")):
        response = call(chain, method, path)
        assert response.status_code in (404, 405) and response.headers.get("x-request-id")
        assert response.json()["resourceType"] == "OperationOutcome"
    assert len(seen) > 20  # fresh per request


def test_an_unexpected_error_is_a_500_with_a_request_id_and_no_exception_text(
        chain: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 500 path too: a fixed OperationOutcome, the request id on the answer and on the error's log line
    (so an operator can find it), never the exception's text (which may quote input values)."""
    import logging

    from gateway.service.logs import JsonFormatter

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("store exploded while reading P0001234 / 111222333")

    monkeypatch.setattr(chain.runtime.store, "list_deliveries", broken)
    lines: list[str] = []
    handler = logging.Handler()
    handler.setFormatter(JsonFormatter())
    handler.emit = lambda record: lines.append(handler.format(record))  # type: ignore[method-assign]
    logger = logging.getLogger("gateway.service")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    try:
        response = call(chain, "GET", "/deliveries", auth(chain.ehr_api_key))
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 500
    assert response.json()["issue"][0]["code"] == "exception"
    assert "P0001234" not in response.text and "111222333" not in response.text
    rid = response.headers.get("x-request-id")
    assert rid
    errors = [json.loads(line) for line in lines if '"unexpected error"' in line]
    assert errors and errors[0]["request_id"] == rid and errors[0]["exc_type"] == "RuntimeError"
    assert not [line for line in lines if "P0001234" in line or "111222333" in line]


def test_metric_labels_hold_no_patient_data(chain: Any) -> None:
    for example in sorted(EXAMPLES.glob("*.json")):
        post_bundle(chain, chain.ehr_api_key, f"metrics-{example.name}", example.read_bytes())
    text = call(chain, "GET", "/metrics", auth(chain.admin_api_key)).text
    values = {v for e in EXAMPLES.glob("*.json") for _, v in identifying_values(json.loads(e.read_text()))}
    label_names, label_values = set(), set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label_names |= set(sample.labels)
            label_values |= set(sample.labels.values())
    assert not label_names & {"patient", "bsn", "mrn", "name", "id", "identifier", "delivery", "client"}, \
        label_names
    # label values are registry names, pseudonym types and a small vocabulary of outcomes/statuses/actions,
    # or histogram bounds: short words, never free text, numbers of patient size or ids
    vocabulary = re.compile(r"[A-Za-z][A-Za-z0-9_:-]{0,40}|\+Inf|[0-9.]+(e[+-][0-9]+)?")
    assert all(vocabulary.fullmatch(v) for v in label_values), label_values
    assert not [v for v in label_values if re.search(r"[0-9a-f]{16}|[0-9]{9}", v)], label_values  # ids, BSNs
    assert not label_values & values
    assert [v for v in values if v in text] == []


# --- mTLS subject header: only from a trusted proxy --------------------------------------------------------

def _configure(chain: Any, trusted: list[str]) -> None:
    config = yaml.safe_load(chain.config_path.read_text())
    config["clients"] = [c for c in config["clients"] if c["id"] != "ehr-mtls"] + [
        {"id": "ehr-mtls", "provider": PROVIDER, "mtls_subject": MTLS_SUBJECT, "registries": [REGISTRY]}]
    config["trusted_proxies"] = trusted
    chain.config_path.write_text(yaml.safe_dump(config))


def test_mtls_subject_header_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    subject = {"x-client-cert-subject": MTLS_SUBJECT}
    with process_chain(tmp_path) as pc:
        _configure(pc, [])  # nobody may set the header
        gw = pc.start_gateway()
        assert httpx.get(f"{gw.url}/deliveries", headers=subject).status_code == 401
        gw.kill()

        _configure(pc, ["127.0.0.1/32"])  # the proxy in front of the gateway runs on this host
        gw = pc.start_gateway()
        assert httpx.get(f"{gw.url}/deliveries", headers=subject).status_code == 200
        other = {"x-client-cert-subject": MTLS_SUBJECT.replace("ehr-mtls", "ehr-other")}
        assert httpx.get(f"{gw.url}/deliveries", headers=other).status_code == 401
        assert httpx.get(f"{gw.url}/admin/audit", headers=subject).status_code == 403  # an EHR, not an admin
        response = httpx.post(f"{gw.url}/registries/{REGISTRY}/Bundle", content=BUNDLE.read_bytes(),
                              headers={**FHIR, **subject}, timeout=60)
        assert response.status_code == 200, response.text
        # a key, when presented, decides: a wrong key is not rescued by a trusted subject header
        assert httpx.get(f"{gw.url}/deliveries", headers={**subject, **auth("wrong")}).status_code == 401
        # a re-probe: a subject of one client and the key of another authenticated as the key's, silently
        both = {**subject, **auth(pc.ehr_api_key)}
        assert httpx.get(f"{gw.url}/deliveries", headers=both).status_code == 401
        assert httpx.get(f"{gw.url}/deliveries", headers=auth(pc.ehr_api_key)).status_code == 200


def test_x_forwarded_for_cannot_make_a_caller_a_trusted_proxy(tmp_path: Path) -> None:
    subject = {"x-client-cert-subject": MTLS_SUBJECT}
    with process_chain(tmp_path) as pc:
        _configure(pc, ["10.9.9.9/32"])  # trust a proxy elsewhere, not this host
        gw = pc.start_gateway()
        assert httpx.get(f"{gw.url}/deliveries", headers=subject).status_code == 401
        spoofed = httpx.get(f"{gw.url}/deliveries", headers={**subject, "X-Forwarded-For": "10.9.9.9"})
        assert spoofed.status_code == 401, "X-Forwarded-For made a loopback caller a trusted proxy"


# --- outbound TLS is verified -----------------------------------------------------------------------------

def _accepting_app() -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def receive(request: Request) -> Response:
        await request.body()
        return Response(b'{"resourceType": "Bundle", "type": "transaction-response"}', status_code=200,
                        media_type="application/fhir+json")

    return app


def test_registry_client_verifies_the_registry_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls")

    async def deliver(base: str, verify: bool | str) -> Any:
        async with RegistryClient(base + "/", verify=verify, timeout=5) as client:
            return await client.deliver(b'{"resourceType": "Bundle"}')

    with serve_https(_accepting_app(), cert, key) as base:
        untrusted = asyncio.run(deliver(base, True))  # system CAs only: the self-signed server is refused
        assert not untrusted.ok and untrusted.status is None
        trusted = asyncio.run(deliver(base, str(cert)))  # the configured CA bundle (RegistryConfig.ca_bundle)
        assert trusted.ok and trusted.status == 200


def test_registry_client_checks_the_host_name_not_only_the_chain(tmp_path: Path) -> None:
    # a certificate the CA bundle trusts, but issued to another name than the one connected to
    cert, key = self_signed(tmp_path / "tls", common_name="registry.example", dns_name="registry.example")

    async def deliver(base: str) -> Any:
        async with RegistryClient(base + "/", verify=str(cert), timeout=5) as client:
            return await client.deliver(b'{"resourceType": "Bundle"}')

    with serve_https(_accepting_app(), cert, key) as base:
        wrong_name = asyncio.run(deliver(base))
        assert not wrong_name.ok and wrong_name.status is None


def test_ttp_client_verifies_the_ttp_certificate(tmp_path: Path) -> None:
    from gateway.ttp.backend import TTPUnavailable
    from gateway.ttp.client import HttpTTPClient

    cert, key = self_signed(tmp_path / "tls")
    app = FastAPI()

    @app.get("/metadata")
    async def metadata() -> dict[str, str]:
        return {"resourceType": "CapabilityStatement"}

    async def probe(base: str, verify: bool | str) -> None:
        client = HttpTTPClient(base, "key", verify=verify, timeout=5, retries=0)
        try:
            await client.probe()
        finally:
            await client.aclose()

    with serve_https(app, cert, key) as base:
        with pytest.raises(TTPUnavailable):
            asyncio.run(probe(base, True))
        asyncio.run(probe(base, str(cert)))


def test_runtime_passes_the_configured_ca_bundle_to_each_forwarder(tmp_path: Path) -> None:
    import ssl

    with embedded_chain(tmp_path, [REGISTRY], run_worker=False) as c:
        ctx = c.runtime.forwarders[REGISTRY]._http._transport._pool._ssl_context  # white-box, as test_forward
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


# --- key files readable by others are refused at start-up -------------------------------------------------

def _start_and_fail(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**env, "COLUMNS": "400"}  # rich wraps at 80 columns without a terminal; an operator's log does not
    try:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process started (and kept running) with a key file readable by others")


def _one_clear_line(run: subprocess.CompletedProcess, path: Path) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout[-1000:], run.stderr[-1000:])
    text = (run.stdout + run.stderr).strip()
    assert "Traceback" not in text
    assert str(path) in text and "chmod 600" in text, text
    assert len(text.splitlines()) == 1, text


def test_gateway_key_file_wider_than_0600_is_refused(tmp_path: Path) -> None:
    with process_chain(tmp_path) as pc:
        key_files = sorted((tmp_path / "keys").glob("*.hex"))
        # the source key, the provider's MRN key and the gateway secret: each one refused on its own
        assert {p.name.split("-")[0] for p in key_files} >= {"source", "provider", "gateway"}, key_files
        for n, key_file in enumerate(key_files):
            key_file.chmod((0o640, 0o604, 0o644)[n % 3])
            env = {**pc.env, "FHIR_GATEWAY_PORT": str(free_port())}
            run = _start_and_fail(["serve", "--config", str(pc.config_path)], env, tmp_path)
            _one_clear_line(run, key_file)
            key_file.chmod(0o600)


def test_ttp_key_file_wider_than_0600_is_refused(tmp_path: Path) -> None:
    from gateway.ttp.keystore import init_keys

    init_keys(tmp_path / "ttp-keys", [REGISTRY])
    master = next((tmp_path / "ttp-keys").glob("master*"))
    master.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_TTP")}
    args = ["ttp", "serve", "--key-dir", str(tmp_path / "ttp-keys"), "--port", str(free_port())]
    run = _start_and_fail(args, env, tmp_path)
    _one_clear_line(run, master)


def test_serve_speaks_https_with_the_configured_certificate(tmp_path: Path) -> None:
    """A probe: `serve` had no TLS options, and said nothing when it listened beyond loopback in plain HTTP
    (API keys and Bundles with patient data readable on the network without a proxy in front)."""
    cert, key = self_signed(tmp_path / "tls")
    with process_chain(tmp_path / "chain") as pc:
        port = free_port()
        env = {**pc.env, "FHIR_GATEWAY_PORT": str(port), "FHIR_GATEWAY_TLS_CERTFILE": str(cert),
               "FHIR_GATEWAY_TLS_KEYFILE": str(key)}
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(pc.config_path)]
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            trust = ssl.create_default_context(cafile=str(cert))
            deadline, answer = time.monotonic() + 30, None
            while answer is None and time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    answer = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trust, timeout=1)
                time.sleep(0.1)
            assert answer is not None and answer.status_code == 200
            with pytest.raises(httpx.TransportError):  # no plain HTTP beside it
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        half = {k: v for k, v in env.items() if k != "FHIR_GATEWAY_TLS_KEYFILE"}
        run = _start_and_fail(["serve", "--config", str(pc.config_path)], half, tmp_path)
        assert run.returncode == 2 and "set both or neither" in run.stdout + run.stderr
        # a key that is not the certificate's (a re-probe: a 108-line traceback and exit 1)
        _, other_key = self_signed(tmp_path / "other")
        mismatched = {**env, "FHIR_GATEWAY_TLS_KEYFILE": str(other_key)}
        run = _start_and_fail(["serve", "--config", str(pc.config_path)], mismatched, tmp_path)
        said = run.stdout + run.stderr
        assert run.returncode == 2 and "cannot be used together" in said and "Traceback" not in said


def test_serve_warns_when_it_listens_beyond_loopback_in_plain_http(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.cli import _tls_files

    with caplog.at_level("WARNING", logger="gateway"):
        assert _tls_files(None, None, "127.0.0.1") == {} and _tls_files(None, None, "localhost") == {}
        assert caplog.records == []
        assert _tls_files(None, None, "0.0.0.0") == {}
    assert "plain HTTP on 0.0.0.0" in caplog.text and "FHIR_GATEWAY_TLS_CERTFILE" in caplog.text


def test_requests_that_could_not_do_what_they_seem_to_are_refused(chain: Any) -> None:
    """A probe: an objection under free text (a name and a BSN as the "patient number") or a number sent
    as a JSON number was accepted or misreported, extra fields were silently ignored; a status filter of
    garbage listed nothing; a gzip body was refused as "UTF-16"."""
    mine = chain.ehr_api_keys[PROVIDER]
    for body, status in [
        ({"patientNumber": "Jan Jansen 999911120 Dorpsstraat 1", "registry": REGISTRY}, 400),
        ({"patientNumber": 1234567, "registry": REGISTRY}, 400),
        ({"patientNumber": "P0001234", "name": "Jan Jansen", "registry": REGISTRY}, 400),
        ({"registry": REGISTRY}, 400),
    ]:
        response = httpx.post(f"{chain.gateway_url}/objections", json=body, headers=auth(mine), timeout=30)
        assert response.status_code == status, (body, response.text)
        assert "Jansen" not in response.text and "999911120" not in response.text
    listed = call(chain, "GET", "/deliveries?status=Jansen", auth(mine))
    assert listed.status_code == 400 and "Jansen" not in listed.text
    gzipped = httpx.post(
        f"{chain.gateway_url}/registries/{REGISTRY}/Bundle",
        content=gzip.compress(b'{"resourceType": "Bundle"}'),
        headers={**auth(mine), "Content-Type": "application/fhir+json", "Content-Encoding": "gzip"},
        timeout=30,
    )
    assert gzipped.status_code == 415 and "Content-Encoding" in gzipped.text


def test_a_bundle_the_leak_gate_stops_is_in_the_audit_trail_and_the_metrics(chain: Any) -> None:
    """A probe of the privacy officer's side: a 422 "direct identifier left after de-identification" left no
    trace but the EHR's answer; a near miss could not be seen, let alone counted."""
    mine = chain.ehr_api_keys[PROVIDER]
    bundle = json.loads(BUNDLE.read_bytes())
    resources = [e["resource"] for e in bundle["entry"]]
    observation = next(r for r in resources if r["resourceType"] == "Observation")
    observation["valueQuantity"]["unit"] = "Johanna van Putten"  # vector-1's own name, where a unit goes
    stopped = post_bundle(chain, mine, "leak-gate-audit", json.dumps(bundle).encode())
    assert stopped.status_code == 422 and stopped.json()["issue"][0]["code"] == "security", stopped.text
    audit = httpx.get(f"{chain.gateway_url}/admin/audit", params={"limit": 10000},
                      headers=auth(chain.admin_api_key), timeout=30)
    refused = [e for e in audit.json() if e["event"] == "refused"]
    assert refused[-1]["outcome"] == "422-security" and refused[-1]["registry"] == REGISTRY
    assert "Putten" not in audit.text
    metrics = httpx.get(f"{chain.gateway_url}/metrics", headers=auth(chain.admin_api_key), timeout=30)
    assert 'gateway_bundles_total{outcome="refused"}' in metrics.text
    # refused while being read, too: a duplicate key (a re-probe saw no trace of it)
    twice = b'{"resourceType": "Bundle", "type": "transaction", "type": "collection", "entry": []}'
    assert post_bundle(chain, mine, "leak-gate-audit-2", twice).status_code == 400
    audit = httpx.get(f"{chain.gateway_url}/admin/audit", params={"limit": 10000},
                      headers=auth(chain.admin_api_key), timeout=30)
    assert [e for e in audit.json() if e["event"] == "refused"][-1]["outcome"] == "400-structure"


def test_an_audit_page_beyond_any_id_is_a_4xx(chain: Any) -> None:
    """Schemathesis: `after` beyond 64 bits reached the store, which cannot hold it: a 500."""
    for after in ("-32086546850332529116839936", str(2**63), "-1"):
        response = call(chain, "GET", f"/admin/audit?after={after}", auth(chain.admin_api_key))
        assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome", after
    assert call(chain, "GET", "/admin/audit?after=0", auth(chain.admin_api_key)).status_code == 200


def test_one_hospital_cannot_take_every_intake_slot(chain: Any) -> None:
    """A probe: one hospital's client held all 64 in-flight slots with bodies trickled a byte at a time,
    and every post of the other hospital was 429 for minutes. Where several providers share a gateway, one
    holds at most half of FHIR_GATEWAY_MAX_INFLIGHT_BUNDLES (FHIR_GATEWAY_MAX_INFLIGHT_PER_PROVIDER)."""
    import socket
    from urllib.parse import urlsplit

    settings = chain.runtime.settings
    saved = settings.max_inflight_bundles
    settings.max_inflight_bundles = 4
    url = urlsplit(chain.gateway_url)
    mine, theirs = chain.ehr_api_keys[PROVIDER], chain.ehr_api_keys[OTHER]
    head = (f"POST /registries/{REGISTRY}/Bundle HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {mine}\r\n"
            "Content-Type: application/fhir+json\r\nContent-Length: 100000\r\n\r\n{").encode()
    stalled = []
    try:
        for _ in range(2):  # half of 4: each holds a slot while its body trickles in
            sock = socket.create_connection((url.hostname, url.port))
            sock.sendall(head)
            stalled.append(sock)
        deadline = time.monotonic() + 10
        while True:  # until the two stalled posts hold their slots, a third of mine is refused
            third = post_bundle(chain, mine, f"third-{time.monotonic()}")
            if third.status_code == 429:
                break
            assert time.monotonic() < deadline, third.status_code
        assert "Retry-After" in third.headers
        other = post_bundle(chain, theirs, "the-other-hospital")
        assert other.status_code == 200, other.text
    finally:
        settings.max_inflight_bundles = saved
        for sock in stalled:
            sock.close()


def test_a_client_sees_and_requeues_only_the_deliveries_of_its_own_registries(chain: Any) -> None:
    """A probe: a client allowed one registry listed, and requeued, its hospital's deliveries to another
    (a dead letter sent again to a registry that client may not deliver to)."""
    theirs = chain.ehr_api_keys[OTHER]  # this hospital's client may deliver to REGISTRY only
    elsewhere = "example-cancer-registry"
    delivery_id, _ = chain.runtime.store.enqueue(provider=OTHER, registry=elsewhere, payload=b"{}",
                                                 client="another-client-of-that-hospital")
    deadline = time.monotonic() + 30
    while chain.runtime.store.get(delivery_id).status != "dead":  # the registry refuses `{}`: a dead letter
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listed = call(chain, "GET", "/deliveries?limit=1000", auth(theirs))
    assert listed.status_code == 200 and delivery_id not in listed.text
    assert call(chain, "GET", f"/deliveries?registry={elsewhere}", auth(theirs)).status_code == 403
    assert call(chain, "GET", f"/deliveries/{delivery_id}", auth(theirs)).status_code == 404
    assert call(chain, "POST", f"/deliveries/{delivery_id}/$requeue", auth(theirs)).status_code == 404
    assert chain.runtime.store.get(delivery_id).status == "dead"


def test_a_client_records_objections_only_for_the_registries_it_may_deliver_to(chain: Any) -> None:
    """A re-probe: a client allowed one registry withdrew another client's objection for another registry,
    and that patient's data went to a registry the first client may not deliver to."""
    theirs = chain.ehr_api_keys[OTHER]  # may deliver to REGISTRY only
    for path in ("/objections", "/objections/$withdraw"):
        for registry in ("example-cancer-registry", "*"):
            body = {"patientNumber": "Q1", "registry": registry}
            response = httpx.post(f"{chain.gateway_url}{path}", json=body, headers=auth(theirs), timeout=30)
            assert response.status_code == 403, (path, registry, response.text)
    body = {"patientNumber": "Q1", "registry": REGISTRY}
    assert httpx.post(f"{chain.gateway_url}/objections", json=body, headers=auth(theirs)).status_code == 204
    assert httpx.post(f"{chain.gateway_url}/objections/$withdraw", json=body,
                      headers=auth(theirs)).status_code == 204
