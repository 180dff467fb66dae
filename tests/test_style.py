"""The code base stays `ruff check` clean (configuration in ruff.toml)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_check_is_clean() -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
