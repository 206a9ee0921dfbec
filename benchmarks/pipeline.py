"""The offline chain on one core: parse → validate → opt-out → pseudonymise → de-identify → leak gate →
serialise, beside the orjson floor and the fhir.resources R4B round trip, measured in the same run.

Bundles as in /work/shared/perf-notes.md (benchmarks/validate.py: one Patient + N clinical resources that
reference it through urn:uuid fullUrls). The TTP is the embedded reference TTP behind a warm CachingTTP, so
the figures are the gateway's own CPU cost. The last row per size is the chain in strict mode (the
fhir.resources R4B models on every posted and delivered resource; sizes up to --fhir-resources-max).
Median of several runs; the GC is frozen after start-up as in the service and paused around each bundle as
the bulk path does.

    .venv/bin/python benchmarks/pipeline.py [--sizes 10,100,1000,10000] [--profile 1000] [--no-fhir-resources]
"""

# ruff: noqa: E402 - imports follow the sys.path guard below (benchmarks/http.py shadows `http`)
from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/http.py would shadow the standard `http` package: keep this folder off sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import io
import pstats
import tempfile
from collections.abc import Callable
from dataclasses import replace

import orjson

from gateway.bulk.chains import offline_chains
from gateway.bulk.group import Chains
from gateway.pipeline.parse import parse_json
from gateway.pipeline.validate import validate_bundle


def _sibling(name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_validate = _sibling("validate")
make_bundle, median_seconds = _validate.make_bundle, _validate.median_seconds

REGISTRY = "example-generic"
GOAL = 0.25  # the chain should reach a quarter of the orjson floor


def chain_fn(chains: Chains, body: bytes, loop: asyncio.AbstractEventLoop) -> Callable[[], bytes]:
    async def once() -> bytes:
        bundle = parse_json(body, max_bytes=1 << 30)
        processed = await chains.process(bundle, recorded="2026-01-01T00:00:00.000Z")
        assert processed.bundle is not None
        return orjson.dumps(processed.bundle)

    def run() -> bytes:
        gc.disable()  # as the bulk path does around a group (no cycles are created)
        try:
            return loop.run_until_complete(once())
        finally:
            gc.enable()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--profile", type=int, default=0, help="cProfile the chain on a bundle of this size")
    parser.add_argument("--no-fhir-resources", action="store_true")
    parser.add_argument(
        "--fhir-resources-max",
        type=int,
        default=1000,
        help="above this size the fhir.resources figure is extrapolated, and strict mode is not measured",
    )
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        chains = offline_chains(REGISTRY, Path(tmp))
        chains.validator.warm(["Bundle", "Patient", "Encounter", "Observation", "Condition", "Procedure"])
        fhir_bundle = None
        if not args.no_fhir_resources:
            from fhir.resources.R4B.bundle import Bundle as fhir_bundle  # noqa: N813
        gc.freeze()
        sizes = [int(s) for s in args.sizes.split(",")]
        fhir_rate: dict[int, float] = {}
        print(f"{'entries':>8} {'size':>9}  {'stage':<46} {'MB/s':>8} {'resources/s':>12} {'vs floor':>9}")
        for n in sizes:
            body = orjson.dumps(make_bundle(n))
            run = chain_fn(chains, body, loop)
            run()  # warms the TTP cache and the validators
            budget = 4.0 if n >= 10000 else 1.5
            floor = median_seconds(_no_gc(lambda b=body: orjson.dumps(orjson.loads(b))), budget=budget)
            stages: list[tuple[str, float]] = [
                ("orjson loads + dumps (floor)", floor),
                (
                    "parse_json (limits, duplicates)",
                    median_seconds(_no_gc(lambda b=body: parse_json(b, max_bytes=1 << 30)), budget=budget),
                ),
                (
                    "orjson.loads + R4 schema per resource only",
                    median_seconds(
                        _no_gc(
                            lambda b=body: chains.validator.validate_resource(orjson.loads(b), "Bundle")
                        ),
                        budget=budget,
                    ),
                ),
                (
                    "parse_json + validate_bundle",
                    median_seconds(
                        _no_gc(
                            lambda b=body: validate_bundle(parse_json(b, max_bytes=1 << 30), chains.validator)
                        ),
                        budget=budget,
                    ),
                ),
                ("whole chain + orjson.dumps (one core)", median_seconds(run, budget=budget)),
            ]
            if fhir_bundle is not None:
                stages.append(_fhir_stage(fhir_bundle, body, n, args.fhir_resources_max, fhir_rate, budget))
            if n <= args.fhir_resources_max:
                strict = replace(chains, registry=replace(chains.registry, strict=True))
                seconds = median_seconds(chain_fn(strict, body, loop), budget=budget, min_runs=2)
                stages.append(("whole chain, strict (R4B models in and out)", seconds))
            for name, seconds in stages:
                mb_s = len(body) / seconds / 1e6
                print(
                    f"{n:>8} {len(body) / 1e6:>7.2f}MB  {name:<46} {mb_s:>8.1f} {(n + 1) / seconds:>12,.0f}"
                    f" {floor / seconds:>8.2f}x"
                )
            chain_ratio = floor / stages[4][1]
            verdict = "met" if chain_ratio >= GOAL else "NOT met"
            print(
                f"{'':>8} goal: whole chain >= {GOAL:.2f}x of the floor -> {chain_ratio:.2f}x ({verdict})\n"
            )
        if args.profile:
            _profile(chain_fn(chains, orjson.dumps(make_bundle(args.profile)), loop))


def _no_gc(fn: Callable[[], object]) -> Callable[[], object]:
    """Every stage, the floor included, runs with the GC paused: the comparison is then like for like."""

    def run() -> object:
        gc.disable()
        try:
            return fn()
        finally:
            gc.enable()

    return run


def _fhir_stage(
    model,
    body: bytes,
    n: int,
    max_n: int,
    rate: dict[int, float],  # noqa: ANN001
    budget: float,
) -> tuple[str, float]:
    if n <= max_n:
        seconds = median_seconds(
            _no_gc(lambda: model.model_validate(orjson.loads(body)).model_dump_json()),
            budget=budget,
            min_runs=2,
        )
        rate[n] = seconds / len(body)
        return "fhir.resources R4B validate + model_dump_json", seconds
    base = max(rate) if rate else None
    if base is None:
        return "fhir.resources R4B (not measured)", float("inf")
    return f"fhir.resources R4B (extrapolated from {base})", rate[base] * len(body)


def _profile(run: Callable[[], bytes]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print("cProfile of the whole chain (5 runs), by own time:")
    print("\n".join(out.getvalue().splitlines()[:45]))


if __name__ == "__main__":
    main()
