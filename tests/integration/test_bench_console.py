"""`tidegate bench console`: a small real run (its own servers, driver, executor and console)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PAGES = [
    "overview",
    "overview, live part",
    "clients",
    "tasks, first page",
    "tasks, page 201",
    "tasks, client + failed",
    "one task",
]


@pytest.mark.slow
def test_small_console_bench_times_every_page(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "tidegate",
        "bench",
        "console",
        "--rows",
        "20000",
        "--clients",
        "5",
        "--days",
        "3",
        "--requests",
        "5",
        "--json",
        "--work-dir",
        str(tmp_path),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)

    assert report["benchmark"] == "console" and report["ok"] is True and report["error"] is None
    assert report["config"] == {
        "rows": 20000,
        "clients": 5,
        "days": 3,
        "requests": 5,
        "warmup": 3,
        "deep_page": 200,
        "target_ms": 300.0,
    }
    assert report["data"]["rows"] == 20000 and report["data"]["partitions"] == 3
    assert [p["name"] for p in report["pages"]] == PAGES
    for page in report["pages"]:
        assert page["statuses"] == {"200": 5}, page
        assert page["failures"] == 0 and page["problem"] is None, page
        assert page["requests"] == 5
        assert 0 < page["min_ms"] <= page["median_ms"] <= page["p95_ms"] <= page["max_ms"]
    assert report["cpus"] >= 1 and len(report["load_before"]) == 3
    # A successful run cleans up after itself.
    assert list(tmp_path.iterdir()) == []
