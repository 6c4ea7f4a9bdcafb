"""Sequences of runs: the policies name the right teacher, one cache per teacher is built once however many processes
ask, a killed sweep resumes without rerunning finished members, and the report adds up the runs' own records."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import logitcache as lc
from conftest import HELPERS
from logitcache.config import BuildConfig
from logitcache.errors import LogitcacheError
from logitcache.sequence.runs import Member, Policy, Sequence
from logitcache.student.loop import load_metrics

DATASET = f"{HELPERS}:tiny_dataset"
AUGMENT = f"{HELPERS}:light_augment"
TRAIN = ["--set", f"dataset={DATASET}", "--set", f"augment={AUGMENT}", "--set", "model=small-resnet8-w4",
         "--set", "epochs=2", "--set", "batch-size=32", "--set", "workers=0"]  # fmt: skip


def _members(*metrics: float) -> list[Member]:
    return [Member(f"m{i}", f"/runs/m{i}", acc, 1.0, 100) for i, acc in enumerate(metrics)]


def test_best_takes_the_best_run_so_far_and_a_margin_keeps_the_teacher_until_a_run_pays():
    runs = _members(0.80, 0.82, 0.825, 0.79, 0.84)
    best = Policy.parse("best")
    assert [best.choose(runs[: i + 1])[0].name for i in range(5)] == ["m0", "m1", "m2", "m2", "m4"]
    margin = Policy.parse("best:0.01")  # m2 beats m1 by 0.005 only: no new cache for it
    assert [margin.choose(runs[: i + 1])[0].name for i in range(5)] == ["m0", "m1", "m1", "m1", "m4"]
    assert best.choose([]) == ()


def test_fixed_and_ensemble_policies():
    runs = _members(0.80, 0.82, 0.78, 0.85, 0.81)
    fixed = Policy.parse("fixed:m2")
    assert fixed.choose(runs[:2]) == () and fixed.choose(runs)[0].name == "m2"
    ensemble = Policy.parse("ensemble:2")
    assert [m.name for m in ensemble.choose(runs[:1])] == ["m0"]
    assert [m.name for m in ensemble.choose(runs[:3])] == ["m0", "m1"]  # m2 is below both
    assert [m.name for m in ensemble.choose(runs)] == ["m1", "m3"]  # m3 replaced m0; m4 (0.81) is below m1 (0.82)
    close = _members(0.80, 0.82, 0.81)  # m2 beats the weakest (m0) by 0.01
    assert [m.name for m in ensemble.choose(close)] == ["m1", "m2"]
    assert [m.name for m in Policy.parse("ensemble:2:0.02").choose(close)] == ["m0", "m1"]
    with pytest.raises(LogitcacheError, match="unknown teacher policy"):
        Policy.parse("worst")


@pytest.mark.parametrize("sequence_root", ["local", "s3"], indirect=True)
def test_a_shared_folder_creates_an_object_once(sequence_root):
    from logitcache.sequence.folder import SharedFolder

    folder = SharedFolder(sequence_root[0])
    assert folder.create("locks/000000.json", b"first")
    assert not folder.create("locks/000000.json", b"second")  # If-None-Match: * / a hard link that exists
    assert folder.read("locks/000000.json") == b"first"
    folder.write("locks/000000.json", b"beat")
    assert folder.read("locks/000000.json") == b"beat" and folder.read("locks/missing.json") is None
    assert folder.create("locks/000001.json", b"x") and folder.names("locks") == ["000000.json", "000001.json"]
    folder.remove("locks/000000.json")
    assert folder.names("locks") == ["000001.json"] and folder.create("locks/000000.json", b"again")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "teacher"
    return lc.train(lc.TrainConfig(out=str(out), dataset=DATASET, augment=AUGMENT, model="small-resnet8-w4", epochs=1,
                                   batch_size=32, workers=0, progress=False))  # fmt: skip


_ASK = textwrap.dedent(
    """
    import os, sys, time
    from logitcache.teacher.build import build
    from logitcache.config import BuildConfig
    from logitcache.sequence.runs import Sequence

    root, dataset, augment, run, launches = sys.argv[1:6]

    def launch(cfg):
        with open(launches, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(2)  # the other process asks while this one builds
        build(cfg)

    seq = Sequence(root, build=BuildConfig(dataset=dataset, augment=augment, views=2, encoding="full",
                                           batch_size=32, chunk_rows=64, workers=0, progress=False), poll_s=0.2)
    print(seq.cache(launch=launch))
    seq.record(run, name=os.path.basename(run))  # both record a run at once: neither record is lost
    """
)


@pytest.fixture
def sequence_root(request, tmp_path, monkeypatch):
    """A sequence folder on the local disk, or in an S3 bucket (moto on loopback), and the environment for it."""
    if request.param == "local":
        return str(tmp_path / "seq"), {}
    import uuid

    import fsspec

    env = request.getfixturevalue("s3_env")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]})
    return f"s3://logitcache-test/seq-{uuid.uuid4().hex[:8]}", env


# the fast loop: the local folder; the full suite repeats the race in an S3 bucket
@pytest.mark.parametrize("sequence_root", ["local", pytest.param("s3", marks=pytest.mark.smoke)], indirect=True)
def test_two_processes_asking_at_once_build_one_cache_once(tmp_path, teacher_run, sequence_root):
    import shutil

    root, env = sequence_root
    seq = Sequence(root)
    seq.record(teacher_run.run_dir, name="teacher")
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(teacher_run.run_dir, run)
    launches = tmp_path / "launches"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ASK, root, DATASET, AUGMENT, str(run), str(launches)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        for run in runs
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert paths == {seq.folder.path("caches/teacher")}
    assert len(launches.read_text().split()) == 1  # built once
    assert len(seq.builds) == 1 and lc.open_cache(paths.pop()).is_complete
    assert sorted(m.name for m in seq.members) == ["a", "b", "teacher"]
    assert seq._locks("teacher") == [] and not Path(root, "caches", "teacher.lock").exists()
    if root.startswith("s3://"):  # every member's run is in the store, for any machine to build from
        assert all(m.run_dir.startswith(f"{root}/runs/{m.name}-") for m in seq.members)
        a = seq.member("a").run_dir.removeprefix(root + "/")
        assert seq.folder.read(f"{a}/model.safetensors") == (runs[0] / "model.safetensors").read_bytes()


def test_a_member_is_recorded_once_even_when_two_processes_record_it_at_once(tmp_path, teacher_run, monkeypatch):
    # both create their record (different numbers); the later sees the earlier and withdraws with a clear error
    seq = Sequence(tmp_path / "seq")
    first = seq._append("members", {**dataclasses.asdict(Member("x", "/runs/x", 0.5, 1.0, 10))})
    with pytest.raises(LogitcacheError, match="already has a member named 'x'"):
        seq.record(teacher_run.run_dir, name="x")
    assert [m.name for m in seq.members] == ["x"] and first == 0
    # the same race after the check: the record is created, found second, and removed
    seq._append("members", {**dataclasses.asdict(Member("y", "/runs/y", 0.5, 1.0, 10))})
    monkeypatch.setattr(Sequence, "member", lambda self, name: None)  # the check saw no 'y' yet
    with pytest.raises(LogitcacheError, match="already has a member named 'y'"):
        seq.record(teacher_run.run_dir, name="y")
    monkeypatch.undo()
    assert [m.name for m in seq.members] == ["x", "y"]
    assert sorted(os.listdir(tmp_path / "seq" / "members")) == ["000000.json", "000001.json"]


def test_a_dead_builders_lock_is_taken_over_and_its_build_resumed(tmp_path, teacher_run):
    root = tmp_path / "seq"
    seq = Sequence(root, build=BuildConfig(dataset=DATASET, augment=AUGMENT, views=2, encoding="full", batch_size=32,
                                           chunk_rows=64, workers=0, progress=False), poll_s=0.05)  # fmt: skip
    seq.record(teacher_run.run_dir, name="teacher")
    lock = root / "caches" / "teacher.lock" / "000000.json"
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "beat": 0}))
    path = seq.cache(wait=False)  # taken over at once: its process is gone
    assert lc.open_cache(path).is_complete and len(seq.builds) == 1 and not lock.parent.exists()


def test_a_lock_from_another_machine_is_stale_once_not_rewritten_for_stale_s_and_a_beating_one_never(
    tmp_path, teacher_run
):
    # The lock's age is its file's time against a probe's, so the test sets file times rather than waiting: no
    # scheduling delay changes the answer.
    seq = Sequence(tmp_path / "seq", build=BuildConfig(dataset=DATASET, augment=AUGMENT, views=1, encoding="full",
                                                       batch_size=32, chunk_rows=64, workers=0, progress=False),
                   stale_s=5, poll_s=0.05)  # fmt: skip
    seq.record(teacher_run.run_dir, name="teacher")
    lock = tmp_path / "seq" / "caches" / "teacher.lock" / "000000.json"
    lock.parent.mkdir(parents=True)
    for beat in range(5):  # a live builder on another machine: its lock rewritten before each look
        lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "beat": beat}))
        assert seq.cache(wait=False) is None  # never taken over, and no earlier cache to fall back on
    then = time.time() - 60
    os.utime(lock, (then, then))  # not rewritten for 60 s > stale_s: one look (a fresh process, wait=False) takes it
    path = Sequence(tmp_path / "seq", build=seq.build_config, stale_s=5).cache(wait=False)
    assert path is not None and lc.open_cache(path).is_complete and len(seq.builds) == 1 and not lock.parent.exists()


def _sweep(root: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "logitcache", "sweep", "--out", str(root), "--grid", "lr=0.05,0.1", "--views",
           "2", "--no-plot", *TRAIN, *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.smoke  # a sweep killed and resumed end to end
def test_a_killed_sweep_resumes_without_rerunning_finished_members_and_its_report_adds_up(tmp_path):
    root = tmp_path / "sweep"
    first = _sweep(root)
    first_member = root / "members" / "000000.json"
    deadline = time.time() + 240
    while not first_member.exists() and first.poll() is None:
        assert time.time() < deadline, "the first member never finished"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # mid-sweep: member 2's teacher cache is being built
    first.wait()
    done = Path(json.loads(first_member.read_text())["run_dir"])
    before = (done / "metrics.jsonl").stat().st_mtime_ns
    second = _sweep(root)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert (done / "metrics.jsonl").stat().st_mtime_ns == before  # not trained again
    seq = Sequence(root)
    assert [m.name for m in seq.members] == ["lr=0.05", "lr=0.1"]
    assert seq.members[0].teacher is None and seq.members[1].teacher == "lr=0.05"  # recorded before the kill
    # the report's sums are the runs' and builds' own records
    report = seq.report()
    walls = [load_metrics(m.run_dir)[-1]["wall_seconds"] for m in seq.members]
    assert report.run_seconds == pytest.approx(sum(walls))
    caches = [lc.open_cache(b.path) for b in seq.builds]
    assert len({b.teacher for b in seq.builds}) == len(seq.builds)  # one build per teacher
    assert report.teacher_forwards == sum(c.num_views * c.num_samples for c in caches)  # full: no table probe
    assert report.total_seconds == pytest.approx(sum(walls) + sum(b.seconds for b in seq.builds))
    summary = json.loads((root / "report.json").read_text())
    assert summary["best"]["metric"] == max(m.metric for m in seq.members)
    assert "2 members" in out


def test_an_optuna_study_drives_the_sequence(tmp_path):
    optuna = pytest.importorskip("optuna")  # the optional extra: logitcache[optuna]
    build = BuildConfig(dataset=DATASET, augment=AUGMENT, views=1, encoding="full", batch_size=32, chunk_rows=64,
                        workers=0, progress=False)  # fmt: skip
    seq = Sequence(tmp_path / "seq", build=build)

    def objective(trial):
        lr = trial.suggest_float("lr", 0.02, 0.2, log=True)
        name = f"trial-{trial.number}"
        cfg = lc.TrainConfig(out=str(tmp_path / "runs" / name), lr=lr, model="small-resnet8-w4", epochs=1,
                             batch_size=32, workers=0, progress=False, **seq.next_run())  # fmt: skip
        return seq.record(lc.train(cfg).run_dir, name=name, settings={"lr": lr}).metric

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path}/optuna.db",
                                sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip
    study.optimize(objective, n_trials=3)
    members = seq.members
    assert [m.name for m in members] == ["trial-0", "trial-1", "trial-2"]
    assert members[0].teacher is None and all(m.teacher for m in members[1:])
    assert study.best_value == max(m.metric for m in members)
    assert len(seq.builds) == len({m.teacher for m in members[1:]})
    # the report's sums are the runs' and builds' own records (the fast loop's check; the killed sweep repeats it)
    report = seq.report()
    walls = [load_metrics(m.run_dir)[-1]["wall_seconds"] for m in members]
    caches = [lc.open_cache(b.path) for b in seq.builds]
    assert report.run_seconds == pytest.approx(sum(walls))
    assert report.teacher_forwards == sum(c.num_views * c.num_samples for c in caches)  # full: no table probe
    assert report.total_seconds == pytest.approx(sum(walls) + sum(b.seconds for b in seq.builds))


def test_sweep_refuses_an_object_store_folder_in_one_line():
    from typer.testing import CliRunner

    from logitcache.cli import app

    result = CliRunner().invoke(app, ["sweep", "--out", "s3://bucket/sweep", "--grid", "lr=0.1,0.2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    flat = " ".join(result.output.split())
    assert "for a sequence in an object store, call logitcache.sequence.runs.Sequence" in flat


def test_a_sequence_recorded_as_lines_is_adopted_in_its_order(tmp_path):
    root = tmp_path / "seq"
    root.mkdir()
    rows = [dataclasses.asdict(m) for m in _members(0.80, 0.83, 0.81)]
    (root / "members.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seq = Sequence(root)
    assert [m.name for m in seq.members] == ["m0", "m1", "m2"] and seq.teacher()[0].name == "m1"
    assert not (root / "members.jsonl").exists() and (root / "members.jsonl.adopted").exists()
    assert [m.name for m in Sequence(root).members] == ["m0", "m1", "m2"]  # opened again: nothing doubled
