import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.cli import app
from conftest import HELPERS, made_once
from logitcache import specs
from logitcache.errors import LogitcacheError
from logitcache.student.loop import load_metrics as load_metrics

DATASET = f"{HELPERS}:tiny_dataset"
COMMON = dict(dataset=DATASET, model="small-resnet8-w4", epochs=3, batch_size=32, workers=0, progress=False, lr=0.05)


# The teacher run and its cache are made once per session and shared by the xdist workers (the tests only read
# them); the run's result is what lc.train returned, kept beside it as JSON.
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    def make(folder: Path) -> None:
        cfg = lc.TrainConfig(out=str(folder / "teacher"), augment=f"{HELPERS}:light_augment", seed=0, **COMMON)
        run = lc.train(cfg)
        (folder / "result.json").write_text(json.dumps(dataclasses.asdict(run)))

    folder = made_once(tmp_path_factory, "train-teacher", make)
    return lc.RunResult(**json.loads((folder / "result.json").read_text()))


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, teacher_run):
    return made_once(tmp_path_factory, "train-teacher-cache", lambda f: _build_teacher_cache(teacher_run, f)) / "c"


def _build_teacher_cache(teacher_run: lc.RunResult, folder: Path) -> None:
    out = folder / "c"
    ds = helpers.tiny_dataset()
    tf, _ = specs.resolve_augment(f"{HELPERS}:light_augment", ds)
    lc.build_cache(
        specs.resolve_teacher(teacher_run.run_dir),
        ds,
        out,
        augment=tf,
        views=2,
        k=3,
        batch_size=64,
        chunk_rows=64,
        workers=0,
        progress=False,
        specs={"augment": f"{HELPERS}:light_augment", "teacher": teacher_run.run_dir},
        encoding="topk",
    )


def _check_run_dir(run: lc.RunResult, epochs: int):
    d = Path(run.run_dir)
    config = json.loads((d / "config.json").read_text())
    assert config["epochs"] == epochs and "torch" in config["versions"]
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))
    for key in ("train_loss", "test_accuracy", "wall_seconds", "samples_per_second", "teacher_forwards"):
        assert key in metrics[0]
    model = specs.resolve_teacher(run.run_dir)  # loads model.safetensors without pickle
    assert isinstance(model, torch.nn.Module) and not model.training


def test_plain_training_learns_and_writes_a_run_dir(teacher_run):
    _check_run_dir(teacher_run, 3)
    assert teacher_run.final_accuracy > 0.3  # 10 classes: chance is 0.1
    assert teacher_run.metrics[-1]["teacher_forwards"] == 0


def test_cached_kd_training(tmp_path, teacher_cache):
    run = lc.train(
        lc.TrainConfig(out=str(tmp_path / "cached"), kd="cached", cache=str(teacher_cache), seed=1, **COMMON)
    )
    _check_run_dir(run, 3)
    assert run.teacher_forwards == 0
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["augment"] == f"{HELPERS}:light_augment"  # taken from the cache
    assert config["cache_fingerprint"]["teacher_sha256"]


def test_online_kd_training_and_the_run_dir_teaches_build(tmp_path, teacher_run):
    run = lc.train(
        lc.TrainConfig(
            out=str(tmp_path / "online"), kd="online", teacher=teacher_run.run_dir, seed=1, kd_until=0.5, **COMMON
        )
    )
    _check_run_dir(run, 3)
    steps_per_epoch = 240 // 32
    assert run.teacher_forwards == round(0.5 * 3 * steps_per_epoch) * 32
    # a run directory is a valid teacher for the next build
    result = CliRunner().invoke(
        app,
        [
            "build",
            "--teacher",
            run.run_dir,
            "--dataset",
            DATASET,
            "--out",
            str(tmp_path / "next-cache"),
            "--views",
            "1",
            "--workers",
            "0",
            "-q",
            "--augment",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert lc.open_cache(tmp_path / "next-cache").is_complete


def test_cached_kd_refuses_an_augmentation_that_does_not_match(tmp_path, teacher_cache):
    with pytest.raises(LogitcacheError, match="does not replay"):
        lc.train(
            lc.TrainConfig(
                out=str(tmp_path / "bad"), kd="cached", cache=str(teacher_cache), augment="pad-crop-flip", **COMMON
            )
        )


def test_train_cli_reports_target_accuracy(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "--dataset",
            DATASET,
            "--model",
            "small-resnet8-w4",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--workers",
            "0",
            "--target-accuracy",
            "0.0",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "reached at epoch 1" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kd", "cached"], "needs --cache"),
        (["--kd", "online"], "needs --teacher"),
        (["--kd", "cached", "--cache", "/nonexistent"], "does not exist"),
        (["--kd-until", "1.5"], "--kd-until"),
        (["--model", "resnet9000"], "unknown model"),
    ],
)
def test_train_bad_input(tmp_path, args, message):
    result = CliRunner().invoke(
        app,
        ["train", "--out", str(tmp_path / "r"), "--dataset", DATASET, "--epochs", "1", "--workers", "0", "-q", *args],
    )
    assert result.exit_code == 2 and message in result.output, result.output


def test_cached_kd_trains_like_online_kd(tmp_path, teacher_run):
    """Same seed, views and teacher: a full-encoding cache must give the online trajectory (up to fp16 targets), over
    two epochs, each on its own view."""
    ds = helpers.tiny_dataset()
    tf, _ = specs.resolve_augment(f"{HELPERS}:light_augment", ds)
    cache = tmp_path / "full"
    lc.build_cache(
        specs.resolve_teacher(teacher_run.run_dir),
        ds,
        cache,
        augment=tf,
        views=2,
        seed=4,
        encoding="full",
        workers=0,
        progress=False,
        specs={"augment": f"{HELPERS}:light_augment"},
    )
    common = {**COMMON, "lr": 0.01, "seed": 4, "epochs": 2}
    online = lc.train(
        lc.TrainConfig(
            out=str(tmp_path / "on"),
            kd="online",
            teacher=teacher_run.run_dir,
            augment=f"{HELPERS}:light_augment",
            **common,
        )
    )
    cached = lc.train(lc.TrainConfig(out=str(tmp_path / "ca"), kd="cached", cache=str(cache), **common))
    plain = lc.train(lc.TrainConfig(out=str(tmp_path / "no"), augment=f"{HELPERS}:light_augment", **common))
    for a, b, c in zip(online.metrics, cached.metrics, plain.metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert abs(a["train_loss"] - c["train_loss"]) > 1e-2  # KD really is in the loss


@pytest.mark.smoke  # the demo's quick mode end to end
def test_demo_quick_runs_end_to_end_on_fashion_mnist(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["arms"]) == {"run 2 from scratch", "run 2, cached KD", "run 2, online KD"}
    full, half = str(summary["full_epochs"]), str(summary["full_epochs"] // 2)
    assert set(summary["arms"]["run 2 from scratch"]) == {half, full}  # side by side with KD at the same budget
    cached, online = summary["arms"]["run 2, cached KD"][half], summary["arms"]["run 2, online KD"][half]
    assert cached["teacher_forwards"] == 0 and online["teacher_forwards"] > 0
    assert 0.0 < summary["target"] <= 1.0 and len(cached["finals"]) == 2  # paired seeds
    lift = summary["lift"]["run 2, cached KD"][half]
    scratch = summary["arms"]["run 2 from scratch"][half]["finals"]
    diffs = [(a - b) * 100 for a, b in zip(cached["finals"], scratch)]
    assert lift["n"] == 2 and abs(lift["mean_pp"] - sum(diffs) / 2) < 1e-3 and lift["low_pp"] <= lift["mean_pp"]
    assert "cached KD" in result.output and "95% interval" in result.output
    assert "the teacher ran once, in build" in result.output
    plot = tmp_path / "demo" / "accuracy_vs_budget.png"
    assert plot.stat().st_size > 10_000  # a real figure, not an empty file


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, teacher_cache, monkeypatch):
    import sys

    cfg = dict(kd="cached", cache=str(teacher_cache), seed=3, kd_until=1.0, **COMMON)  # kd_loss runs every step
    straight = lc.train(lc.TrainConfig(out=str(tmp_path / "straight"), **cfg))

    module = sys.modules["logitcache.student.loop"]
    calls = {"n": 0}
    real_kd_loss = module.kd_loss

    def dies_in_epoch_3(*args, **kwargs):  # 7 steps per epoch: call 17 is in the middle of epoch 3
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt
        return real_kd_loss(*args, **kwargs)

    monkeypatch.setattr(module, "kd_loss", dies_in_epoch_3)
    out = tmp_path / "resumed"
    args = ["train", "--out", str(out), "--dataset", DATASET, "--model", "small-resnet8-w4", "--epochs", "3"]
    args += ["--batch-size", "32", "--lr", "0.05", "--seed", "3", "--kd", "cached", "--cache", str(teacher_cache)]
    args += ["--kd-until", "1"]
    r = CliRunner().invoke(app, args + ["--workers", "0", "-q"])  # Ctrl-C in epoch 3
    assert r.exit_code == 130 and "--resume" in r.output, r.output
    assert len(load_metrics(out)) == 2  # epochs 1 and 2 finished and saved
    monkeypatch.setattr(module, "kd_loss", real_kd_loss)

    # resumed with a different worker count (it does not change what the run computes)
    r = CliRunner().invoke(app, args + ["--workers", "2", "--resume", "-q"])
    assert r.exit_code == 0, r.output
    a, b = _weights(straight.run_dir), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = load_metrics(out)
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    for x, y in zip(straight.metrics, resumed):
        assert (x["train_loss"], x["test_accuracy"]) == (y["train_loss"], y["test_accuracy"])

    # resuming a finished run trains nothing and reports its metrics
    again = lc.train(lc.TrainConfig(out=str(out), resume=True, **cfg))
    assert [m["train_loss"] for m in again.metrics] == [m["train_loss"] for m in resumed]


def test_resume_refuses_changed_settings(tmp_path, teacher_cache):
    out = tmp_path / "run"
    lc.train(lc.TrainConfig(out=str(out), **{**COMMON, "epochs": 1}))
    with pytest.raises(LogitcacheError, match=r"settings differ .*lr: 0\.05 -> 0\.2"):
        lc.train(lc.TrainConfig(out=str(out), resume=True, **{**COMMON, "epochs": 1, "lr": 0.2}))
    with pytest.raises(LogitcacheError, match="pass one of them"):
        lc.train(lc.TrainConfig(out=str(out), resume=True, overwrite=True, **COMMON))
    fresh = lc.train(lc.TrainConfig(out=str(tmp_path / "new"), resume=True, **{**COMMON, "epochs": 1}))
    assert len(fresh.metrics) == 1  # nothing to resume: a fresh run


def test_cached_topk_warns_when_the_tail_holds_most_of_the_target(tmp_path, teacher_cache):
    # k=3 of 10 classes: at a very high temperature the softened target is nearly flat and the tail holds ~70% of it
    with pytest.warns(UserWarning, match="hold only"):
        lc.train(
            lc.TrainConfig(
                out=str(tmp_path / "hot"),
                kd="cached",
                cache=str(teacher_cache),
                temperature=50.0,
                **{**COMMON, "epochs": 1},
            )
        )
    r = CliRunner().invoke(
        app,
        ["train", "--out", str(tmp_path / "cli"), "--dataset", DATASET, "--model", "small-resnet8-w4", "--epochs", "1"]
        + ["--batch-size", "32", "--workers", "0", "--kd", "cached", "--cache", str(teacher_cache)]
        + ["--temperature", "50", "-q"],
    )
    assert r.exit_code == 0 and "warning: at --temperature 50" in r.output


def test_topk_kept_mass():
    from logitcache.encoding import TopKEncoding, topk_kept_mass

    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    enc = TopKEncoding(6, 2, soft_tail=True)
    targets = enc.encode(logits)
    for t in (1.0, 4.0):
        true = torch.softmax(logits / t, 1)[0, :2].sum().item()
        assert topk_kept_mass(enc, targets, t) == pytest.approx(true, abs=1e-3)


def test_eval_every_scores_every_nth_epoch_and_the_last(tmp_path, monkeypatch):
    labels = []
    real = lc.train.__globals__["progress_bar"]

    def recording(label, total, enabled=True, unit="samples"):
        labels.append(label)
        return real(label, total, enabled=False, unit=unit)

    monkeypatch.setitem(lc.train.__globals__, "progress_bar", recording)
    run = lc.train(lc.TrainConfig(out=str(tmp_path / "r"), eval_every=2, **{**COMMON, "epochs": 3}))
    accs = [m["test_accuracy"] for m in run.metrics]
    assert accs[0] is None and accs[1] is not None and accs[2] is not None
    assert run.final_accuracy == accs[2]
    # the progress line of each epoch shows the latest test accuracy (none before the first evaluation)
    assert labels[0] == "epoch 1/3" and labels[1] == "epoch 2/3"
    assert labels[2] == f"epoch 3/3 acc {accs[1]:.4f}"
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--resume", "--eval-every", "0"])
    assert r.exit_code == 2


def test_an_ensemble_of_run_directories_is_a_teacher(teacher_run, tmp_path):
    other = lc.train(lc.TrainConfig(out=str(tmp_path / "other"), seed=5, **{**COMMON, "epochs": 1}))
    ensemble = specs.resolve_teacher(f"{teacher_run.run_dir},{other.run_dir}")
    members = [specs.resolve_teacher(teacher_run.run_dir), specs.resolve_teacher(other.run_dir)]
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        mean_probs = sum(torch.softmax(m(x), 1) for m in members) / 2
        assert torch.allclose(ensemble(x).exp(), mean_probs, atol=1e-5)
    with pytest.raises(LogitcacheError, match="not run directories: nope"):
        specs.resolve_teacher(f"{teacher_run.run_dir},nope")


def test_cached_training_takes_the_dataset_from_the_cache_and_says_so(built_cache, tmp_path):
    args = ["train", "--kd", "cached", "--cache", str(built_cache), "--out", str(tmp_path / "r"),
            "--model", "small-resnet8-w4", "--epochs", "1", "--batch-size", "32", "--workers", "0"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "from the cache:" in line]
    assert len(said) == 1 and "tiny_dataset (first 240 samples)" in said[0] and "heavy_augment" in said[0]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["dataset"] == DATASET and config["limit"] == 240 and config["augment"].endswith(":heavy_augment")


def test_the_evaluation_loaders_workers_start_at_setup_before_any_thread(tmp_path):
    # Forked after an epoch, while the rank's threads ran, one of them hung under torchrun (benchmarks/RESULTS.md).
    import sys
    import threading

    module = sys.modules["logitcache.student.loop"]
    cfg = module._with_recorded_data(lc.TrainConfig(out=str(tmp_path / "r"), **{**COMMON, "workers": 1}))
    before = {t.ident for t in threading.enumerate()}
    run = module._setup(cfg)
    try:
        workers = run.test_loader._iterator._workers
        assert workers and all(w.is_alive() for w in workers)
        assert run.loader._iterator is None  # the training loader's start after set_epoch, as documented
        started = [t.name for t in threading.enumerate() if t.ident not in before]
        assert set(started) <= {"QueueFeederThread"}  # the loader's own queue feeder only: no logitcache thread yet
    finally:
        run.test_loader._iterator._shutdown_workers()


def test_deterministic_holds_for_the_run_and_the_process_setting_comes_back(tmp_path, monkeypatch):
    """--deterministic turns on deterministic algorithms for the run (seen from inside a step) and train() restores
    the caller's setting, so a library call leaves no global state behind."""
    module = __import__("sys").modules["logitcache.student.loop"]
    seen = []
    real = module.step_loss

    def spy(run, batch, step):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(run, batch, step)

    monkeypatch.setattr(module, "step_loss", spy)
    before = torch.are_deterministic_algorithms_enabled()
    lc.train(lc.TrainConfig(out=str(tmp_path / "r"), **{**COMMON, "epochs": 1}, limit=64, deterministic=True))
    assert seen and all(seen) and torch.are_deterministic_algorithms_enabled() == before


def test_a_training_graph_that_fails_to_compile_falls_back_at_the_first_step(tmp_path, monkeypatch):
    """The compile check at setup passes (evaluation mode); the training graph then fails at its first step (as a
    backward that cannot compile would): the run goes on uncompiled with one warning."""
    module = __import__("sys").modules["logitcache.student.loop"]

    class FailsInTraining(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            if self.training:
                raise RuntimeError("BackendCompilerFailed: cannot compile the backward graph")
            return self._orig_mod(x)

    monkeypatch.setattr(module, "compiled", lambda model, check: FailsInTraining(model))
    cfg = lc.TrainConfig(out=str(tmp_path / "r"), **{**COMMON, "epochs": 1}, limit=64, compile=True)
    with pytest.warns(UserWarning, match="the training step cannot compile .*BackendCompilerFailed"):
        result = lc.train(cfg)
    assert result.metrics[-1]["train_loss"] > 0
