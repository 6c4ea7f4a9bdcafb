"""A sequence of training runs that teach each other (a hyperparameter sweep, periodic retraining): which finished run
teaches the next, one cache per teacher, built once, and what the whole sequence cost.

A sequence is a folder every process of the sweep can reach: a local disk, a filesystem machines share, or an object
store (``s3://bucket/prefix``; ``logitcache.sequence.folder``):

- ``members/NNNNNN.json``: one object per finished run, numbered in the order they were recorded (its run directory,
  metric, wall time, teacher passes, teacher);
- ``builds/NNNNNN.json``: one object per finished cache build (its teacher, wall time, teacher passes);
- ``caches/<teacher>/``: the cache of each teacher, and ``caches/<teacher>.lock/NNNNNN.json`` while a process builds it;
- in an object store, ``runs/<member>-<weights' sha256>/``: each recorded run's model and records, so that any machine
  can build from it.

The teacher is a pure function of the recorded members (in their order) and the policy, so every process names the
same teacher without asking the others. Records, and the claim to build a cache, are objects created only if absent
(atomic on a filesystem and in an object store): a number is taken by one process only. The builder rewrites its lock
while it works; others wait for the cache (or take the previous one); a lock whose builder died (its process gone, or
its lock not rewritten for ``stale_s``, measured against a probe the store stamps with the same clock: no two
machines' clocks are compared) is taken over by creating the next lock number, which one process alone can do, and
the build resumes where it stopped. Sweep engines (a plain loop, Optuna, Ray Tune, a W&B agent) call this API from
their workers; the sequence schedules nothing itself. ``logitcache sweep`` runs a grid through it on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcache.config import BuildConfig
from logitcache.errors import LogitcacheError
from logitcache.sequence.folder import SharedFolder
from logitcache.read.procs import alive

POLICIES = ("best", "fixed", "ensemble")
MEMBERS, BUILDS, CACHES, RUNS = "members", "builds", "caches", "runs"
# what a recorded run keeps in an object store: enough to teach (model and weights) and to be reported
RUN_FILES = ("config.json", "metrics.jsonl", "model.json", "model.safetensors")
_NUMBERED = re.compile(r"^(\d{6})\.json$")


@dataclass(frozen=True)
class Member:
    """One finished run: ``metric`` (higher is better: the final test accuracy unless given), its wall time and
    teacher forward passes (online KD's; a cache's are counted once, in its build), the teacher it learned from
    (a teacher key, None from scratch) and the settings that tell it apart."""

    name: str
    run_dir: str
    metric: float
    seconds: float
    samples: int  # training samples seen (epochs x training set): the unit of the from-scratch estimate
    teacher_forwards: int = 0
    teacher: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildRecord:
    """One finished build of a teacher's cache."""

    teacher: str
    members: tuple[str, ...]
    path: str
    seconds: float
    teacher_forwards: int


@dataclass(frozen=True)
class Policy:
    """Which recorded runs teach. ``best``: the best run so far, replaced only by a run better by more than
    ``margin`` (a new cache is built only when it pays); ``fixed``: the run named ``member``; ``ensemble``: the
    ``size`` best runs so far (mean of their probabilities), a run entering only when it beats the weakest by more
    than ``margin``. Spec strings: ``best``, ``best:0.005``, ``fixed:NAME``, ``ensemble:3``, ``ensemble:3:0.005``."""

    kind: str = "best"
    margin: float = 0.0
    member: str | None = None
    size: int = 3

    @classmethod
    def parse(cls, spec: str) -> "Policy":
        kind, _, rest = spec.partition(":")
        try:
            if kind == "best":
                return cls("best", float(rest or 0))
            if kind == "fixed" and rest:
                return cls("fixed", member=rest)
            if kind == "ensemble":
                size, _, margin = rest.partition(":")
                return cls("ensemble", float(margin or 0), size=int(size or 3))
        except ValueError:
            pass
        raise LogitcacheError(
            f"unknown teacher policy {spec!r}: use best, best:MARGIN, fixed:MEMBER, ensemble:N or ensemble:N:MARGIN"
        )

    def choose(self, members: list[Member]) -> tuple[Member, ...]:
        """The teaching runs after ``members`` (in recorded order); empty before the first one."""
        if self.kind == "fixed":
            return tuple(m for m in members if m.name == self.member)[:1]
        chosen: list[Member] = []
        size = 1 if self.kind == "best" else self.size
        for m in members:
            if len(chosen) < size:
                chosen.append(m)
                continue
            weakest = min(chosen, key=lambda c: c.metric)
            if m.metric > weakest.metric + self.margin:
                chosen[chosen.index(weakest)] = m
        return tuple(sorted(chosen, key=lambda c: c.name))


def teacher_key(members: tuple[Member, ...]) -> str:
    """The folder name of a teacher's cache: its members' names, made safe for a path."""
    return "+".join(re.sub(r"[^A-Za-z0-9._=-]+", "_", m.name) for m in members)


class Sequence:
    """The sequence in folder ``root`` (a path or an fsspec URL). ``build``: how each teacher's cache is built
    (dataset, augmentation, views, encoding, ...; its ``teacher`` and ``out`` are the sequence's), ``policy`` which
    runs teach (``Policy`` or its spec string). ``stale_s``: a lock unchanged for that long is a dead builder's."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        build: BuildConfig | None = None,
        policy: Policy | str = "best",
        stale_s: float = 120.0,
        poll_s: float = 1.0,
    ):
        self.folder = SharedFolder(root)
        self.root = str(self.folder)
        self.build_config = build or BuildConfig(dataset="fashion-mnist")
        self.policy = Policy.parse(policy) if isinstance(policy, str) else policy
        self.stale_s, self.poll_s = stale_s, poll_s
        self._adopt_line_records()

    def _adopt_line_records(self) -> None:
        """A folder whose records are lines (``members.jsonl``, ``builds.jsonl``, an earlier layout) gets them as
        numbered objects, in their order; the files are kept, renamed ``*.jsonl.adopted``."""
        for kind in () if self.folder.remote else (MEMBERS, BUILDS):
            lines = Path(self.root, f"{kind}.jsonl")
            if lines.exists():
                rows = [line for line in lines.read_text().splitlines() if line.strip()]
                for number, line in enumerate(rows):
                    self.folder.create(f"{kind}/{number:06d}.json", line.encode())  # idempotent: another may too
                try:
                    lines.rename(lines.with_name(lines.name + ".adopted"))
                except FileNotFoundError:
                    pass

    # --- what happened ---------------------------------------------------------------------------------------------

    @property
    def members(self) -> list[Member]:
        return [Member(**row) for _, row in self._records(MEMBERS)]

    @property
    def builds(self) -> list[BuildRecord]:
        return [BuildRecord(**{**row, "members": tuple(row["members"])}) for _, row in self._records(BUILDS)]

    def _records(self, kind: str) -> list[tuple[int, dict[str, Any]]]:
        """The ``(number, record)`` pairs of ``kind``, in the order they were recorded (the first of a name wins)."""
        rows, names = [], set()
        for number in self._numbers(kind):
            body = self.folder.read(_numbered(kind, number))
            if body is not None:
                row = json.loads(body)
                if kind != MEMBERS or row["name"] not in names:
                    rows.append((number, row))
                    names.add(row.get("name"))
        return rows

    def _append(self, kind: str, row: dict[str, Any]) -> int:
        """Record ``row`` under the next free number (the creation is atomic: concurrent records never collide)."""
        while True:
            number = max(self._numbers(kind), default=-1) + 1
            if self.folder.create(_numbered(kind, number), json.dumps(row).encode()):
                return number

    def _numbers(self, folder: str) -> list[int]:
        """The numbers of the numbered objects in ``folder`` (records or locks), in increasing order."""
        return [int(m.group(1)) for m in map(_NUMBERED.match, self.folder.names(folder)) if m]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def record(
        self,
        run_dir: str | os.PathLike,
        *,
        name: str | None = None,
        metric: float | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Member:
        """Record a finished run (a ``logitcache train`` run directory): its metric (default: the final test
        accuracy), wall time, samples, teacher passes and teacher come from its own records. A name already recorded
        is refused: a member is recorded once."""
        run = Path(run_dir)
        try:
            config = json.loads((run / "config.json").read_text())
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise LogitcacheError(f"{run} is not a finished `logitcache train` run: {e}") from None
        if not rows or len(rows) != config["epochs"]:
            raise LogitcacheError(f"{run} has not finished ({len(rows)} of {config['epochs']} epochs)")
        last = rows[-1]
        cache = config.get("cache") if config.get("kd") == "cached" else None
        name = name or run.name
        if self.member(name) is not None:
            raise LogitcacheError(f"the sequence already has a member named {name!r}")
        member = Member(
            name=name,
            run_dir=self._publish(run, name),
            metric=float(metric if metric is not None else last["test_accuracy"]),
            seconds=float(last["wall_seconds"]),
            samples=int(config["epochs"]) * _train_size(config),
            teacher_forwards=int(last.get("teacher_forwards", 0)),
            teacher=self._key_of_cache(cache) if cache else None,
            settings=dict(settings or {}),
        )
        number = self._append(MEMBERS, dataclasses.asdict(member))
        if next(n for n, row in self._records(MEMBERS) if row["name"] == name) != number:  # recorded at once elsewhere
            self.folder.remove(_numbered(MEMBERS, number))
            raise LogitcacheError(f"the sequence already has a member named {name!r}")
        return member

    def _publish(self, run: Path, name: str) -> str:
        """Where every process finds the run: its own folder on a filesystem; in an object store, a copy of its
        files under a name its weights make unique (two processes recording one name never mix their files)."""
        if not self.folder.remote:
            return str(run.resolve())
        try:
            files = {file: (run / file).read_bytes() for file in RUN_FILES}
        except OSError as e:
            raise LogitcacheError(f"{run} cannot teach: {e.strerror}: {e.filename}") from None
        folder = f"{RUNS}/{name}-{hashlib.sha256(files['model.safetensors']).hexdigest()[:12]}"
        for file, body in files.items():
            self.folder.write(f"{folder}/{file}", body)
        return self.folder.path(folder)

    # --- who teaches -----------------------------------------------------------------------------------------------

    def teacher(self) -> tuple[Member, ...]:
        """The runs that teach the next run under the policy (empty: the next run trains from scratch)."""
        return self.policy.choose(self.members)

    def cache_path(self, teacher: tuple[Member, ...]) -> str:
        return self.folder.path(f"{CACHES}/{teacher_key(teacher)}")

    def cache(self, *, wait: bool = True, launch: Callable[[BuildConfig], None] | None = None) -> str | None:
        """The path of the current teacher's complete cache, built here if no process has built it (None while no
        run is recorded). Another process building it: wait for it, or (``wait=False``) take the newest complete
        cache of an earlier teacher (None if there is none). ``launch(cfg)`` runs the build (default:
        ``logitcache.teacher.build``, in this process)."""
        teacher = self.teacher()
        if not teacher:
            return None
        key, path = teacher_key(teacher), self.cache_path(teacher)
        while True:
            if _complete(path) and not self._locks(key):
                return path
            claimed = self._claim(key)
            if claimed:
                try:
                    if not _complete(path):  # a builder judged dead may have finished after all
                        self._build(teacher, path, launch)
                finally:
                    claimed.release()
                return path
            if not wait:
                return self._previous_cache()
            time.sleep(self.poll_s)

    def next_run(self, *, wait: bool = True, launch: Callable[[BuildConfig], None] | None = None) -> dict[str, Any]:
        """What the next run of the sequence needs, as ``TrainConfig`` fields: the sequence's data (its build's
        dataset, limit and augmentation) and cached KD from the current teacher's cache (the library's recipe
        otherwise: KD for the first half of training), or plain training before any run is recorded."""
        cache = self.cache(wait=wait, launch=launch)
        cfg = self.build_config
        data = {"dataset": cfg.dataset, "limit": cfg.limit, "augment": cfg.augment}
        return {**data, "kd": "none"} if cache is None else {**data, "kd": "cached", "cache": cache}

    def report(self) -> "SequenceReport":
        return SequenceReport(self.members, self.builds)

    # --- building --------------------------------------------------------------------------------------------------

    def _build(self, teacher: tuple[Member, ...], path: str, launch: Callable[[BuildConfig], None] | None) -> None:
        from logitcache.teacher.build import build
        from logitcache.store import is_store, open_cache

        local = tempfile.mkdtemp(prefix="logitcache-teachers-") if self.folder.remote else None
        try:
            cfg = dataclasses.replace(
                self.build_config,
                teacher=",".join(self._local_run(m, local) for m in teacher),
                out=path,
                resume=is_store(path),  # a build a dead builder left midway continues
                overwrite=False,
            )
            start = time.perf_counter()
            (launch or build)(cfg)
            seconds = time.perf_counter() - start
        finally:
            if local:
                shutil.rmtree(local, ignore_errors=True)
        cache = open_cache(path)
        if not cache.is_complete:
            raise LogitcacheError(f"the build of {path} did not finish")
        probe = cache.meta.table.probe if cache.meta.table is not None else 0
        record = BuildRecord(
            teacher_key(teacher),
            tuple(m.name for m in teacher),
            path,
            round(seconds, 3),
            cache.num_views * cache.num_samples + probe,
        )
        self._append(BUILDS, dataclasses.asdict(record))

    def _local_run(self, member: Member, into: str | None) -> str:
        """A run directory of ``member`` on this machine (fetched from the object store into ``into``)."""
        if into is None:
            return member.run_dir
        run = Path(into, member.name)
        run.mkdir(parents=True)
        for file in RUN_FILES:
            body = self.folder.read(f"{member.run_dir.removeprefix(self.root + '/')}/{file}")
            if body is None:
                raise LogitcacheError(f"{member.run_dir}/{file} is missing: member {member.name} cannot teach")
            (run / file).write_bytes(body)
        return str(run)

    # --- who builds: numbered locks, each created by one process only -----------------------------------------------

    def _locks(self, key: str) -> list[int]:
        return self._numbers(f"{CACHES}/{key}.lock")

    def _claim(self, key: str) -> "_BuildLock | None":
        """This process's claim to build ``key``'s cache, or None while a live builder holds it. A dead builder's
        lock N is taken over by creating lock N + 1, which only one process can do."""
        folder, locks = f"{CACHES}/{key}.lock", self._locks(key)
        if locks and not self._stale(_numbered(folder, locks[-1])):
            return None
        claim = _BuildLock(self.folder, _numbered(folder, locks[-1] + 1 if locks else 0), max(0.05, self.stale_s / 6))
        if not self.folder.create(claim.name, claim.body()):
            return None
        for number in locks:  # the dead builders' locks
            self.folder.remove(_numbered(folder, number))
        claim.start()
        return claim

    def _stale(self, lock: str) -> bool:
        """Whether ``lock``'s builder is dead: its process gone (on this machine), or its lock not rewritten for
        ``stale_s`` (or six of its own beat intervals, if longer), as the store's clock tells (``SharedFolder.age``)."""
        body = self.folder.read(lock)
        if body is None:
            return False  # just released: the next look finds the cache
        try:
            owner = json.loads(body)
        except ValueError:
            return False
        if owner.get("host") == socket.gethostname() and not alive(int(owner.get("pid", 0))):
            return True
        age = self.folder.age(lock)
        return age is not None and age > max(self.stale_s, 6 * float(owner.get("interval", 0)))

    def _previous_cache(self) -> str | None:
        done = [b for b in self.builds if _complete(b.path)]
        return done[-1].path if done else None

    def _key_of_cache(self, cache: str) -> str | None:
        caches = self.folder.path(CACHES)
        path = cache if self.folder.remote else str(Path(cache).resolve())
        return path.rsplit("/", 1)[-1] if path.rsplit("/", 1)[0] == caches else str(cache)


@dataclass
class SequenceReport:
    """What the sequence cost and gave: every run and build, their sums, the best member, and the same members
    trained from scratch (measured where a member trained from scratch, else estimated from the first such member's
    seconds per training sample; ``estimated`` counts those)."""

    members: list[Member]
    builds: list[BuildRecord]

    @property
    def run_seconds(self) -> float:
        return sum(m.seconds for m in self.members)

    @property
    def build_seconds(self) -> float:
        return sum(b.seconds for b in self.builds)

    @property
    def total_seconds(self) -> float:
        return self.run_seconds + self.build_seconds

    @property
    def teacher_forwards(self) -> int:
        return sum(m.teacher_forwards for m in self.members) + sum(b.teacher_forwards for b in self.builds)

    @property
    def best(self) -> Member | None:
        return max(self.members, key=lambda m: m.metric) if self.members else None

    def scratch_seconds(self) -> tuple[float | None, int]:
        """The members' total from scratch, and how many of its terms are estimates (None: no member trained from
        scratch, so nothing to estimate from)."""
        scratch = [m for m in self.members if m.teacher is None]
        if not scratch:
            return None, 0
        per_sample = scratch[0].seconds / max(1, scratch[0].samples)
        total, estimated = 0.0, 0
        for m in self.members:
            if m.teacher is None:
                total += m.seconds
            else:
                total += per_sample * m.samples
                estimated += 1
        return total, estimated

    def teacher_changes(self) -> list[int]:
        """Positions of the members whose teacher differs from the previous member's."""
        return [i for i in range(1, len(self.members)) if self.members[i].teacher != self.members[i - 1].teacher]

    def summary(self) -> dict[str, Any]:
        scratch, estimated = self.scratch_seconds()
        best = self.best
        return {
            "members": len(self.members),
            "builds": len(self.builds),
            "run_seconds": round(self.run_seconds, 1),
            "build_seconds": round(self.build_seconds, 1),
            "total_seconds": round(self.total_seconds, 1),
            "teacher_forwards": self.teacher_forwards,
            "scratch_seconds": None if scratch is None else round(scratch, 1),
            "scratch_estimated_members": estimated,
            "best": None if best is None else {"name": best.name, "metric": best.metric, "run_dir": best.run_dir},
        }

    def plot(self, path: str | os.PathLike, title: str = "the sequence") -> bool:
        """Each member's metric in order, the teacher changes marked; False when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(self.members) + 2), 3.6))
        xs = list(range(1, len(self.members) + 1))
        teachers = [m.teacher or "from scratch" for m in self.members]
        for name in dict.fromkeys(teachers):
            points = [(x, m.metric) for x, m, t in zip(xs, self.members, teachers) if t == name]
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=f"teacher: {name}", zorder=3)
        ax.plot(xs, [m.metric for m in self.members], color="0.7", zorder=1)
        for i in self.teacher_changes():
            ax.axvline(i + 0.5, color="0.5", linestyle=":", linewidth=1)
        ax.set_xticks(xs, [m.name for m in self.members], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("final test accuracy")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


def _numbered(folder: str, number: int) -> str:
    return f"{folder}/{number:06d}.json"


class _BuildLock:
    """A claimed build: the lock is rewritten (its beat counted up) every ``interval`` seconds until ``release``."""

    def __init__(self, folder: SharedFolder, name: str, interval: float):
        self.folder, self.name, self.interval, self.beats = folder, name, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="logitcache-lock", daemon=True)

    def body(self) -> bytes:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "interval": self.interval, "beat": self.beats}
        return json.dumps(owner).encode()

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.beats += 1
            try:
                if self.folder.read(self.name) is None:
                    return  # taken over (judged dead) and removed: never recreated
                self.folder.write(self.name, self.body())
            except OSError:
                continue  # a failed request (a timeout, throttling): the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.folder.remove(self.name)
        self.folder.prune(self.name.rsplit("/", 1)[0])


def _complete(path: str) -> bool:
    from logitcache.store import is_store, open_cache

    if not is_store(path):
        return False
    try:
        return open_cache(path).is_complete
    except LogitcacheError:
        return False


def _train_size(config: dict[str, Any]) -> int:
    """The training set's size of a run, from its config (``limit``, else the cache's or the dataset's length)."""
    if config.get("limit"):
        return int(config["limit"])
    from logitcache import specs
    from logitcache.datasets import dataset_len

    return dataset_len(specs.resolve_dataset(config.get("dataset") or "fashion-mnist", train=True))
