"""Time to accuracy measured as the literature does (Blakeney et al. 2022; Composer's methodology).

With warm-up + cosine decay the last epochs decide the final accuracy, so "the epoch at which a long run first crosses
the target" measures the schedule, not the teacher. Instead every arm trains *complete* schedules at several budgets
(fractions of the full budget), and its time to accuracy is the smallest budget whose final accuracy, averaged over
seeds, reaches the target. The speedup is the full budget divided by that budget.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path


def budget_epochs(full_epochs: int, fraction: float) -> int:
    """The epochs of a complete schedule at ``fraction`` of the full budget (at least one)."""
    return max(1, round(full_epochs * fraction))


@dataclass
class Arm:
    """One arm's runs by budget: final test accuracy, wall seconds and teacher forward passes, one per seed."""

    name: str
    finals: dict[int, list[float]] = field(default_factory=dict)
    seconds: dict[int, list[float]] = field(default_factory=dict)
    forwards: dict[int, list[int]] = field(default_factory=dict)

    def add(self, epochs: int, accuracy: float, seconds: float, forwards: int = 0) -> None:
        self.finals.setdefault(epochs, []).append(accuracy)
        self.seconds.setdefault(epochs, []).append(seconds)
        self.forwards.setdefault(epochs, []).append(forwards)

    def mean(self, epochs: int) -> float:
        return statistics.mean(self.finals[epochs])

    def sd(self, epochs: int) -> float:
        accs = self.finals[epochs]
        return statistics.stdev(accs) if len(accs) > 1 else 0.0

    def epochs_to(self, target: float) -> int | None:
        """The smallest budget (epochs) whose mean final accuracy reaches ``target``; None if none does."""
        reached = [e for e in sorted(self.finals) if self.mean(e) >= target]
        return reached[0] if reached else None

    def speedup(self, target: float, full_epochs: int) -> float | None:
        epochs = self.epochs_to(target)
        return full_epochs / epochs if epochs else None


# two-sided 95% quantiles of Student's t by degrees of freedom (1..30); above, the normal's 1.96
_T95 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042)  # fmt: skip


@dataclass(frozen=True)
class Lift:
    """A paired comparison in percentage points: the mean of ``arm - baseline`` over seeds and its 95% interval."""

    n: int
    mean: float
    low: float
    high: float

    def text(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} pp"
        return f"{self.mean:+.2f} pp [{self.low:+.2f}, {self.high:+.2f}]"

    def as_dict(self) -> dict[str, float]:
        rounded = {"mean_pp": self.mean, "low_pp": self.low, "high_pp": self.high}
        return {"n": self.n, **{k: round(v, 3) for k, v in rounded.items()}}


def paired_lift(baseline: list[float], arm: list[float]) -> Lift:
    """``arm`` against ``baseline``, seed by seed (lists in the same seed order; the shorter decides the pairs):
    the mean difference in pp and its 95% t-interval, which is wide when few seeds disagree."""
    diffs = [(a - b) * 100 for a, b in zip(arm, baseline)]
    if not diffs:
        return Lift(0, float("nan"), float("nan"), float("nan"))
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return Lift(1, mean, mean, mean)
    half = (_T95[len(diffs) - 2] if len(diffs) - 1 <= len(_T95) else 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return Lift(len(diffs), mean, mean - half, mean + half)


def plot_budgets(arms: list[Arm], path: Path, title: str, target: float, full_epochs: int) -> bool:
    """Final accuracy (mean, min-max over seeds) against the budget, one line per arm; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; set here, where a figure is drawn, not at import
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        xs = sorted(arm.finals)
        means = [arm.mean(e) for e in xs]
        lows = [min(arm.finals[e]) for e in xs]
        highs = [max(arm.finals[e]) for e in xs]
        fractions = [e / full_epochs for e in xs]
        line = ax.plot(fractions, means, marker="o", label=arm.name)[0]
        if any(len(arm.finals[e]) > 1 for e in xs):
            ax.fill_between(fractions, lows, highs, color=line.get_color(), alpha=0.15)
    ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.4f}")
    ax.set_xlabel("training budget (fraction of run 1's epochs; complete schedules)")
    ax.set_ylabel("final test accuracy (mean; band = min-max over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
