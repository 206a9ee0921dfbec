import subprocess
import sys

from gateway import __version__


def test_cli_prints_version():
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == __version__
