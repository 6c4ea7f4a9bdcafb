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
