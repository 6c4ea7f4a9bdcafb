"""The house stays drawn by its imports: no import cycle between modules, no import pointing up the layers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycle_and_no_import_up_the_layers():
    run = subprocess.run([sys.executable, "scripts/layout.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    out = run.stdout
    assert "import cycles between modules: none" in out, out
    assert out.rstrip().endswith("none"), out  # the last line: edges that point up the layers
