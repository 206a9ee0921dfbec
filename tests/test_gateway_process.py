"""The gateway as an operator runs it: `fhir-gateway serve --config gateway.yaml` in its own process."""

from __future__ import annotations

import json
import shutil
import signal
import uuid
from pathlib import Path

import httpx

from tests.processes import process_chain

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_serve_delivers_and_logs_json_with_request_ids(tmp_path):
    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway(log_level="DEBUG")
        body = (EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes()
        response = httpx.post(
            f"{gw.url}/registries/example-generic/Bundle",
            content=body,
            timeout=60,
            headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"},
        )
        assert response.status_code == 200, response.text
        request_id = response.headers["X-Request-ID"]
        gw.kill(signal.SIGTERM)  # graceful: finishes in-flight work, then exits
        assert gw.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
        lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
        assert any(line["msg"].startswith("gateway stopped") for line in lines)
        assert any(line.get("request_id") == request_id for line in lines)
        assert httpx.get(f"{chain.receiver_url}/").json()["bundles"] == 1


def test_start_up_fails_with_one_clear_line_on_a_bad_config(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "gateway.yaml"
    bad.write_text(
        "providers: []\n"
        "registries: {x: {profile: nope, endpoint: 'http://127.0.0.1:9'}}\n"
        "ttp: {url: embedded}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"FHIR_GATEWAY_KEY_DIR": str(tmp_path / "k"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") <= 2


def test_outgoing_urls_are_not_logged_even_at_debug():
    """httpx logs each request URL at INFO; an EHR Consent search URL carries the patient's id."""
    import io
    import logging

    import httpx as httpx_module

    from gateway.service.logs import configure

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure("DEBUG", stream=stream)
    try:
        # a stand-in transport: only the logging is under test, no network is needed
        transport = httpx_module.MockTransport(lambda request: httpx_module.Response(200))
        with httpx_module.Client(transport=transport) as client:
            client.get("http://ehr.invalid/Consent", params={"patient": "Patient/P0001234"})
        logging.getLogger("gateway.test").info("marker")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    text = stream.getvalue()
    assert "marker" in text  # the handler works: the absence below means something
    assert "P0001234" not in text


def test_mrn_reveal_command_at_the_hospital(tmp_path):
    """`fhir-gateway mrn-reveal` with the hospital configuration turns fed-back MRN pseudonyms to numbers."""
    import subprocess
    import sys

    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway()
        body = (EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes()
        response = httpx.post(
            f"{gw.url}/registries/example-generic/Bundle",
            content=body,
            timeout=60,
            headers={"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"},
        )
        assert response.status_code == 200, response.text
        values = []
        for receipt in httpx.get(f"{chain.receiver_url}/deliveries").json():
            bundle = httpx.get(f"{chain.receiver_url}/Bundle/{receipt['id']}").json()
            values += [
                i["value"]
                for e in bundle["entry"]
                if e["resource"]["resourceType"] == "Patient"
                for i in e["resource"]["identifier"]
                if i["system"].endswith(":MRN")
            ]
        assert len(values) == 4
        def reveal(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "gateway.cli", "mrn-reveal", *args, "-c", str(chain.config_path)],
                capture_output=True,
                text=True,
                env=chain.env,
                cwd=tmp_path,
                timeout=60,
            )

        out = reveal(*values, "--registry", "example-generic")
        assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
        assert sorted(line.split("\t")[1] for line in out.stdout.splitlines() if "\t" in line) == [
            "H-778899",
            "P0001234",
            "X42",
            "Z1",
        ]
        # a probe: re-identification left no trace in the audit trail; now one event, counts only
        admin = {"Authorization": f"Bearer {chain.admin_api_key}"}
        events = httpx.get(f"{gw.url}/admin/audit", headers=admin, timeout=30).json()
        (revealed,) = [e for e in events if e["event"] == "mrn-revealed"]
        assert (revealed["actor"], revealed["outcome"], revealed["counts"]) == (
            "cli:mrn-reveal",
            "revealed",
            {"asked": 4, "revealed": 4},
        )
        assert "P0001234" not in str(events)
        # a probe: an unknown registry ended in a TTPRejected traceback
        unknown = reveal(values[0], "--registry", "nope")
        assert unknown.returncode == 2 and "unknown registry 'nope'" in unknown.stderr, unknown.stderr
        assert "Traceback" not in unknown.stderr
        # a re-probe: only the first provider's numbers could be revealed; --provider names whose
        mine = reveal(*values, "--registry", "example-generic", "--provider", "ura:00000000")
        assert mine.returncode == 0 and "P0001234" in mine.stdout, mine.stderr
        other = reveal(values[0], "--registry", "example-generic", "--provider", "ura:99999999")
        assert other.returncode == 2 and "unknown provider" in other.stderr


def test_a_synchronous_post_is_forwarded_at_once_not_at_the_next_outbox_poll(tmp_path):
    """The outbox worker is woken by the commit: with an hour between polls, a synchronous post is still
    answered 200 'delivered' (a poll-only worker would leave it queued, and the EHR would get 202)."""
    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway(extra_env={"FHIR_GATEWAY_WORKER_POLL_SECONDS": "3600"})
        bundle = json.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes())
        headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"}
        for n in range(3):
            bundle["identifier"] = {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
            response = httpx.post(
                f"{gw.url}/registries/example-generic/Bundle",
                content=json.dumps(bundle),
                headers=headers,
                timeout=60,
            )
            assert response.status_code == 200, (n, response.status_code, response.text[:300])
        assert httpx.get(f"{chain.receiver_url}/").json()["bundles"] == 3


def test_a_later_bundle_refers_to_a_resource_of_an_earlier_delivery_when_the_profile_asks(tmp_path):
    """`references.outside_bundle: opaque-id`: an Observation posted on its own keeps its link to the
    Encounter that an earlier delivery carried, because both sides get the same opaque id."""
    import shutil

    import yaml

    profiles = tmp_path / "profiles"
    shutil.copytree(EXAMPLES.parent / "profiles", profiles)
    generic = yaml.safe_load((profiles / "example-generic.yaml").read_text())
    generic["references"] = {"unresolved": "drop", "outside_bundle": "opaque-id"}
    (profiles / "example-generic.yaml").write_text(yaml.safe_dump(generic))
    source = json.loads((EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_text())
    patient_entry = source["entry"][0]
    assert patient_entry["resource"]["resourceType"] == "Patient"
    patient_ref = f"Patient/{patient_entry['resource']['id']}"
    encounter = {
        "resourceType": "Encounter",
        "id": "enc-earlier-1",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": patient_ref},
    }
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient_ref},
        "encounter": {"reference": "Encounter/enc-earlier-1"},
    }

    def transaction(resource: dict) -> bytes:
        entry = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": {"method": "POST"}}
        entry["request"]["url"] = resource["resourceType"]
        return json.dumps(
            {"resourceType": "Bundle", "type": "transaction", "entry": [patient_entry, entry]}
        ).encode()

    with process_chain(tmp_path, profiles_dir=profiles) as chain:
        gw = chain.start_gateway()
        headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"}
        for body in (transaction(encounter), transaction(observation)):
            response = httpx.post(
                f"{gw.url}/registries/example-generic/Bundle", content=body, headers=headers
            )
            assert response.status_code == 200, response.text
        received = [
            e["resource"]
            for receipt in httpx.get(f"{chain.receiver_url}/deliveries").json()
            for e in httpx.get(f"{chain.receiver_url}/Bundle/{receipt['id']}").json()["entry"]
        ]
    (delivered_encounter,) = [r for r in received if r["resourceType"] == "Encounter"]
    (delivered_observation,) = [r for r in received if r["resourceType"] == "Observation"]
    assert delivered_observation["encounter"] == {"reference": f"Encounter/{delivered_encounter['id']}"}
    assert "enc-earlier-1" not in json.dumps(received)


def test_the_go_live_check_asks_every_party_and_names_the_one_that_fails(tmp_path):
    import subprocess
    import sys

    import yaml

    from gateway.serving import free_port

    def check(config: Path, env: dict) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            env={**env, "COLUMNS": "200"},
            cwd=tmp_path,
            timeout=60,
        )

    with process_chain(tmp_path) as chain:
        good = check(chain.config_path, chain.env)
        assert good.returncode == 0, good.stdout + good.stderr
        assert good.stdout.count("ok") >= 4  # configuration, store, TTP, registry
        broken = yaml.safe_load(chain.config_path.read_text())
        broken["registries"]["example-generic"]["endpoint"] = f"http://127.0.0.1:{free_port()}/fhir"
        (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
        bad = check(tmp_path / "broken.yaml", chain.env)
        assert bad.returncode == 1
        line = next(x for x in bad.stdout.splitlines() if "registry example-generic" in x)
        assert "not reachable" in line
        wrong_key = check(chain.config_path, {**chain.env, "TEST_TTP_KEY": "not-the-key"})
        assert wrong_key.returncode == 1  # the probe needs no key; the pseudonym of random bytes does
        line = next(x for x in wrong_key.stdout.splitlines() if "a pseudonym in domain example-generic" in x)
        assert "refused us" in line and "not-the-key" not in wrong_key.stdout
        assert "TTP API key" in " ".join(wrong_key.stdout.split())  # what to look at (a probe's operator)
        # found by a fresh-eyes operator: an unset key was reported as "TTP not reachable"
        no_key = check(chain.config_path, {k: v for k, v in chain.env.items() if k != "TEST_TTP_KEY"})
        assert no_key.returncode == 2 and "environment variable TEST_TTP_KEY is not set" in no_key.stderr
        # ... and a configuration without a ttp section passed with the in-process TTP, keys and all
        embedded = yaml.safe_load(chain.config_path.read_text())
        embedded.pop("ttp", None)
        (tmp_path / "embedded.yaml").write_text(yaml.safe_dump(embedded))
        warned = check(tmp_path / "embedded.yaml", chain.env)
        assert warned.returncode == 1
        line = next(x for x in warned.stdout.splitlines() if "TTP for ura:00000000" in x)
        assert "for the demo and tests only" in line
        keys = Path(chain.env["FHIR_GATEWAY_KEY_DIR"])
        shutil.copytree(keys, tmp_path / "elsewhere" / keys.name)  # no TTP keys beside them
        elsewhere = {**chain.env, "FHIR_GATEWAY_KEY_DIR": str(tmp_path / "elsewhere" / keys.name)}
        refused = check(tmp_path / "embedded.yaml", elsewhere)
        assert refused.returncode == 2 and "for the demo and tests only" in refused.stderr
        assert "ttp keys init" not in refused.stderr  # a hospital must not make the TTP's keys itself
        # a probe: "bearer auth needs a token" named neither the registry nor the variable to set
        # a probe: a source key that `keys init` made at random links to no other provider's pseudonyms
        for blank in ("", "   "):  # a re-probe: a blank value passed as verified
            unverified = check(chain.config_path, {**chain.env, "FHIR_GATEWAY_SOURCE_KEY_CHECK": blank})
            assert unverified.returncode == 1
            line = next(x for x in unverified.stdout.splitlines() if "source key v1" in x)
            assert "not verified" in line
        other = check(chain.config_path, {**chain.env, "FHIR_GATEWAY_SOURCE_KEY_CHECK": "0123456789abcdef"})
        assert other.returncode == 2 and "is not the ecosystem's" in other.stderr, other.stderr
        # ... and a registry asking MRN pseudonyms of a provider without a patient-number system got none
        no_mrn = yaml.safe_load(chain.config_path.read_text())
        no_mrn["providers"][0].pop("mrn_system", None)
        (tmp_path / "no-mrn.yaml").write_text(yaml.safe_dump(no_mrn))
        unnumbered = check(tmp_path / "no-mrn.yaml", chain.env)
        assert unnumbered.returncode == 1
        line = next(x for x in unnumbered.stdout.splitlines() if "MRN pseudonyms of" in x)
        assert "no mrn_system" in line
        bearer = yaml.safe_load(chain.config_path.read_text())
        bearer["registries"]["example-generic"]["auth"] = {"type": "bearer", "token_env": "HART_TOKEN"}
        (tmp_path / "bearer.yaml").write_text(yaml.safe_dump(bearer))
        untokened = check(tmp_path / "bearer.yaml", chain.env)
        assert untokened.returncode == 2, untokened.stdout + untokened.stderr
        assert "registries.example-generic.auth" in untokened.stderr and "set HART_TOKEN" in untokened.stderr


def test_the_go_live_check_finds_a_wrong_registry_token_where_metadata_is_open(tmp_path):
    """FHIR servers answer GET /metadata without credentials (SMART asks it), so the check that asked only
    that passed with a wrong token, and the first delivery was refused (a session's known limit). It now
    also reads a Bundle that does not exist with the gateway's credentials: 401 is a wrong token."""
    import subprocess
    import sys

    import yaml

    from gateway.receiver.app import create_receiver_app
    from tests.servers import serve

    with (
        process_chain(tmp_path) as chain,
        serve(create_receiver_app(tmp_path / "guarded", token="the-right-token")) as guarded,
    ):
        config = yaml.safe_load(chain.config_path.read_text())
        config["registries"]["example-generic"]["endpoint"] = guarded
        config["registries"]["example-generic"]["auth"] = {"type": "bearer", "token_env": "HART_TOKEN"}
        (tmp_path / "guarded.yaml").write_text(yaml.safe_dump(config))

        def check(token: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "gateway.cli", "check", "--config", str(tmp_path / "guarded.yaml")],
                capture_output=True, text=True, env={**chain.env, "HART_TOKEN": token, "COLUMNS": "200"},
                cwd=tmp_path, timeout=60,
            )  # fmt: skip

        assert httpx.get(f"{guarded}/metadata").status_code == 200  # open, as FHIR servers have it
        wrong = check("a-wrong-token")
        assert wrong.returncode == 1, wrong.stdout + wrong.stderr
        line = next(x for x in wrong.stdout.splitlines() if "registry example-generic" in x)
        assert "refused our credentials" in line and "a-wrong-token" not in wrong.stdout
        right = check("the-right-token")
        assert right.returncode == 0, right.stdout + right.stderr
        token = {"Authorization": "Bearer the-right-token"}
        assert httpx.get(f"{guarded}/deliveries", headers=token).json() == []  # the check wrote nothing
        assert httpx.get(f"{guarded}/deliveries").status_code == 401  # the registry's data: not open


def test_a_registry_the_ttp_has_no_domain_for_stops_the_start_naming_it(tmp_path):
    """It used to start, answer 503 'transient' for that registry forever and log no reason. Now start-up
    asks a pseudonym of random bytes in every registry's domain (as `fhir-gateway check` does)."""
    import subprocess
    import sys

    import pytest
    import yaml

    with process_chain(tmp_path) as chain:
        config = yaml.safe_load(chain.config_path.read_text())
        no_domain = {**config["registries"]["example-generic"], "profile": "example-cancer-registry"}
        config["registries"]["example-cancer-registry"] = no_domain
        chain.config_path.write_text(yaml.safe_dump(config))
        with pytest.raises(RuntimeError) as refused:
            chain.start_gateway()
        assert "exited with 3" in str(refused.value)
        log = chain.gateways[-1].logs() if chain.gateways else str(refused.value)
        assert "unknown target domain (provider ura:00000000, registry example-cancer-registry)" in log
        assert "Traceback" not in log  # one line, as every other start-up failure
        offline = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "deidentify",
                str(EXAMPLES / "01-nictiz-nl-core-transaction.json"),
                "--registry",
                "example-cancer-registry",
                "--config",
                str(chain.config_path),
            ],
            capture_output=True,
            text=True,
            env={**chain.env, "COLUMNS": "200"},
            cwd=tmp_path,
            timeout=120,
        )
        assert offline.returncode == 3, offline.stdout + offline.stderr
        assert "Traceback" not in offline.stderr and "TTP refused (404" in offline.stderr


def test_an_opt_out_source_that_cannot_answer_is_a_503_and_nothing_is_stored(tmp_path):
    """The EHR's Consent search was down: the post was answered 200 `nothing-to-deliver`, its patient
    dropped as opt-out unknown, and the EHR, told it was done, never sent it again (a probe)."""
    from tests.servers import free_port

    options = {"optout": ["register", "bundle-consent", "ehr-consent"],
               "ehr_consent_url": f"http://127.0.0.1:{free_port()}/fhir"}  # nothing listens there
    with process_chain(tmp_path, registry_options=options) as chain:
        gw = chain.start_gateway()
        body = (EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes()
        headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"}
        response = httpx.post(f"{gw.url}/registries/example-generic/Bundle", content=body, headers=headers,
                              timeout=60)
        assert response.status_code == 503, response.text[:300]
        assert int(response.headers["Retry-After"]) > 0
        assert "opt-out" in response.json()["issue"][0]["diagnostics"]
        metrics = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {chain.admin_api_key}"})
        assert 'outcome="optout-unavailable"' in metrics.text
        assert httpx.get(f"{chain.receiver_url}/").json()["bundles"] == 0
        lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
        # the operator sees it in the log too (a TTP outage left only the request line)
        assert any(line["level"] == "WARNING" and "optout-unavailable" in line["msg"] for line in lines)


def test_a_stalled_body_is_refused_and_does_not_lock_other_ehrs_out(tmp_path):
    """64 posts that sent `{` of a promised megabyte and then nothing held every intake slot: every other
    EHR got 429 for as long as they stayed open (a probe)."""
    import socket

    with process_chain(tmp_path) as chain:
        limits = {"FHIR_GATEWAY_MAX_INFLIGHT_BUNDLES": "2", "FHIR_GATEWAY_BODY_IDLE_TIMEOUT_SECONDS": "1"}
        gw = chain.start_gateway(extra_env=limits)
        host, port = gw.url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(2):
            conn = socket.create_connection((host, int(port)))
            conn.sendall(
                b"POST /registries/example-generic/Bundle HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/fhir+json\r\nContent-Length: 1000000\r\n"
                b"Authorization: Bearer " + chain.ehr_api_key.encode() + b"\r\n\r\n{"
            )
            stalled.append(conn)
        try:
            for conn in stalled:
                conn.settimeout(10)
                assert conn.recv(200).startswith(b"HTTP/1.1 408")  # given up after a second of nothing
            body = (EXAMPLES / "02-nlps1-vector-patients-transaction.json").read_bytes()
            auth = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {chain.ehr_api_key}"}
            url = f"{gw.url}/registries/example-generic/Bundle"
            assert httpx.post(url, content=body, headers=auth, timeout=60).status_code == 200
        finally:
            for conn in stalled:
                conn.close()


def test_a_client_that_leaves_mid_body_is_not_logged_as_an_error(tmp_path):
    """Each client that went away mid-upload was logged `ERROR unexpected error` with status 500 (a probe):
    an operator would look for a fault that is not there."""
    import socket
    import time

    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway()
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(
                b"POST /registries/example-generic/Bundle HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/fhir+json\r\nContent-Length: 100000\r\n"
                b"Authorization: Bearer " + chain.ehr_api_key.encode() + b"\r\n\r\n{\"resourceType\""
            )
            time.sleep(0.5)
        time.sleep(1)
        lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
        posts = [line for line in lines if line.get("route") == "/registries/{registry}/Bundle"]
        assert [line["status"] for line in posts] == [499]
        assert not [line for line in lines if line["msg"].startswith("unexpected")]


def test_a_connection_that_sends_no_request_is_closed(tmp_path):
    """A probe held 20,000 sockets open without logging in (nothing sent, or half a header line): uvicorn
    closes an idle connection only after a response, so the gateway ran out of file descriptors and answered
    nobody. A request's headers now have FHIR_GATEWAY_HEADER_TIMEOUT_SECONDS to arrive, on any connection."""
    import contextlib
    import socket
    import time

    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway(extra_env={"FHIR_GATEWAY_HEADER_TIMEOUT_SECONDS": "1"})
        host, port = gw.url.removeprefix("http://").split(":")
        silent = socket.create_connection((host, int(port)))
        partial = socket.create_connection((host, int(port)))
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        kept_alive = socket.create_connection((host, int(port)))  # a request, then half of the next one
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in _whole_response(kept_alive)  # its body too, or a later read would get it
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        # a re-probe: a request whose body is announced and never sent, answered without reading it (a GET, a
        # post refused for its credentials); then one byte now and then held the connection for good
        unread = []
        for head in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
                     b"POST /registries/example-generic/Bundle HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n1\r\n"):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(head)
            assert _whole_response(sock).split(b" ")[1] in (b"200", b"401")
            sock.sendall(b"x")
            unread.append(sock)
        started = time.monotonic()
        for sock in (silent, partial, kept_alive, *unread):
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # closed with unread bytes in its buffer
                assert sock.recv(65536) == b"", "the server closes the connection"
            sock.close()
        assert time.monotonic() - started < 5
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200  # a client that talks is served


def _whole_response(sock) -> bytes:  # noqa: ANN001 - a socket
    """One HTTP response with a Content-Length body, read whole from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_a_malformed_request_uvicorn_refuses_is_answered_with_an_operation_outcome(tmp_path):
    """uvicorn answered a malformed request line or header itself, in plain text ("Invalid HTTP request
    received."): the one refusal an EHR's FHIR client could not read as an OperationOutcome."""
    import socket

    import orjson

    with process_chain(tmp_path) as chain:
        gw = chain.start_gateway()
        host, port = gw.url.removeprefix("http://").split(":")
        for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 999911120\r\n\r\n",
                        b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"POST /registries/x/Bundle HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/fhir+json" in head.lower()
            outcome = orjson.loads(body)
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["code"] == "structure"
            assert b"999911120" not in answer
        assert httpx.get(f"{gw.url}/healthz", timeout=5).status_code == 200
