"""The package as a user installs it: the sdist and the wheel built from pyproject.toml hold every module, and the
wheel installed non-editable into a fresh venv works from outside the checkout (imports, the command, a build and a
training run). The fresh venv reuses the test venv's dependencies through a path entry, never its logitcache."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import logitcache
from conftest import HELPERS, made_once

pytestmark = pytest.mark.smoke  # builds, installs and runs the package end to end
ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    """Every module under logitcache/ in the checkout, as a path relative to the project root."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "logitcache").rglob("*.py")}


def _build(out: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """An sdist, and a wheel built from that sdist (python -m build's default): both must be complete. Built once per
    session: the build writes into the checkout (its egg-info), so two workers building at once would collide."""
    return made_once(tmp_path_factory, "dist", _build)


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable); torch & co. come from the test venv's site-packages.
    Made once per session; the tests only run it."""
    return made_once(tmp_path_factory, "venv", lambda folder: _install(dist, folder / "env")) / "env"


def _install(dist: Path, env: Path) -> None:
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A plain path entry: .pth files inside it (the test venv's editable install of logitcache) are not processed.
    (Path(site) / "_test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = dist.glob("logitcache-*.whl")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def _run(env: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r


def test_sdist_and_wheel_hold_every_module(dist):
    (wheel,) = dist.glob("logitcache-*.whl")
    (sdist,) = dist.glob("logitcache-*.tar.gz")
    source = _source_modules()
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("logitcache/") and n.endswith(".py")}
    assert in_wheel == source
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if n.endswith(".py") and "/logitcache/" in n}
    assert source <= in_sdist
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in ("cli", "tests", "benchmarks")], "a stray top-level package"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "logitcache = logitcache.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_imports_every_module_outside_the_checkout(installed, tmp_path):
    modules = sorted(
        m[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for m in _source_modules()
        if not m.endswith("__main__.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import logitcache; print(logitcache.__file__); print(logitcache.__version__)\n"
    )
    r = _run(installed, tmp_path, installed / "bin" / "python", "-c", code)
    where, version = r.stdout.split()
    assert Path(where).is_relative_to(installed), f"imported {where}, not the installed wheel"
    assert version == logitcache.__version__


def test_installed_command_builds_and_trains(installed, tmp_path):
    cmd = installed / "bin" / "logitcache"
    assert _run(installed, tmp_path, cmd, "--version").stdout.strip() == f"logitcache {logitcache.__version__}"
    usage = _run(installed, tmp_path, installed / "bin" / "python", "-m", "logitcache", "--help").stdout
    assert "build" in usage and "train" in usage
    data = ["--dataset", f"{HELPERS}:tiny_dataset"]
    _run(installed, tmp_path, cmd, "build", *data, "--teacher", f"{HELPERS}:tiny_teacher", "--out", "c",
         "--augment", f"{HELPERS}:light_augment", "--views", "2", "--workers", "0", "-q")  # fmt: skip
    _run(installed, tmp_path, cmd, "train", *data, "--kd", "cached", "--cache", "c", "--out", "run",
         "--model", "small-resnet8-w4", "--epochs", "1", "--batch-size", "32", "--workers", "0", "-q")  # fmt: skip
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "ok" in _run(installed, tmp_path, cmd, "verify", "c", "--storage-only").stdout
