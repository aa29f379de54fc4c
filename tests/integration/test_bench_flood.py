"""`tidegate bench flood`: a small real run of both persist modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import MODE_KEYS


@pytest.mark.slow
def test_small_flood_completes_in_both_modes_and_batch_commits_less(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "tidegate",
        "bench",
        "flood",
        "--tasks",
        "300",
        "--clients",
        "3",
        "--executors",
        "1",
        "--persist",
        "both",
        "--json",
        "--work-dir",
        str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)

    assert set(report) == {"benchmark", "config", "modes", "commit_ratio", "ok"}
    assert report["benchmark"] == "flood" and report["ok"] is True
    assert report["config"] == {
        "tasks": 300,
        "clients": 3,
        "executors": 1,
        "slots": 16,
        "persist": ["batch", "per-event"],
        "command": ["/bin/true"],
        "timeout_s": 63.0,
    }
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
