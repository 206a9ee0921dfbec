"""TTP keys on disk, callers file, the `ttp` commands (incl. `check` against a live TTP), and log hygiene."""

import json
import logging
import os
import secrets
import stat

import pytest
from typer.testing import CliRunner

from gateway.pseudonym import nlps1
from gateway.ttp import keystore as ks
from gateway.ttp.app import create_app
from gateway.ttp.auth import AuthConfigError, TTPAuth, add_caller, hash_key
from gateway.ttp.commands import app as ttp_cli
from gateway.ttp.testing import make_test_ttp
from tests.servers import serve

runner = CliRunner()


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_files_and_never_overwrites(tmp_path):
    store = ks.init_keys(tmp_path / "k", ["registry-a"])
    for name in (ks.MASTER_FILE, ks.HPKE_FILE, ks.KEYRING_FILE):
        assert _mode(tmp_path / "k" / name) == 0o600
    assert len(bytes.fromhex((tmp_path / "k" / ks.MASTER_FILE).read_text())) == 32
    assert ks.list_domains(store) == {"registry-a": {"current": 1, "retired": []}}
    with pytest.raises(ks.KeyStoreError, match="already exists"):
        ks.init_keys(tmp_path / "k", ["registry-a"])


@pytest.mark.parametrize("name", [ks.MASTER_FILE, ks.HPKE_FILE, ks.KEYRING_FILE])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_loading_refuses_wide_files(tmp_path, name, mode):
    ks.init_keys(tmp_path / "k", ["registry-a"])
    secret = (tmp_path / "k" / name).read_text().strip()
    os.chmod(tmp_path / "k" / name, mode)
    with pytest.raises(ks.KeyStoreError) as err:
        ks.KeyStore.load(tmp_path / "k", env={})
    message = str(err.value)
    assert "\n" not in message and "chmod 600" in message and name in message
    assert secret not in message


def test_environment_alternative(tmp_path):
    ks.init_keys(tmp_path / "k", ["registry-a"])
    master, hpke = secrets.token_bytes(32), secrets.token_bytes(32)
    env = {ks.ENV_MASTER: master.hex(), ks.ENV_HPKE: hpke.hex(),
           ks.ENV_KEYRING: str(tmp_path / "k" / "keyring.json")}
    store = ks.KeyStore.load(tmp_path / "elsewhere", env=env)
    assert store.master == master
    assert store.current_key("registry-a").final("B", bytes(32)) == nlps1.DomainKey.derive(
        master, "registry-a", 1).final("B", bytes(32))
    with pytest.raises(ks.KeyStoreError) as err:
        ks.KeyStore.load(tmp_path / "k", env={ks.ENV_MASTER: "zz" + master.hex()[2:]})
    assert master.hex()[2:] not in str(err.value)
    assert master.hex() not in repr(store) and str(list(master)) not in repr(store)


def test_rotate_retire_persist(tmp_path):
    store = ks.init_keys(tmp_path / "k", ["registry-a"])
    assert store.rotate("registry-a") == 2 and store.rotate("registry-a") == 3
    store.retire("registry-a", 1, force=True)  # at once: no gateway here caches pseudonyms
    with pytest.raises(ks.KeyStoreError):
        store.retire("registry-a", 3)  # never the current one
    again = ks.KeyStore.load(tmp_path / "k", env={})
    assert (again.versions("registry-a").current, again.versions("registry-a").retired) == (3, (1,))
    with pytest.raises(ks.KeyStoreError):
        again.domain_key("registry-a", 1)
    assert again.domain_key("registry-a", 2).version == 2
    assert _mode(tmp_path / "k" / ks.KEYRING_FILE) == 0o600
    with pytest.raises(ks.KeyStoreError):
        again.rotate("unknown")
    (tmp_path / "k" / ks.KEYRING_FILE).write_text('{"domains": {"registry-a": {"current": 0}}}')
    with pytest.raises(ks.KeyStoreError, match="not a valid keyring"):
        ks.KeyStore.load(tmp_path / "k", env={})


def test_callers_file_holds_hashes_only(tmp_path):
    path = tmp_path / "callers.yaml"
    key = add_caller(path, "umc", "provider", provider="ura:00000000")
    reg_key = add_caller(path, "holder", "registry", registries=["registry-a"])
    text = path.read_text()
    assert key not in text and hash_key(key) in text and reg_key not in text
    auth = TTPAuth.from_file(path)
    caller = auth.authenticate({"authorization": f"Bearer {key}"})
    assert caller and caller.provider == "ura:00000000" and caller.may_pseudonymise("anything")
    assert auth.authenticate({"x-api-key": reg_key}).may_translate("registry-a")
    assert auth.authenticate({"authorization": "Bearer nope"}) is None
    assert auth.authenticate({}) is None
    with pytest.raises(AuthConfigError):
        add_caller(path, "umc", "provider", provider="ura:1")
    with pytest.raises(AuthConfigError):
        add_caller(path, "x", "superuser")
    json_path = tmp_path / "callers.json"
    add_caller(json_path, "ops", "admin")
    assert json.loads(json_path.read_text())["callers"][0]["role"] == "admin"


def test_client_certificate_subject_only_from_trusted_proxy():
    entry = {"name": "m", "role": "provider", "provider": "ura:2", "client_subject": "CN=umc"}
    auth = TTPAuth.from_entries([entry], client_subject_header="x-client-subject",
                                trusted_proxies=frozenset({"10.0.0.1"}))
    assert auth.authenticate({"x-client-subject": "CN=umc"}, peer="10.0.0.1").provider == "ura:2"
    assert auth.authenticate({"x-client-subject": "CN=umc"}, peer="10.0.0.2") is None
    assert auth.authenticate({"x-client-subject": "CN=other"}, peer="10.0.0.1") is None


def test_cli_keys_and_callers(tmp_path):
    key_dir = str(tmp_path / "k")
    r = runner.invoke(ttp_cli, ["keys", "init", "--key-dir", key_dir, "--registry", "registry-a"])
    assert r.exit_code == 0, r.output
    master = (tmp_path / "k" / ks.MASTER_FILE).read_text().strip()
    r = runner.invoke(ttp_cli, ["keys", "rotate", "registry-a", "--key-dir", key_dir])
    assert r.exit_code == 0 and "v2" in r.output
    r = runner.invoke(ttp_cli, ["keys", "list", "--key-dir", key_dir])
    assert "registry-a: current v2" in r.output and master not in r.output
    os.chmod(tmp_path / "k" / ks.MASTER_FILE, 0o644)
    r = runner.invoke(ttp_cli, ["keys", "list", "--key-dir", key_dir])
    assert r.exit_code == 2 and master not in r.output
    callers = str(tmp_path / "callers.yaml")
    r = runner.invoke(ttp_cli, ["callers", "add", "umc", "--role", "provider", "--provider", "ura:0",
                                "--file", callers])
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1]
    assert key.startswith("nlps1_") and key not in (tmp_path / "callers.yaml").read_text()
    r = runner.invoke(ttp_cli, ["callers", "list", "--file", callers])
    assert "umc: provider" in r.output and hash_key(key) not in r.output


def test_check_command_against_live_ttp(tmp_path):
    fixture = make_test_ttp(tmp_path / "k", ["registry-example"])
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        r = runner.invoke(ttp_cli, ["check", "--url", base, "--registry", "registry-example"],
                          env={"FHIR_GATEWAY_TTP_API_KEY": fixture.api_keys["provider-a"]})
        assert r.exit_code == 0, r.output
        assert "verdict: TTP usable for registry-example" in r.output
        r = runner.invoke(ttp_cli, ["check", "--url", base, "--api-key", "wrong", "--plain"])
        assert r.exit_code == 1 and "401" in r.output
        r = runner.invoke(ttp_cli, ["check", "--url", base, "--registry", "nope"],
                          env={"FHIR_GATEWAY_TTP_API_KEY": fixture.api_keys["provider-a"]})
        assert r.exit_code == 1 and "does not know" in r.output


def test_no_values_in_logs(tmp_path, caplog):
    import asyncio

    from gateway.pseudonym.types import PrePseudonym
    from gateway.ttp.client import HttpTTPClient

    fixture = make_test_ttp(tmp_path / "k", ["registry-example"])
    pre = secrets.token_bytes(32)
    caplog.set_level(logging.DEBUG)
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        async def go():
            async with HttpTTPClient(base, fixture.api_keys["provider-a"], sealed=False) as client:
                return await client.pseudonymise("registry-example", [PrePseudonym("B", 1, pre)] * 3)
        [result, *_] = asyncio.run(go())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "pseudonymize by provider-a: 3 values" in logged
    for secret in (nlps1.b64u(pre), result.identifier_value, fixture.api_keys["provider-a"],
                   fixture.keystore.master.hex()):
        assert secret not in logged


def test_running_ttp_picks_up_cli_rotation(tmp_path):
    import asyncio

    from gateway.pseudonym.types import PrePseudonym
    from gateway.ttp.client import HttpTTPClient

    fixture = make_test_ttp(tmp_path / "k", ["registry-example"])
    item = PrePseudonym("B", 1, secrets.token_bytes(32))

    async def once(base):
        async with HttpTTPClient(base, fixture.api_keys["provider-a"]) as client:
            return (await client.pseudonymise("registry-example", [item]))[0].identifier_value

    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        assert asyncio.run(once(base)).startswith("v1.")
        r = runner.invoke(ttp_cli, ["keys", "rotate", "registry-example", "--key-dir", str(tmp_path / "k")])
        assert r.exit_code == 0
        assert asyncio.run(once(base)).startswith("v2.")
        os.chmod(tmp_path / "k" / ks.KEYRING_FILE, 0o644)  # a broken keyring: the previous one stays in force
        assert asyncio.run(once(base)).startswith("v2.")


def test_keys_init_uses_the_key_dir_variable_as_list_and_serve_do(tmp_path):
    """A probe: `ttp keys init` wrote to var/ttp-keys while FHIR_GATEWAY_TTP_KEY_DIR pointed elsewhere, and
    `keys list` (which reads the variable) then found no keys."""
    env = {ks.ENV_KEY_DIR: str(tmp_path / "env-keys")}
    r = runner.invoke(ttp_cli, ["keys", "init", "--registry", "registry-a"], env=env)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "env-keys" / ks.MASTER_FILE).is_file()
    r = runner.invoke(ttp_cli, ["keys", "list"], env=env)
    assert r.exit_code == 0 and "registry-a: current v1" in r.output, r.output


def test_a_running_ttp_takes_in_added_and_revoked_callers_without_a_restart(tmp_path):
    """`ttp serve` read its callers file once: a key added beside it was refused until a restart, and there
    was no way to revoke a leaked key but to edit the file and restart. Now `callers add` and `callers
    remove` count from the next request; a file that cannot be read lets nobody in (503), until it can."""
    import subprocess
    import sys
    import time

    import httpx

    from gateway.serving import free_port

    def cli(*args: str) -> str:
        result = runner.invoke(ttp_cli, list(args))
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()[-1]

    callers = tmp_path / "callers.yaml"
    cli("keys", "init", "--key-dir", str(tmp_path / "keys"), "--registry", "registry-a")
    first = cli("callers", "add", "umc", "--role", "provider", "--provider", "ura:1", "--file", str(callers))

    def serve(*extra: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "ttp", "serve", "--key-dir", str(tmp_path / "keys"),
             "--api-keys-file", str(callers), "--log-level", "warning", "--port", str(port), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/metadata", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ttp serve did not start"
            time.sleep(0.05)

    def pseudonymise(url: str, key: str) -> int:
        params = {"resourceType": "Parameters", "parameter": [
            {"name": "target", "valueString": "registry-a"},
            {"name": "original", "valueString": f"B:1:{nlps1.b64u(secrets.token_bytes(32))}"}]}
        return httpx.post(f"{url}/$pseudonymize", json=params, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}).status_code

    proc, url = serve("--allow-plain")  # this test sends plain batches
    try:
        assert pseudonymise(url, first) == 200
        second = cli("callers", "add", "umc-2", "--role", "provider", "--provider", "ura:2",
                     "--file", str(callers))
        assert pseudonymise(url, second) == 200
        cli("callers", "remove", "umc", "--file", str(callers))
        assert pseudonymise(url, first) == 401
        assert pseudonymise(url, second) == 200
        good = callers.read_bytes()
        callers.write_text("callers: [unclosed")  # an operator's edit gone wrong: fail closed
        assert pseudonymise(url, second) == 503
        callers.write_bytes(good)
        assert pseudonymise(url, second) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert runner.invoke(ttp_cli, ["callers", "remove", "umc", "--file", str(callers)]).exit_code != 0
    # by default `ttp serve` takes sealed batches only (spec §4.1.5): a plain one, even authenticated, is 400
    proc, url = serve()
    try:
        assert pseudonymise(url, second) == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_version_is_retired_only_after_gateways_stopped_delivering_it(tmp_path):
    """A probe: a gateway's pseudonym cache (10 minutes) keeps delivering the old version after a rotation
    until it sees a new patient; retired at once, those pseudonyms could never be translated and linked.
    `retire` now waits out the caches (RETIRE_AFTER_SECONDS after the rotation) unless forced."""
    store = ks.init_keys(tmp_path / "k", ["registry-a"])
    rotated_at = 1_800_000_000.0
    assert store.rotate("registry-a", now=rotated_at) == 2
    loaded = ks.KeyStore.load(tmp_path / "k", env={})  # the time of the rotation is in the keyring
    with pytest.raises(ks.KeyStoreError, match="cached") as refused:
        loaded.retire("registry-a", 1, now=rotated_at + 60)
    assert "2027-01-15T09:00:00Z" in str(refused.value)  # from when it may be retired, in UTC
    assert loaded.versions("registry-a").usable(1)
    loaded.retire("registry-a", 1, now=rotated_at + ks.RETIRE_AFTER_SECONDS)
    assert not ks.KeyStore.load(tmp_path / "k", env={}).versions("registry-a").usable(1)
    # forced (the operator knows no gateway holds the old version), and through the command
    key_dir = ["--key-dir", str(tmp_path / "k")]
    assert runner.invoke(ttp_cli, ["keys", "rotate", "registry-a", *key_dir]).exit_code == 0
    result = runner.invoke(ttp_cli, ["keys", "retire", "registry-a", "2", *key_dir])
    assert result.exit_code != 0 and "--force" in result.output
    assert runner.invoke(ttp_cli, ["keys", "retire", "registry-a", "2", "--force", *key_dir]).exit_code == 0
    assert ks.KeyStore.load(tmp_path / "k", env={}).versions("registry-a").retired == (1, 2)


def test_a_keyring_that_does_not_say_when_it_was_rotated_retires_only_by_force(tmp_path):
    """A re-probe: a keyring rotated before the rotation time was kept (no `since`) let `retire` through at
    once, the very case the wait exists for, during an upgrade."""
    ks.init_keys(tmp_path / "k", ["registry-a"])
    before_since = '{"domains": {"registry-a": {"current": 2, "retired": []}}}'
    (tmp_path / "k" / ks.KEYRING_FILE).write_text(before_since)
    store = ks.KeyStore.load(tmp_path / "k", env={})
    with pytest.raises(ks.KeyStoreError, match="does not say when"):
        store.retire("registry-a", 1)
    store.retire("registry-a", 1, force=True)
    assert not ks.KeyStore.load(tmp_path / "k", env={}).versions("registry-a").usable(1)


def test_concurrent_caller_changes_are_not_lost(tmp_path):
    """A re-probe: eight `ttp callers add` at once printed eight keys, and one of them was not in the file
    (read, change and rename without a lock, through one temporary file name)."""
    import threading

    path = tmp_path / "callers.yaml"
    keys: dict[str, str] = {}

    def add(name: str) -> None:
        keys[name] = add_caller(path, name, "provider", provider=f"ura:{name}")

    threads = [threading.Thread(target=add, args=(f"n{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    auth = TTPAuth.from_file(path)
    assert all(auth.authenticate({"x-api-key": key}) for key in keys.values()), "every printed key works"
