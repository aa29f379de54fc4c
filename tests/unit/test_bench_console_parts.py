"""`tidegate bench console`'s pure parts: percentiles, the page summary, the report table, the
fill plan and its SQL parameters, and the page checks."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest

from tidegate.bench.console import (
    deep_page_for,
    history_samples,
    overview_check,
    rows_check,
    task_check,
)
from tidegate.bench.fill import FILL_SQL, UNFINISHED_MAX, fill_params, plan_days, unfinished_from
from tidegate.bench.timing import (
    ConsoleConfig,
    ConsoleReport,
    DataFacts,
    format_json,
    format_table,
    percentile,
    summarize,
)
from tidegate.console.rates import current_drivers

NOW = datetime(2026, 12, 2, 8, 30, tzinfo=UTC)
CFG = ConsoleConfig(
    rows=1000, clients=3, days=2, requests=4, warmup=1, deep_page=10, target_ms=300.0
)


# --- percentiles and the summary --------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    times = [float(t) for t in range(1, 51)]  # 1 … 50 ms, shuffled below
    shuffled = times[25:] + times[:25]
    assert percentile(shuffled, 95) == 48.0  # ⌈0.95·50⌉ = 48th smallest: the third slowest
    assert percentile(shuffled, 50) == 25.0
    assert percentile(shuffled, 100) == 50.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0], 1) == 1.0


@pytest.mark.parametrize("q", [0, -1, 101])
def test_percentile_refuses_a_bad_rank(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 95)


def test_summary_of_a_page() -> None:
    times = [10.04, 12.0, 11.0, 250.0, 13.0]
    page = summarize("tasks", "/tasks", times, [200] * 5, [None] * 5, 300.0)
    assert (page.min_ms, page.median_ms, page.p95_ms, page.max_ms) == (10.0, 12.0, 250.0, 250.0)
    assert page.requests == 5 and page.statuses == {"200": 5}
    assert page.failures == 0 and page.problem is None and page.under_target


def test_a_slow_or_failing_page_misses_the_target() -> None:
    slow = summarize("a", "/", [100.0, 400.0], [200, 200], [None, None], 300.0)
    assert slow.p95_ms == 400.0 and not slow.under_target
    failing = summarize("b", "/", [5.0, 6.0], [200, 503], [None, "HTTP 503"], 300.0)
    assert failing.statuses == {"200": 1, "503": 1}
    assert failing.failures == 1 and failing.problem == "HTTP 503"
    assert not failing.under_target  # fast, but an answer was wrong
    empty = summarize("c", "/", [], [], [], 300.0)
    assert empty.p95_ms is None and not empty.under_target


# --- the report ---------------------------------------------------------------------------------


def _report(**changes: object) -> ConsoleReport:
    pages = [
        summarize("overview", "/", [20.0, 30.0], [200, 200], [None, None], 300.0),
        summarize(
            "tasks, page 11", "/tasks?after=" + "x" * 80, [500.0] * 2, [200] * 2, [None] * 2, 300.0
        ),
    ]
    fields: dict[str, object] = {
        "benchmark": "console",
        "config": CFG,
        "data": DataFacts(rows=1000, partitions=2, table_mb=1.5, fill_s=0.1, vacuum_s=0.2),
        "pages": pages,
        "cpus": 2,
        "load_before": [1.0, 0.5, 0.25],
        "load_after": [1.5, 0.75, 0.5],
        "ok": True,
        "under_target": False,
    }
    fields.update(changes)
    return ConsoleReport(**fields)  # type: ignore[arg-type]


def test_table_shows_every_page_and_the_verdict() -> None:
    text = format_table(_report())
    assert "1,000 rows in tasks, 3 clients, 2 days" in text
    assert "2 partitions" in text and "2 CPUs" in text and "1.00 0.50 0.25 before" in text
    lines = text.splitlines()
    overview = next(line for line in lines if line.startswith("overview"))
    assert overview.split()[-5:] == ["20.0", "20.0", "30.0", "30.0", "yes"]
    deep = next(line for line in lines if line.startswith("tasks, page 11"))
    assert deep.rstrip().endswith("NO") and "…" in deep  # the long cursor is cut
    assert "NOT every page's p95 is under 300 ms" in text


def test_table_of_a_failed_run() -> None:
    text = format_table(_report(data=None, pages=[], ok=False, error="login refused"))
    assert "1,000 rows (not filled)" in text
    assert text.endswith("FAILED: login refused")


def test_json_shape_is_stable() -> None:
    report = json.loads(format_json(_report()))
    assert set(report) == {
        "benchmark",
        "config",
        "data",
        "pages",
        "cpus",
        "load_before",
        "load_after",
        "ok",
        "under_target",
        "error",
    }
    assert set(report["config"]) == {
        "rows",
        "clients",
        "days",
        "requests",
        "warmup",
        "deep_page",
        "target_ms",
    }
    assert set(report["data"]) == {"rows", "partitions", "table_mb", "fill_s", "vacuum_s"}
    assert set(report["pages"][0]) == {
        "name",
        "url",
        "requests",
        "min_ms",
        "median_ms",
        "p95_ms",
        "max_ms",
        "statuses",
        "failures",
        "problem",
        "under_target",
    }


# --- the fill -----------------------------------------------------------------------------------


def test_days_cover_every_row_once_and_end_today() -> None:
    plan = plan_days(1_000_003, 7, NOW)
    assert [f.day for f in plan] == [NOW.date() - timedelta(days=6 - k) for k in range(7)]
    assert plan[0].first == 0 and plan[-1].last == 1_000_002
    for before, after in itertools.pairwise(plan):
        assert after.first == before.last + 1
    assert [f.count for f in plan] == [142_857] * 3 + [142_858] * 4  # remainder: newest days
    for f in plan[:-1]:
        assert f.start == datetime(f.day.year, f.day.month, f.day.day, tzinfo=UTC)
        assert f.span_s == 86_400
    today = plan[-1]
    assert today.start + timedelta(seconds=today.span_s) == NOW  # nothing in the future


def test_just_after_midnight_today_still_ends_now() -> None:
    now = datetime(2026, 12, 2, 0, 0, 10, tzinfo=UTC)
    today = plan_days(100, 2, now)[-1]
    assert today.day == now.date() and today.span_s == 60
    assert today.start + timedelta(seconds=today.span_s) == now


def test_fewer_rows_than_days_leaves_no_empty_day() -> None:
    plan = plan_days(2, 5, NOW)
    assert [(f.day, f.count) for f in plan] == [
        (NOW.date() - timedelta(days=1), 1),
        (NOW.date(), 1),
    ]
    with pytest.raises(ValueError):
        plan_days(0, 7, NOW)


def test_fill_params_name_every_placeholder() -> None:
    plan = plan_days(10_000, 2, NOW)
    params = fill_params(plan[0], ["a", "b"], 10_000)
    assert params == {
        "day": plan[0].day,
        "first": 0,
        "last": 4_999,
        "start": plan[0].start,
        "step_s": 86_400 / 5_000,
        "clients": ["a", "b"],
        "n_clients": 2,
        "unfinished_from": 10_000 - 100,
    }
    for name in params:
        assert f"%({name})s" in FILL_SQL
    # psycopg reads every other % as a placeholder: the SQL uses mod(), never `%`.
    assert FILL_SQL.count("%") == sum(FILL_SQL.count(f"%({name})s") for name in params)
    with pytest.raises(ValueError):
        fill_params(plan[0], [], 10_000)


def test_a_few_thousand_tasks_are_unfinished() -> None:
    assert unfinished_from(1_000_000) == 1_000_000 - UNFINISHED_MAX
    assert unfinished_from(20_000) == 20_000 - 200


# --- the pages and their checks -----------------------------------------------------------------


def test_deep_page_is_200_pages_in_or_half_a_small_list() -> None:
    assert deep_page_for(1_000_000) == 200
    assert deep_page_for(5_000) == 50
    assert deep_page_for(10) == 1


def test_checks_tell_a_complete_page_from_one_with_errors() -> None:
    assert overview_check("<p>all there</p>") is None
    assert overview_check("<strong>Not everything could be read; …</strong>") is not None
    full = rows_check("<tr data-task=", 2)
    assert full("<tr data-task=a><tr data-task=b>") is None
    assert full("<tr data-task=a>") == "1 rows shown, expected 2"
    assert full('<p class="error" role="alert">timeout</p>') == "the page shows an error"
    assert task_check('<table id="task-state">') is None
    assert task_check('<p class="error" role="alert">no task</p>') is not None


def test_history_is_an_hour_of_samples_that_ends_where_asked() -> None:
    samples = history_samples(NOW)
    assert len(samples) == 720
    assert samples[-1].at == NOW and samples[0].seq == 0
    assert all(b.accepted > a.accepted for a, b in itertools.pairwise(samples))
    assert current_drivers(samples, NOW.timestamp()) == 1
    assert current_drivers(samples, NOW.timestamp() + 60) == 0  # not a live driver
