"""HttpTTPClient against the real TTP under uvicorn: retries, Retry-After, fail-closed, cache, chunking."""

import asyncio
import secrets
import time

import pytest

from gateway.pseudonym.types import PrePseudonym
from gateway.ttp.app import create_app
from gateway.ttp.backend import TTPBackend, TTPRejected, TTPUnavailable
from gateway.ttp.client import CachingTTP, HttpTTPClient
from gateway.ttp.embedded import EmbeddedTTP
from gateway.ttp.testing import RequestCounter, make_test_ttp
from tests.servers import free_port, serve

REGISTRY = "registry-example"
POST = ("POST", "/$pseudonymize")


class Flaky:
    """An in-test ASGI app: answers the first POSTs with (status, headers), then the real TTP answers."""

    def __init__(self, app, failures, delay: float = 0.0):
        self.app, self.failures, self.delay = app, list(failures), delay

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and (self.failures or self.delay):
            while (await receive()).get("more_body"):
                pass
            if self.delay:
                await asyncio.sleep(self.delay)
            status, headers = self.failures.pop(0) if self.failures else (200, {})
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/fhir+json")]
                        + [(k.encode(), v.encode()) for k, v in headers.items()]})
            await send({"type": "http.response.body",
                        "body": b'{"resourceType":"OperationOutcome","issue":[{"severity":"error",'
                                b'"code":"transient","diagnostics":"try later"}]}'})
            return
        await self.app(scope, receive, send)


@pytest.fixture
def fixture(tmp_path):
    return make_test_ttp(tmp_path / "keys", [REGISTRY])


def _items(n, ptype="B"):
    return [PrePseudonym(ptype, 1, secrets.token_bytes(32)) for _ in range(n)]


def _call(base, key, items, **kw):
    async def go():
        async with HttpTTPClient(base, key, **kw) as client:
            return await client.pseudonymise(REGISTRY, items)
    return asyncio.run(go())


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plain"])
def test_retries_503_then_succeeds(fixture, sealed):
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    with serve(Flaky(counter, [(503, {}), (502, {})])) as base:
        results = _call(base, fixture.api_keys["provider-a"], _items(5), retries=3, backoff=0.01,
                        sealed=sealed)
    assert all(r.identifier_value for r in results)
    assert counter.counts[POST] == 1  # the two failures never reached the TTP; the retry did (re-sealed)


def test_429_honours_retry_after(fixture):
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    with serve(Flaky(counter, [(429, {"Retry-After": "1"})])) as base:
        started = time.monotonic()
        results = _call(base, fixture.api_keys["provider-a"], _items(3), retries=2, backoff=0.01)
        elapsed = time.monotonic() - started
    assert all(r.identifier_value for r in results)
    assert 0.95 <= elapsed < 5


def test_gives_up_fail_closed(fixture):
    app = Flaky(create_app(fixture.keystore, fixture.auth), [(503, {})] * 10)
    with serve(app) as base, pytest.raises(TTPUnavailable) as err:
        _call(base, fixture.api_keys["provider-a"], _items(3), retries=2, backoff=0.01)
    assert app.failures == [(503, {})] * 7  # 1 + 2 retries used
    assert "attempts" in str(err.value)


def test_unreachable_and_timeout_fail_closed(fixture):
    with pytest.raises(TTPUnavailable):
        _call(f"http://127.0.0.1:{free_port()}", "k", _items(1), retries=1, backoff=0.01)

    async def probe():
        async with HttpTTPClient(f"http://127.0.0.1:{free_port()}", "k") as client:
            await client.probe()
    with pytest.raises(TTPUnavailable):
        asyncio.run(probe())
    with serve(Flaky(create_app(fixture.keystore, fixture.auth), [], delay=2.0)) as base:
        started = time.monotonic()
        with pytest.raises(TTPUnavailable):
            _call(base, fixture.api_keys["provider-a"], _items(1), retries=1, backoff=0.01, timeout=0.3)
        assert time.monotonic() - started < 1.9


def test_rejection_is_not_retried(fixture):
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    with serve(counter) as base:
        with pytest.raises(TTPRejected) as err:
            _call(base, "not-a-key", _items(2), retries=3, sealed=False)
        assert err.value.status == 401 and isinstance(err.value, TTPUnavailable)
        with pytest.raises(TTPRejected) as err:
            _call(base, fixture.api_keys["registry-holder"], _items(2), retries=3, sealed=False)
        assert err.value.status == 403
    assert counter.counts[POST] == 2


def test_probe(fixture):
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        async def go():
            async with HttpTTPClient(base, fixture.api_keys["provider-a"]) as client:
                assert isinstance(client, TTPBackend)
                await client.probe()
        asyncio.run(go())


def test_cache_hits_avoid_requests(fixture):
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    items = _items(20) + _items(5, "NGG")
    with serve(counter) as base:
        async def go():
            async with HttpTTPClient(base, fixture.api_keys["provider-a"]) as client:
                cached = CachingTTP(client, max_entries=1000)
                first = await cached.pseudonymise(REGISTRY, items + items[:3])  # duplicates: one fetch each
                assert counter.counts[POST] == 1 and cached.misses == 25
                second = await cached.pseudonymise(REGISTRY, list(reversed(items)))
                assert counter.counts[POST] == 1 and cached.hits == 25
                expected = [r.identifier_value for r in reversed(first[:25])]
                assert [r.identifier_value for r in second] == expected
                assert [r.index for r in second] == list(range(25))
                new = _items(2)
                mixed = await cached.pseudonymise(REGISTRY, [items[0], *new])
                assert counter.counts[POST] == 2 and cached.misses == 27
                assert mixed[0].identifier_value == first[0].identifier_value
        asyncio.run(go())


def test_cache_does_not_keep_errors_and_is_bounded(fixture):
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        async def go():
            async with HttpTTPClient(base, fixture.api_keys["provider-a"]) as client:
                cached = CachingTTP(client, max_entries=3)
                bad = PrePseudonym("B", 1, bytes(20))
                [r] = await cached.pseudonymise(REGISTRY, [bad])
                assert r.error_code == "invalid-length"
                [r] = await cached.pseudonymise(REGISTRY, [bad])
                assert cached.hits == 0
                await cached.pseudonymise(REGISTRY, _items(10))
                assert len(cached._lru) == 3
        asyncio.run(go())


def test_chunks_only_above_max_batch(fixture):
    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    items = _items(120)
    with serve(counter) as base:
        chunked = _call(base, fixture.api_keys["provider-a"], items, max_batch=50, max_concurrency=2)
        assert counter.counts[POST] == 3
        whole = _call(base, fixture.api_keys["provider-a"], items)
        assert counter.counts[POST] == 4
    assert [r.identifier_value for r in chunked] == [r.identifier_value for r in whole]
    assert [r.index for r in chunked] == list(range(120))


def test_embedded_equals_http(fixture):
    items = _items(10) + _items(3, "MRN")
    with serve(create_app(fixture.keystore, fixture.auth)) as base:
        over_http = _call(base, fixture.api_keys["provider-a"], items)
    embedded = asyncio.run(EmbeddedTTP(fixture.keystore, "ura:00000000").pseudonymise(REGISTRY, items))
    assert embedded == over_http
    with pytest.raises(TTPRejected):
        asyncio.run(EmbeddedTTP(fixture.keystore).pseudonymise("nope", items))


def test_after_a_key_rotation_the_cache_serves_no_pseudonym_under_the_old_key(fixture):
    import httpx

    counter = RequestCounter(create_app(fixture.keystore, fixture.auth))
    known = _items(5)
    with serve(counter) as base:
        async def go():
            async with HttpTTPClient(base, fixture.api_keys["provider-a"]) as client:
                cached = CachingTTP(client, max_entries=1000, ttl=None)  # no expiry: only the version decides
                before = await cached.pseudonymise(REGISTRY, known)
                assert {r.identifier_value.split(".")[0] for r in before} == {"v1"}
                target = {"name": "target", "valueString": REGISTRY}
                rotate = {"resourceType": "Parameters", "parameter": [target]}
                async with httpx.AsyncClient(headers=fixture.headers("admin")) as admin:
                    answer = await admin.post(f"{base}/$rotate", json=rotate)
                    assert answer.status_code == 200
                # all cached: nothing tells the gateway yet, so the old version is still served
                assert [r.identifier_value for r in await cached.pseudonymise(REGISTRY, known)] == [
                    r.identifier_value for r in before
                ]
                calls = counter.counts[POST]
                # a new patient's answer carries v2: the known ones in the same call are fetched again
                mixed = await cached.pseudonymise(REGISTRY, [*known, *_items(1)])
                assert {r.identifier_value.split(".")[0] for r in mixed} == {"v2"}
                assert counter.counts[POST] == calls + 2
                again = await cached.pseudonymise(REGISTRY, known)  # and from now on from the cache, as v2
                assert counter.counts[POST] == calls + 2
                assert [r.identifier_value for r in again] == [r.identifier_value for r in mixed[:5]]
        asyncio.run(go())
