"""The documentation: the MkDocs site builds in strict mode (a broken link, a missing page or a renamed function in
the API reference fails), the README stays a front door whose links resolve, and the library speaks of itself in the
present tense."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "--start-method" in cli and "--encoding" in cli  # generated from the commands themselves
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "CachedKDDataset" in api and "set_epoch" in api


def test_the_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
    assert "./scripts/demo.sh" in readme and "./scripts/test.sh" in readme


def test_the_library_does_not_narrate_its_history():
    pattern = re.compile(r"\b(session|issue) \d+|since session", re.IGNORECASE)
    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "logitcache").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits
