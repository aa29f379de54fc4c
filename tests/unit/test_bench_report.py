"""`tidegate bench flood`'s pure helpers: specs, peak rates, the report table."""

from __future__ import annotations

import pytest

from tidegate.bench import (
    FloodConfig,
    FloodReport,
    ModeResult,
    flood_specs,
    format_table,
    peak_rate,
)


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
        tasks=10,
        clients=2,
        executors=1,
        slots=4,
        persist=["batch", "per-event"],
        command=["/bin/true"],
        timeout_s=60,
    )
    report = FloodReport(
        benchmark="flood",
        config=cfg,
        commit_ratio=None,
        ok=False,
        modes={
            "batch": ModeResult(
                persist="batch", tasks=10, terminal=10, completed=True, commits=12, submit_s=0.01
            ),
            "per-event": ModeResult(persist="per-event", tasks=10, error="nats-server died"),
        },
    )
    table = format_table(report)
    assert "batch" in table and "per-event" in table
    assert "per-event: FAILED: nats-server died" in table
