"""The chain hands over the bytes its leak gate scanned: what is stored is exactly what was checked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from gateway.bulk.chains import offline_chains
from gateway.runtime import _with_last_member

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_payload_is_the_serialised_bundle(name: str, tmp_path: Path) -> None:
    chains = offline_chains("example-generic", tmp_path)
    bundle = orjson.loads((EXAMPLES / name).read_bytes())
    processed = asyncio.run(chains.process(bundle, recorded="2026-01-01T00:00:00Z"))
    if processed.bundle is None:
        assert processed.payload is None  # nothing to deliver (e.g. every patient objected)
        return
    assert processed.payload == orjson.dumps(processed.bundle)
    identifier = {"system": "urn:x", "value": "k" * 32}
    spliced = _with_last_member(processed.payload, "identifier", identifier)
    assert spliced == orjson.dumps({**processed.bundle, "identifier": identifier})
    assert orjson.loads(spliced)["identifier"] == identifier


def test_splicing_refuses_what_is_not_a_serialised_object() -> None:
    for bad in (None, b"", b"{}", b"[1]"):
        with pytest.raises(ValueError):
            _with_last_member(bad, "identifier", {})
