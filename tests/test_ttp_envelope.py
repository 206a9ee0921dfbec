"""The HPKE envelope over real HTTP: stale and replayed requests refused, bindings enforced, answer sealed."""

import secrets
import time

import httpx
import orjson
import pytest

from gateway.pseudonym import nlps1
from gateway.ttp import envelope
from gateway.ttp.app import create_app
from gateway.ttp.auth import hash_key
from gateway.ttp.testing import TEST_CALLERS, make_test_ttp
from tests.servers import serve

REGISTRY = "registry-example"


@pytest.fixture
def ttp(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY, "registry-other"])
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        yield fixture, base


def _sealed(fixture, originals, *, operation="pseudonymize", target=REGISTRY, now=None):
    public = fixture.keystore.hpke_private.public_key()
    return envelope.seal_request(public, fixture.keystore.key_id, operation, target, originals, now=now)


def _post(base, fixture, params, op="pseudonymize"):
    return httpx.post(f"{base}/${op}", content=orjson.dumps(params), headers=fixture.headers("provider-a"))


def _originals(n=3):
    return [f"B:1:{nlps1.b64u(secrets.token_bytes(32))}" for _ in range(n)]


def test_sealed_round_trip_and_sealed_answer(ttp):
    fixture, base = ttp
    originals = _originals()
    originals.insert(1, "B:1:garbage-value-that-must-not-come-back")
    params, response_key, info = _sealed(fixture, originals)
    r = _post(base, fixture, params)
    assert r.status_code == 200
    assert originals[0].split(":")[2] not in r.text  # neither the pre-pseudonyms ...
    inner = orjson.loads(envelope.open_response(r.json(), response_key, info))
    values = inner["pseudonym"]
    assert inner["error"] == [[1, "invalid-format"]] and values[1] is None
    finals = [v for v in values if v]
    assert all(v.startswith("v1.") for v in finals) and not any(v in r.text for v in finals)  # nor finals
    assert b"garbage" not in envelope.open_response(r.json(), response_key, info)
    with pytest.raises(envelope.EnvelopeError):
        envelope.open_response(r.json(), secrets.token_bytes(32), info)


def test_replayed_request_refused(ttp):
    fixture, base = ttp
    params, _, _ = _sealed(fixture, _originals())
    assert _post(base, fixture, params).status_code == 200
    again = _post(base, fixture, params)
    assert again.status_code == 409 and "replay" in again.json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("age", [301, 3600, -120])
def test_stale_or_future_timestamp_refused(ttp, age):
    fixture, base = ttp
    params, _, _ = _sealed(fixture, _originals(), now=time.time() - age)
    r = _post(base, fixture, params)
    assert r.status_code == 401 and r.json()["issue"][0]["code"] == "security"


def test_bindings(ttp):
    fixture, base = ttp
    # sealed for one registry, sent for another: the info binding makes it fail to open
    params, _, _ = _sealed(fixture, _originals())
    params["parameter"][0]["valueString"] = "registry-other"
    assert _post(base, fixture, params).status_code == 400
    # sealed for translate, sent to pseudonymize
    params, _, _ = _sealed(fixture, _originals(), operation="translate")
    assert _post(base, fixture, params).status_code == 400
    # a tampered timestamp (still fresh) does not open either
    params, _, _ = _sealed(fixture, _originals())
    params["parameter"][2]["valueInstant"] = envelope.utc_timestamp(time.time() - 5)
    assert _post(base, fixture, params).status_code == 400
    # an unknown key id: the client should refetch the public key
    params, _, _ = _sealed(fixture, _originals())
    params["parameter"][3]["valueString"] = "someotherkeyid"
    assert _post(base, fixture, params).status_code == 409
    # garbage ciphertext
    params, _, _ = _sealed(fixture, _originals())
    params["parameter"][5]["valueBase64Binary"] = "!!!"
    assert _post(base, fixture, params).status_code == 400


def test_sealed_only_server_refuses_plain(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY])
    with serve(create_app(fixture.keystore, fixture.auth, allow_plain=False)) as base:
        plain = {"resourceType": "Parameters",
                 "parameter": [{"name": "target", "valueString": REGISTRY},
                               {"name": "original", "valueString": _originals(1)[0]}]}
        r = _post(base, fixture, plain)
        assert r.status_code == 400 and r.json()["issue"][0]["code"] == "security"
        params, _, _ = _sealed(fixture, _originals())
        assert _post(base, fixture, params).status_code == 200


def test_replay_guard_is_bounded():
    guard = envelope.ReplayGuard(max_entries=3, max_age=300)
    now = time.time()
    for i in range(5):
        guard.remember(f"id-{i}", now)
    assert not guard.seen("id-0") and guard.seen("id-4") and len(guard._seen) == 3
    guard.remember("late", now + 1000)  # everything older than the window is dropped
    assert not guard.seen("id-4") and guard.seen("late")
    with pytest.raises(envelope.EnvelopeError):
        guard.check_fresh("2026-01-01T00:00:00", now)  # no time zone


def test_a_replay_to_another_ttp_process_is_refused_with_a_shared_guard(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY])
    params, _, _ = _sealed(fixture, _originals())
    # two TTP instances, each with its own guard object and connection, as two processes on one host
    shared = [envelope.SharedReplayGuard(tmp_path / "replay.db") for _ in range(2)]
    with serve(create_app(fixture.keystore, fixture.auth, replay_guard=shared[0])) as first, \
            serve(create_app(fixture.keystore, fixture.auth, replay_guard=shared[1])) as second:
        assert _post(first, fixture, params).status_code == 200
        again = _post(second, fixture, params)
        assert again.status_code == 409 and "replay" in again.json()["issue"][0]["diagnostics"]
    # the same pair with per-process guards lets the replay through: what the shared guard is for
    params, _, _ = _sealed(fixture, _originals())
    with serve(create_app(fixture.keystore, fixture.auth)) as first, \
            serve(create_app(fixture.keystore, fixture.auth)) as second:
        assert _post(first, fixture, params).status_code == 200
        assert _post(second, fixture, params).status_code == 200
    for guard in shared:
        guard.close()


def test_a_request_id_is_claimed_once_among_racing_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    guards = [envelope.ReplayGuard(), envelope.SharedReplayGuard(tmp_path / "replay.db")]
    for guard in guards:
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(guard.claim, ["racing-request-id-0001"] * 32, [time.time()] * 32))
        assert won.count(True) == 1


def test_the_shared_guard_forgets_ids_past_the_window(tmp_path):
    guard = envelope.SharedReplayGuard(tmp_path / "replay.db", max_age=300, max_skew=60, prune_every=2)
    now = time.time()
    assert guard.claim("old-request-id-00001", now - 1000)
    assert guard.claim("new-request-id-00001", now)  # the second claim prunes
    assert not guard.seen("old-request-id-00001") and guard.seen("new-request-id-00001")
    assert not guard.claim("new-request-id-00001", now)
    guard.close()


def test_two_ttp_serve_processes_sharing_a_replay_db_refuse_a_replay_across_them(tmp_path):
    import subprocess
    import sys

    from gateway.serving import free_port

    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY])
    callers = {"callers": [{"name": n, **c, "key_sha256": hash_key(fixture.api_keys[n])}
                           for n, c in TEST_CALLERS.items()]}
    (tmp_path / "callers.json").write_bytes(orjson.dumps(callers))
    procs, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "ttp", "serve", "--key-dir", str(tmp_path / "keys"),
                 "--api-keys-file", str(tmp_path / "callers.json"), "--port", str(port),
                 "--replay-db", str(tmp_path / "replay.db"), "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/metadata", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "ttp serve did not start"
                time.sleep(0.05)
        params, _, _ = _sealed(fixture, _originals())
        assert _post(urls[0], fixture, params).status_code == 200
        assert _post(urls[1], fixture, params).status_code == 409
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
