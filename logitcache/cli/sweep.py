"""``logitcache sweep``: a grid of training settings run one after another through a
``logitcache.sequence.runs.Sequence``.

Each member trains (and each teacher's cache builds) in a child process, so the live table here runs no thread next to
the DataLoader workers; the table is redrawn from the children's own records (metrics.jsonl, the store's completion).
A sweep killed midway continues where it stopped: recorded members are skipped, a member cut short resumes from its
last finished epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from logitcache.config import BuildConfig, TrainConfig

from logitcache.cli.options import flag_of

out = Console()

# train options a member may not set: the sweep decides them
_RESERVED = ("out", "kd", "cache", "teacher", "resume", "overwrite", "progress")


def parse_settings(grid: list[str], fixed: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``--set k=v`` and ``--grid k=v1,v2`` as TrainConfig fields (typed by the field), and the grid's members in
    order (the product of the grid's values, the first key varying slowest)."""
    hints = typing.get_type_hints(TrainConfig)

    def field_of(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or name not in hints:
            raise typer.BadParameter(f"{text!r}: expected KEY=VALUE with KEY an option of `logitcache train`")
        if name in _RESERVED:
            raise typer.BadParameter(f"{flag_of(name)} is decided by the sweep")
        return name, value

    def typed(name: str, value: str) -> Any:
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        kind = args[0]
        if value.lower() == "none" and type(None) in typing.get_args(tp):
            return None
        try:
            if kind is bool:
                return value.lower() in ("1", "true", "yes", "on")
            return kind(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{flag_of(name)}={value}: not a {kind.__name__}") from None

    base = {}
    for text in fixed:
        name, value = field_of(text)
        base[name] = typed(name, value)
    axes = []
    for text in grid:
        name, values = field_of(text)
        axes.append([(name, typed(name, v)) for v in values.split(",") if v])
    members = [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]
    return base, members


def member_name(setting: dict[str, Any]) -> str:
    return ",".join(f"{k.replace('_', '-')}={v:g}" if isinstance(v, float) else f"{k.replace('_', '-')}={v}"
                    for k, v in setting.items()) or "member"  # fmt: skip


def config_args(cfg: Any) -> list[str]:
    """A config (``TrainConfig``, ``BuildConfig``) as its command's options."""
    args: list[str] = []
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if not meta.get("cli", True):
            continue
        if "flag" in meta:
            if (not value) if meta["flag"] == "--quiet" else value:
                args.append(meta["flag"])
        elif value is not None:
            args += [flag_of(f.name), str(value)]
    if isinstance(cfg, BuildConfig):
        for key, value in cfg.options.items():
            args += [flag_of(key), str(value)]
    return args


class _View:
    """The live table: one row per member, redrawn from the sequence's records and the running child's files."""

    def __init__(self, names: list[str], seq) -> None:
        self.names, self.seq = names, seq
        self.status: dict[str, str] = {}

    def __rich__(self) -> Table:
        members = {m.name: m for m in self.seq.members}
        table = Table(title=f"sweep in {self.seq.root} (teacher policy: {self.seq.policy.kind})")
        for col in ("#", "member", "teacher", "status", "final acc", "time s", "teacher fwd"):
            table.add_column(col, justify="right" if col in ("#", "final acc", "time s", "teacher fwd") else "left")
        for i, name in enumerate(self.names, 1):
            m = members.get(name)
            if m is not None:
                table.add_row(str(i), name, m.teacher or "-", "done", f"{m.metric:.4f}", f"{m.seconds:.0f}",
                              f"{m.teacher_forwards:,}")  # fmt: skip
            else:
                table.add_row(str(i), name, "", self.status.get(name, "waiting"), "", "", "")
        return table


def _watch(cmd: list[str], live: Live, view: _View, name: str, progress) -> None:
    """Run ``cmd`` as a child; redraw the table every second with ``progress()``'s status; its error as one line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            view.status[name] = progress()
            live.refresh()
            time.sleep(1.0)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
        raise typer.Exit(_fail(f"{name}: {last[0].removeprefix('error: ')}"))


def _fail(message: str) -> int:
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {message}")
    return 1


def _epochs_done(run_dir: Path, epochs: int) -> str:
    try:
        done = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        done = 0
    return f"training, epoch {min(done + 1, epochs)}/{epochs}"


def sweep(
    out_dir: Path = typer.Option(..., "--out", help="Folder of the sequence: members' runs, caches, records, report."),
    grid: Optional[list[str]] = typer.Option(
        None, help="KEY=V1,V2,...: a `logitcache train` option and its values; several --grid make a product."
    ),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="KEY=VALUE: a `logitcache train` option every member shares (e.g. epochs=3)."
    ),
    policy: str = typer.Option(
        "best",
        help="Which finished run teaches: best (the best so far), best:MARGIN (replaced only by a run better by more "
        "than MARGIN, so a new cache is built only when it pays), fixed:MEMBER, ensemble:N[:MARGIN].",
    ),
    views: int = typer.Option(BuildConfig.views, min=1, help="Views of each teacher's cache."),
    encoding: str = typer.Option(BuildConfig.encoding, help="Encoding of each teacher's cache (as `build`)."),
    plot: bool = typer.Option(True, help="Write sequence.png (accuracy per member, teacher changes marked)."),
) -> None:
    """Train a grid of settings one after another, each member distilled from the best run so far (one cache per
    teacher, built once); resumable; a table of members and a report of the whole sequence's cost."""
    from logitcache.errors import LogitcacheError
    from logitcache.sequence.runs import Sequence
    from logitcache.store import open_cache

    try:
        if re.match(r"^[a-z][a-z0-9+.-]*:/", str(out_dir)):  # a URL, which Path has already folded
            raise LogitcacheError(
                "sweep trains its members on this machine and keeps the sequence in a local or shared folder; for a "
                "sequence in an object store, call logitcache.sequence.runs.Sequence from your sweep engine's workers"
            )
        base, settings = parse_settings(grid or [], set_ or [])
        names = [member_name(s) for s in settings]
        if len(set(names)) != len(names):
            raise typer.BadParameter("the grid names some member twice")
        train_base = TrainConfig(**{**base, "out": ""})
        build_cfg = BuildConfig(
            dataset=train_base.dataset or "fashion-mnist", augment=train_base.augment or BuildConfig.augment,
            limit=train_base.limit, views=views, encoding=encoding, workers=train_base.workers,
            device=train_base.device, progress=False,
        )  # fmt: skip
        seq = Sequence(out_dir, build=build_cfg, policy=policy)
    except LogitcacheError as e:
        raise typer.Exit(_fail(str(e))) from None
    view = _View(names, seq)
    runs = out_dir / "runs"
    start = time.perf_counter()
    try:
        with Live(view, console=out, auto_refresh=False) as live:
            for name, setting in zip(names, settings):
                if seq.member(name) is not None:
                    continue
                run_dir = runs / name

                def launch(cfg: BuildConfig, name: str = name) -> None:
                    path = Path(cfg.out)

                    def built() -> str:
                        try:
                            return f"building the teacher's cache, {open_cache(path).completion().mean():.0%}"
                        except LogitcacheError:
                            return "building the teacher's cache"

                    cmd = [sys.executable, "-m", "logitcache", "build", *config_args(cfg)]
                    _watch(cmd, live, view, name, built)

                view.status[name] = "waiting for the teacher's cache"
                live.refresh()
                kd = seq.next_run(launch=launch)
                cfg = TrainConfig(**{**base, **setting, **kd, "out": str(run_dir), "progress": False})
                finished = _finished(run_dir, cfg.epochs)
                if not finished:
                    cfg = dataclasses.replace(cfg, resume=(run_dir / "checkpoint.safetensors").exists(),
                                              overwrite=not (run_dir / "checkpoint.safetensors").exists())  # fmt: skip
                    cmd = [sys.executable, "-m", "logitcache", "train", *config_args(cfg)]
                    _watch(cmd, live, view, name, lambda: _epochs_done(run_dir, cfg.epochs))
                seq.record(run_dir, name=name, settings=setting)
                live.refresh()
    except KeyboardInterrupt:
        raise typer.Exit(_fail("interrupted: rerun the same command to continue where the sweep stopped")) from None
    except LogitcacheError as e:
        raise typer.Exit(_fail(str(e))) from None
    _report(seq, out_dir, plot, time.perf_counter() - start)


def _finished(run_dir: Path, epochs: int) -> bool:
    try:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return False
    return len(rows) == epochs and (run_dir / "model.safetensors").exists()


def _report(seq, out_dir: Path, plot: bool, wall: float) -> None:
    report = seq.report()
    summary = report.summary()
    scratch, estimated = report.scratch_seconds()
    (out_dir / "report.json").write_text(json.dumps({**summary, "members": [dataclasses.asdict(m) for m in
                                         report.members], "builds": [dataclasses.asdict(b) for b in report.builds]},
                                         indent=1))  # fmt: skip
    best = report.best
    lines = [
        "",
        f"{summary['members']} members, {summary['builds']} builds: runs {report.run_seconds:.0f} s (their training "
        f"epochs) + builds {report.build_seconds:.0f} s = {report.total_seconds:.0f} s; teacher forward passes "
        f"{report.teacher_forwards:,}; this command's wall time {wall:.0f} s (start-up, data loading and evaluation "
        "included)",
    ]
    if scratch is not None:
        lines.append(
            f"the same members from scratch: {scratch:.0f} s ({len(report.members) - estimated} measured, {estimated} "
            "estimated from the first scratch member's seconds per training sample)"
        )
    if best is not None:
        lines.append(f"best member: {best.name} ({best.metric:.4f}), {best.run_dir}")
    if plot and report.members and report.plot(out_dir / "sequence.png", f"sweep in {out_dir}"):
        lines.append(f"plot: {out_dir / 'sequence.png'}")
    lines.append(f"report: {out_dir / 'report.json'}")
    out.print("\n".join(lines))
