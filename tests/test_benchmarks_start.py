"""Every benchmark script starts as the README runs it (`.venv/bin/python benchmarks/X.py`).

benchmarks/http.py (named by the performance issue) shadows the standard `http` package for any script in
that folder that does not keep the folder off sys.path; a script that forgot it failed at its first import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_starts(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
