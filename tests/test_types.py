"""The package type-checks: mypy over ``logitcache/`` with the configuration in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors():
    # mypy is part of the test extra: a missing mypy fails here instead of skipping the check
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "logitcache"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"mypy reports errors:\n{result.stdout}{result.stderr}"
