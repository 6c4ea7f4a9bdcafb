"""examples/: each script runs with --tiny (a synthetic dataset, a cache in a tmp folder) in seconds, and the
checkpoints they write teach a later `logitcache build` without running code from the file."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import logitcache as lc
from logitcache.store.identity import teacher_sha256
from logitcache.specs import load_weights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, module: list[str] | None = None) -> dict:
    cmd = [sys.executable, *(module or []), str(EXAMPLES / name), "--tiny", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(math.isfinite(x) and x > 0 for x in result["losses"]), result
    return result


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_from(tmp_path: Path, example: str, weights: Path, *key: str) -> lc.Cache:
    """`logitcache build` of the example's tiny dataset with the example's make_model as the teacher."""
    path = f"{EXAMPLES / example}"
    r = subprocess.run(
        [sys.executable, "-m", "logitcache", "build", "--teacher", f"{path}:make_model", "--num-classes", "10",
         "--teacher-weights", str(weights), *key, "--dataset", f"{path}:tiny_dataset", "--augment",
         f"{path}:tiny_augment", "--views", "1", "--workers", "0", "--out", str(tmp_path / "next"), "-q"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return lc.open_cache(tmp_path / "next")


def test_plain_loop(tmp_path):
    result = run_example("plain_loop.py", "--out", str(tmp_path), "--workers", "1")
    assert len(result["losses"]) == 2 and lc.open_cache(tmp_path / "cache").num_views == 2


@pytest.mark.smoke  # an example script end to end, twice
def test_timm_style_resumes_and_its_ema_checkpoint_teaches_the_next_build(tmp_path):
    first = run_example("timm_style.py", "--out", str(tmp_path))
    assert first["start"] == 0 and len(first["losses"]) == 2
    resumed = run_example("timm_style.py", "--out", str(tmp_path), "--resume", "--epochs", "3")
    assert resumed["start"] == 2 and len(resumed["losses"]) == 1
    checkpoint = Path(resumed["checkpoint"])
    built = build_from(tmp_path, "timm_style.py", checkpoint, "--teacher-key", "model_ema")
    teacher = load_weights(load_example("timm_style.py").make_model(10), checkpoint, key="model_ema")
    assert built.meta.teacher.sha256 == teacher_sha256(teacher)  # the EMA's weights, not the model's
    student = load_weights(load_example("timm_style.py").make_model(10), checkpoint, key="model")
    assert teacher_sha256(student) != teacher_sha256(teacher)


@pytest.mark.smoke  # an example script end to end
def test_lightning_module_with_batch_mixing_and_its_checkpoint_as_the_next_teacher(tmp_path):
    pytest.importorskip("lightning")
    result = run_example("lightning_module.py", "--out", str(tmp_path), "--mix", "--workers", "1")
    assert result["rank"] == 0 and len(result["losses"]) == 2
    built = build_from(tmp_path, "lightning_module.py", tmp_path / "last.ckpt")  # its state_dict, "model." removed
    teacher = load_weights(load_example("lightning_module.py").make_model(10), tmp_path / "last.ckpt")
    assert built.meta.teacher.sha256 == teacher_sha256(teacher)


def test_accelerate_loop_on_a_hugging_face_dataset(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("datasets")
    result = run_example("accelerate_loop.py", "--out", str(tmp_path), "--hf", "--workers", "1", "--cpu")
    assert result["processes"] == 1 and len(result["losses"]) == 2
    assert (tmp_path / "model.pth").exists()
