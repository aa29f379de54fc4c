"""The flood as a picture: per persist mode (a column each), commits/s over time on top and
the backlog of every stage below. matplotlib comes with the optional `bench` extra; without
it the benchmark writes everything else and says how to get the plot."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from tidegate.bench.figures import rates
from tidegate.bench.model import FloodReport, ModeResult


def can_plot() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _backlogs(m: ModeResult) -> dict[str, tuple[list[float], list[int]]]:
    t = [p.t for p in m.timeline]
    series = {
        "to route (TASKS)": [p.submitted for p in m.timeline],
        "ready (READY)": [p.ready for p in m.timeline],
        "dispatched or running (WORK)": [p.work for p in m.timeline],
        "events to project": [p.events for p in m.timeline],
        "not terminal in the DB": [m.tasks - p.db_terminal for p in m.timeline],
    }
    if m.callbacks_expected:
        series["callbacks not received"] = [
            max(m.callbacks_expected - p.callbacks, 0) for p in m.timeline
        ]
    return {name: (t, values) for name, values in series.items()}


def write_png(report: FloodReport, path: Path) -> bool:
    """False when matplotlib is not installed (nothing written)."""
    if not can_plot():
        return False
    # Imported by name: the optional package is not needed to type-check or run the rest.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display: a file only
    plt: Any = importlib.import_module("matplotlib.pyplot")

    modes = list(report.modes.values())
    fig: Any
    fig, axes = plt.subplots(
        2, len(modes), figsize=(6.5 * len(modes), 7), squeeze=False, sharex="col"
    )
    for col, m in enumerate(modes):
        top, bottom = axes[0][col], axes[1][col]
        series = rates(m.commit_samples[::2])  # 1 s steps: PostgreSQL publishes counters ≤ 1/s
        top.plot([t for t, _ in series], [r for _, r in series], color="tab:red")
        top.set_title(f"{m.persist}: commits/s (peak {m.peak_commits_per_s or 0:,.0f})")
        top.set_ylabel("commits/s")
        top.grid(alpha=0.3)
        for name, (t, values) in _backlogs(m).items():
            bottom.plot(t, values, label=name)
        bottom.set_title(f"{m.persist}: backlog per stage")
        bottom.set_xlabel("seconds since the flood began")
        bottom.set_ylabel("tasks / callbacks")
        bottom.grid(alpha=0.3)
        bottom.legend(fontsize="small")
    cfg = report.config
    fig.suptitle(
        f"tidegate bench flood: {cfg.tasks:,} tasks, {cfg.clients} clients "
        f"({cfg.sensitive_share:.0%} sensitive), {cfg.executors} executors x {cfg.slots} slots"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
