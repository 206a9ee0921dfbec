"""ttp_from_config for every kind and check_backend against the stubs and the reference TTP (real HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ttp.app import create_app
from gateway.ttp.client import HttpTTPClient
from gateway.ttp.embedded import EmbeddedTTP
from gateway.ttp.factory import KINDS, check_backend, options_from_pairs, ttp_from_config
from gateway.ttp.gpas import GpasTTP
from gateway.ttp.testing import make_test_ttp
from gateway.ttp.tres import RoutingTTP, TresTTP
from tests.servers import free_port, serve
from tests.stubs.gpas_stub import GpasState, create_gpas_stub
from tests.stubs.tres_stub import TresState, create_tres_stub

REGISTRY = "registry-example"
PROVIDER = "ura:00000000"
ENV = {"TTP_KEY": "test-key-provider-a", "TRES_PW": "test-password", "GPAS_PW": "test-password"}


def _gpas_options(url: str) -> dict:
    return {"url": url, "domains": {REGISTRY: "registry-example"}}


def _tres_options(url: str) -> dict:
    return {"url": url, "domain": "zorgttp.nl", "project": "registry-mrn", "username": "gateway",
            "password_env": "TRES_PW"}


def _check(kind: str, options: dict) -> list[tuple[str, bool, str]]:
    async def go():
        backend = ttp_from_config(kind, options, provider=PROVIDER, secret=ENV.get)
        try:
            return await check_backend(backend, registry=REGISTRY)
        finally:
            close = getattr(backend, "aclose", None)
            if close:
                await close()
    return asyncio.run(go())


def test_kinds_build_their_backends(tmp_path):
    make_test_ttp(tmp_path / "keys", [REGISTRY])
    built = {
        "nlps1": ttp_from_config("nlps1", {"url": "http://127.0.0.1:1", "api_key_env": "TTP_KEY"},
                                 provider=PROVIDER, secret=ENV.get),
        "embedded": ttp_from_config("embedded", {"key_dir": str(tmp_path / "keys")}, provider=PROVIDER,
                                    secret=ENV.get),
        "gpas": ttp_from_config("gpas", _gpas_options("http://127.0.0.1:1"), provider=PROVIDER,
                                secret=ENV.get),
        "tres+nlps1": ttp_from_config("tres+nlps1", {"tres": _tres_options("http://127.0.0.1:1"),
                                                     "nlps1": {"url": "http://127.0.0.1:1",
                                                               "api_key_env": "TTP_KEY"}},
                                      provider=PROVIDER, secret=ENV.get),
    }
    assert set(built) | {"tres", "tres+gpas"} == set(KINDS)
    assert isinstance(built["nlps1"], HttpTTPClient) and isinstance(built["embedded"], EmbeddedTTP)
    assert isinstance(built["gpas"], GpasTTP)
    router = built["tres+nlps1"]
    assert isinstance(router, RoutingTTP) and isinstance(router.routes["MRN"], TresTTP)
    assert isinstance(router.default, HttpTTPClient)


@pytest.mark.parametrize(("kind", "options", "needle"), [
    ("nlps1", {"url": "http://x", "api_key_env": "UNSET"}, "UNSET"),
    ("nlps1", {}, "'url'"),
    ("gpas", {"url": "http://x"}, "'domains'"),
    ("gpas", {"url": "http://x", "domains": {REGISTRY: "d"}, "auth": {"type": "basic", "username": "u",
                                                                      "password_env": "UNSET"}}, "basic"),
    ("tres+nlps1", {"tres": {"url": "http://x"}}, "'domain'"),
    ("embedded", {"key_dir": "/nonexistent/keys"}, "embedded TTP"),
    ("zorgttp-cmt", {}, "unknown TTP kind"),
])
def test_configuration_errors_are_one_clear_line(kind, options, needle):
    with pytest.raises(ValueError) as info:
        ttp_from_config(kind, options, provider=PROVIDER, secret=ENV.get)
    assert needle in str(info.value)
    assert "test-password" not in str(info.value) and "test-key" not in str(info.value)


def test_check_gpas():
    with serve(create_gpas_stub(GpasState())) as base:
        steps = _check("gpas", _gpas_options(base))
    assert [(s, ok) for s, ok, _ in steps] == [("probe", True), ("round trip", True)]


def test_check_gpas_unknown_domain():
    with serve(create_gpas_stub(GpasState())) as base:
        steps = _check("gpas", {"url": base, "domains": {REGISTRY: "missing"}})
    assert steps[-1][:2] == ("round trip", False) and "HTTP 404" in steps[-1][2]


def test_check_tres_plus_gpas_with_reversal():
    with serve(create_tres_stub(TresState())) as tres, serve(create_gpas_stub(GpasState())) as gpas:
        steps = _check("tres+gpas", {"tres": _tres_options(tres), "gpas": _gpas_options(gpas)})
    assert [(s, ok) for s, ok, _ in steps] == [("probe", True), ("round trip", True), ("round trip", True),
                                               ("reversal", True)]


def test_check_reference_ttp_and_embedded(tmp_path):
    fixture = make_test_ttp(tmp_path / "keys", [REGISTRY])
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        steps = _check("nlps1", {"url": base, "api_key_env": "TTP_KEY"})
    assert all(ok for _, ok, _ in steps) and len(steps) == 2
    embedded = _check("embedded", {"key_dir": str(tmp_path / "keys")})
    assert all(ok for _, ok, _ in embedded)


def test_check_unreachable():
    steps = _check("gpas", {**_gpas_options(f"http://127.0.0.1:{free_port()}"), "retries": 0})
    assert steps == [("probe", False, "gPAS not reachable")]


def test_options_from_pairs():
    options = options_from_pairs(["domain=REG_A", "auth.type=basic", "auth.username=gw", "search_image=true"],
                                 kind="gpas", url="https://ttp", registry="reg-a")
    assert options == {"url": "https://ttp", "domains": {"reg-a": "REG_A"}, "search_image": True,
                       "auth": {"type": "basic", "username": "gw"}}
    with pytest.raises(ValueError):
        options_from_pairs(["novalue"], kind="gpas", url="u", registry="r")


def test_cli_check_kind_gpas_and_tres(monkeypatch):
    from typer.testing import CliRunner

    from gateway.ttp.commands import app

    monkeypatch.setenv("TEST_TRES_PW", "test-password")
    runner = CliRunner()
    with serve(create_gpas_stub(GpasState())) as gpas, serve(create_tres_stub(TresState())) as tres:
        ok = runner.invoke(app, ["check", "--kind", "gpas", "--url", gpas, "--registry", REGISTRY])
        tres_ok = runner.invoke(app, ["check", "--kind", "tres", "--url", tres,
                                      "--option", "domain=zorgttp.nl", "--option", "project=registry-mrn",
                                      "--option", "username=gateway", "--option", "password_env=TEST_TRES_PW",
                                      ])
        bad = runner.invoke(app, ["check", "--kind", "gpas", "--url", gpas, "--option", "domain=missing"])
    assert ok.exit_code == 0 and "verdict: gpas TTP usable" in ok.output
    assert tres_ok.exit_code == 0 and "reversal" in tres_ok.output
    assert "test-password" not in tres_ok.output
    assert bad.exit_code == 1 and "HTTP 404" in bad.output
