"""The TTP service on arbitrary input: never raises, one result per value, answers stay valid JSON."""

import secrets

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pseudonym import nlps1
from gateway.ttp import app, service
from gateway.ttp.keystore import KeyStore

KEYS = KeyStore.in_memory(secrets.token_bytes(32), {"registry-example": 2})
values = st.one_of(
    st.text(max_size=80),
    st.builds(lambda t, v, b: f"{t}:{v}:{b}", st.sampled_from([*nlps1.TYPES, "sNGG", "x", ""]),
              st.integers(-1, 10**7), st.text("ABCxyz019-_=+/", max_size=80)),
    st.builds(lambda t, b: f"{t}:v1.{b}", st.sampled_from(["B", "MRN", "zz"]),
              st.text("AZaz09-_", max_size=90)),
    st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, max_size=12), st.sampled_from(["ura:00000000", None]))
def test_arbitrary_values_never_break_a_batch(batch, provider):
    for name, results in (
        ("pseudonym", service.pseudonymise(KEYS, "registry-example", provider, batch)),
        ("pseudonym", service.translate(KEYS, "registry-example", batch)),
        ("original", service.depseudonymise(KEYS, "registry-example", provider or "", batch)),
    ):
        assert len(results) == len(batch)
        for value, code in results:
            assert (value is None) != (code is None)
            assert code is None or code in service.ERROR_CODES
        for echo in (True, False):
            answer = orjson.loads(app._answer(name, "pre" if name == "original" else "pseudonym",
                                              "registry-example", batch, results, echo=echo))
            assert len(answer["parameter"]) == len(batch)
        compact = orjson.loads(app._compact_answer("pseudonym", "registry-example", results))
        assert len(compact["pseudonym"]) == len(batch)


def test_pre_string_round_trip():
    pre = secrets.token_bytes(32)
    [(value, code)] = service.pseudonymise(KEYS, "registry-example", None, [service.pre_string("GG", 3, pre)])
    assert code is None and value == KEYS.current_key("registry-example").identifier("GG", pre)
