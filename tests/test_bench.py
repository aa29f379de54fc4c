"""`tidegate bench flood`: a small real run of both persist modes, and its pure helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.bench import (
    FloodConfig,
    FloodReport,
    ModeResult,
    flood_specs,
    format_table,
    peak_rate,
)

MODE_KEYS = {
    "persist", "tasks", "submitted", "duplicates", "submit_s", "submit_per_s", "terminal_s",
    "tasks_per_s", "terminal", "succeeded", "completed", "commits", "poller_commits",
    "commits_per_task", "peak_commits_per_s", "rows_written", "rows_per_task", "error",
}  # fmt: skip


def test_peak_rate_uses_one_second_windows() -> None:
    # A backend that publishes a second's worth of commits at once shows up as a spike in one
    # 0.5 s sample; over a 1 s window it is the true rate.
    samples = [(0.0, 0), (0.5, 0), (1.0, 100), (1.5, 100), (2.0, 200), (2.5, 200)]
    assert peak_rate(samples) == pytest.approx(100.0)


def test_peak_rate_finds_the_burst() -> None:
    samples = [(t * 0.5, c) for t, c in enumerate([0, 10, 20, 520, 1020, 1030, 1040])]
    assert peak_rate(samples) == pytest.approx(1000.0)


def test_peak_rate_of_a_short_or_empty_run() -> None:
    assert peak_rate([]) == 0.0
    assert peak_rate([(0.0, 5)]) == 0.0
    assert peak_rate([(0.0, 0), (0.5, 10)]) == pytest.approx(20.0)


def test_flood_specs_deal_every_task_once_over_all_clients() -> None:
    per_client = flood_specs(10, 3)
    assert [len(s) for s in per_client] == [4, 3, 3]
    keys = [spec.key for specs in per_client for spec in specs]
    assert len(set(keys)) == 10
    assert all(spec.argv == ["/bin/true"] for specs in per_client for spec in specs)


def test_table_shows_every_mode_and_failures() -> None:
    cfg = FloodConfig(
        tasks=10, clients=2, executors=1, slots=4, persist=["batch", "per-event"],
        command=["/bin/true"], timeout_s=60,
    )  # fmt: skip
    report = FloodReport(
        benchmark="flood", config=cfg, commit_ratio=None, ok=False,
        modes={
            "batch": ModeResult(persist="batch", tasks=10, terminal=10, completed=True,
                                commits=12, submit_s=0.01),
            "per-event": ModeResult(persist="per-event", tasks=10, error="nats-server died"),
        },
    )  # fmt: skip
    table = format_table(report)
    assert "batch" in table and "per-event" in table
    assert "per-event: FAILED: nats-server died" in table


@pytest.mark.slow
def test_small_flood_completes_in_both_modes_and_batch_commits_less(tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "mesh.bench", "flood", "--tasks", "300", "--clients", "3",
        "--executors", "1", "--persist", "both", "--json", "--work-dir", str(tmp_path),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)

    assert set(report) == {"benchmark", "config", "modes", "commit_ratio", "ok"}
    assert report["benchmark"] == "flood" and report["ok"] is True
    assert report["config"] == {
        "tasks": 300, "clients": 3, "executors": 1, "slots": 16,
        "persist": ["batch", "per-event"], "command": ["/bin/true"], "timeout_s": 63.0,
    }  # fmt: skip
    modes = report["modes"]
    assert list(modes) == ["batch", "per-event"]
    for name, m in modes.items():
        assert set(m) == MODE_KEYS
        assert m["persist"] == name and m["error"] is None
        assert m["submitted"] == 300 and m["duplicates"] == 0
        assert m["completed"] is True and m["terminal"] == m["succeeded"] == 300
        assert m["terminal_s"] > 0 and m["submit_s"] > 0
        # Every task is written at least once (inserted), at most once per state event.
        assert 300 <= m["rows_written"] <= 300 * 4
        assert m["commits"] > 0 and m["poller_commits"] > 0

    # The design's property, not a timing target: coalesced batches commit far less often
    # than one transaction per state change (which needs at least one per task).
    assert modes["batch"]["commits"] < modes["per-event"]["commits"]
    assert modes["per-event"]["commits"] >= 300
    assert report["commit_ratio"] == pytest.approx(
        modes["per-event"]["commits"] / modes["batch"]["commits"], rel=0.01
    )
    # A successful run cleans up after itself.
    assert list(tmp_path.iterdir()) == []
