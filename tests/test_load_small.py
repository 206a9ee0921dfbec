"""The load test in small (issue 6, item 3): 20 connections for 5 s from a second process against the gateway
as a real process, good and bad bundles mixed. The full run (200 connections, 60 s) is tests/soak/load.py."""

from __future__ import annotations

from pathlib import Path

from tests.soak.load import run_load


def test_small_load_no_5xx_no_loss_bounded_memory(tmp_path: Path) -> None:
    # keep-alive expiry 2 s, under the gateway's 5 s: the reset race at equal expiries (reported, see
    # tests/soak/load.py) is timing luck and must not make CI flaky; the full script runs the default
    report = run_load(tmp_path, connections=20, seconds=5, seed=7, drain_timeout=60, keepalive_expiry=2.0)
    print("\n".join(report.lines()))
    f = report.figures
    assert report.requests > 20 and set(report.by_kind) >= {"good", "malformed-json", "wrong-content-type"}
    assert report.peak_connections >= 15, "the load must really hold its connections open"
    assert report.server_errors == 0, report.by_kind
    assert report.transport_errors == 0, report.by_kind
    assert report.bad_not_4xx == 0, report.by_kind
    good = report.by_kind["good"]
    assert f.accepted > 0 and f.accepted == good.get("202", 0) + good.get("200", 0)
    assert f.lost == 0 and f.dead == 0 and f.duplicate_resources == 0 and f.out_of_order == 0, f.line()
    assert report.depth_after["queued"] == report.depth_after["delivering"] == 0
    # 5 s is too short to call memory flat; a generous bound against a leak that runs away at once
    assert report.rss["peak_kib"] < report.rss["start_kib"] + 300 * 1024, report.rss
