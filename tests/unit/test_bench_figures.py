"""The flood benchmark's figures: spreads, ratios to the ceilings, rates, lags, the sensitive
share, what the callback sink counts, and the markdown form of the report."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from tidegate.bench.ceilings import Ceilings
from tidegate.bench.committs import autovacuum_xids, busiest_window
from tidegate.bench.figures import Spread, lags, per_second, rates, ratio, share_count, spread
from tidegate.bench.flood import expected_callbacks, sensitive_names
from tidegate.bench.kinds import KindWrites
from tidegate.bench.model import FloodConfig, FloodReport, Machine, ModeResult
from tidegate.bench.plot import write_png
from tidegate.bench.report import format_markdown, format_table
from tidegate.bench.run import add_ratios
from tidegate.bench.sink import CallbackSink
from tidegate.bench.timeline import Point, all_routed_at, route_waits
from tidegate.bench.usage import Usage
from tidegate.driver.callbacks.payload import Callback


def cfg(**more: object) -> FloodConfig:
    base: dict[str, object] = dict(
        tasks=10,
        clients=4,
        executors=1,
        slots=4,
        persist=["batch"],
        command=["/bin/true"],
        timeout_s=60,
    )
    base.update(more)
    return FloodConfig(**base)  # type: ignore[arg-type]


def test_spread_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 … 100
    assert spread(values) == Spread(n=100, p50=50.0, p95=95.0, p99=99.0, max=100.0)
    assert spread([]) is None
    one = spread([7.25], digits=1)
    assert one is not None and (one.p50, one.p99, one.max) == (7.2, 7.2, 7.2)


def test_ratio_and_rate_with_missing_figures() -> None:
    assert ratio(30.0, 20.0) == 1.5
    assert ratio(None, 20.0) is None
    assert ratio(30.0, None) is None
    assert ratio(30.0, 0.0) is None
    assert per_second(3000, 1.5) == 2000.0
    assert per_second(3000, None) is None
    assert per_second(3000, 0.0) is None


def test_rates_between_samples_skip_gaps_and_resets() -> None:
    samples = [(0.0, 0), (0.5, 10), (0.5, 10), (1.5, 30), (2.0, 5)]
    assert rates(samples) == [(0.5, 20.0), (1.5, 20.0)]
    assert rates([]) == [] and rates([(0.0, 1)]) == []


def test_lags_only_for_keys_in_both() -> None:
    got = sorted(lags({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.5, "b": 1.0, "d": 9.0}))
    assert got == [-1.0, 0.5]


def test_share_count_rounds_and_keeps_one() -> None:
    assert share_count(0.0, 10) == 0
    assert share_count(0.5, 6) == 3
    assert share_count(0.01, 6) == 1  # asked for some: at least one
    assert share_count(1.0, 6) == 6
    assert share_count(0.5, 0) == 0
    with pytest.raises(ValueError):
        share_count(1.5, 6)


def test_sensitive_clients_and_expected_callbacks() -> None:
    # 10 tasks over 4 clients: 3, 3, 2, 2; the first two clients sensitive.
    c = cfg(sensitive_share=0.5)
    assert sensitive_names(c) == {"bench000", "bench001"}
    assert expected_callbacks(c) == (6, 6 * 3 + 4 * 1)
    assert expected_callbacks(cfg()) == (0, 10)
    assert expected_callbacks(cfg(sensitive_share=1.0)) == (10, 30)


def _cb(task: str, state: str, attempt: int = 1, client: str = "s") -> Callback:
    return Callback(
        event_id=f"{task}-{attempt}-{state}",
        task_id=f"{client}:{task}",
        client=client,
        key=task,
        state=state,
        attempt=attempt,
        at=datetime.fromtimestamp(1000.0, UTC),
    )


def test_sink_counts_duplicates_order_latency_and_terminal_time() -> None:
    sink = CallbackSink(sensitive=frozenset({"s"}))
    sink.record(_cb("a", "dispatched"), wall=1000.1, mono=1.0)
    sink.record(_cb("a", "succeeded"), wall=1000.3, mono=2.0)
    sink.record(_cb("a", "running"), wall=1000.4, mono=3.0)  # after a newer state
    sink.record(_cb("a", "succeeded"), wall=1000.5, mono=4.0)  # the same event again
    sink.record(_cb("b", "succeeded", client="n"), wall=1002.0, mono=5.0)
    assert sink.received == 5
    assert sink.duplicates == 1
    assert sink.out_of_order == 1
    assert [round(x) for x in sink.latency_ms[True]] == [100, 300, 400, 500]
    assert [round(x) for x in sink.latency_ms[False]] == [2000]
    assert sink.terminal_at == {"s:a": 1000.3, "n:b": 1002.0}  # the first arrival counts
    assert sink.states == {"dispatched": 1, "running": 1, "succeeded": 2}  # distinct events
    assert sink.arrivals == [1.0, 2.0, 3.0, 4.0, 5.0]


def _report() -> FloodReport:
    mode = ModeResult(
        persist="batch",
        tasks=10,
        terminal=10,
        succeeded=10,
        completed=True,
        submit_s=0.5,
        terminal_s=3.0,
        callbacks_expected=22,
        callbacks_received=22,
        callback_latency_ms={"sensitive": Spread(n=18, p50=12.0, p95=40.0, p99=55.0, max=60.0)},
        usage={
            "driver": Usage(peak_rss_mb=80.0, cpu_s=2.5),
            "executor0": Usage(peak_rss_mb=40.0, cpu_s=1.0, tasks_cpu_s=0.2),
            "executor1": Usage(peak_rss_mb=45.0, cpu_s=1.5, tasks_cpu_s=0.3),
        },
    )
    ceilings = Ceilings(tasks=10, in_flight=4, spawn_s=2.0, spawn_per_s=5.0, publish_s=0.25)
    add_ratios(mode, ceilings)
    return FloodReport(
        benchmark="flood",
        config=cfg(sensitive_share=0.5, callback_latency_ms=50.0),
        modes={"batch": mode},
        commit_ratio=None,
        ok=True,
        ceilings=ceilings,
        machine=Machine(
            cpus=2,
            cpu_model="Test CPU",
            memory_gb=4.0,
            python="3.11.7",
            system="Linux 6",
            load_before=[1.0, 2.0, 3.0],
            load_after=[1.5, 2.0, 3.0],
        ),
    )


def test_ratios_to_the_ceilings() -> None:
    mode = _report().modes["batch"]
    assert mode.terminal_x_spawn == 1.5
    assert mode.submit_x_publish == 2.0


def test_markdown_and_table_show_ceilings_ratios_callbacks_and_usage() -> None:
    report = _report()
    md = format_markdown(report)
    assert "| figure | batch |" in md
    assert "| x raw spawn time | 1.50x |" in md
    assert "| x raw publish time | 2.00x |" in md
    assert "| callbacks received / expected | 22 / 22 |" in md
    assert "| callback ms p50/p95/p99: sensitive | 12 / 40 / 55 |" in md
    assert "| callback ms p50/p95/p99: non-sensitive | - |" in md
    # Executors summed, their tasks' CPU apart.
    assert "| peak RSS MB: executors | 85 |" in md
    assert "| CPU s: tasks | 0.5 |" in md
    assert "spawn+reap 10 x /bin/true, 4 at once: 2.00 s" in md
    assert "2 CPUs (Test CPU)" in md and "load 1.00 2.00 3.00 before" in md
    table = format_table(report)
    assert "50% sensitive" in table and "after 50 ms" in table
    assert "1.50x" in table


def test_png_has_a_column_per_mode(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = _report()
    mode = report.modes["batch"]
    mode.commit_samples = [(0.0, 0), (0.5, 10), (1.0, 30)]
    mode.timeline = [
        Point(
            t=0.0, accepted=0, submitted=0, ready=0, work=0, events=0, db_terminal=0, callbacks=0
        ),
        Point(
            t=0.5, accepted=10, submitted=2, ready=4, work=4, events=3, db_terminal=5, callbacks=9
        ),
    ]
    report.modes["per-event"] = ModeResult(persist="per-event", tasks=10, error="died")
    assert write_png(report, tmp_path / "flood.png")
    assert (tmp_path / "flood.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_busiest_window_counts_commits_within_one_second_of_each_other() -> None:
    assert busiest_window([]) == 0
    assert busiest_window([5.0]) == 1
    # 0.0 and 1.0 are a second apart: never in one half-open window [t, t + 1).
    assert busiest_window([0.0, 1.0, 2.0, 3.0]) == 1
    assert busiest_window([0.0, 0.5, 0.99, 1.0, 1.4, 3.0]) == 4  # 0.5 … 1.4
    assert busiest_window([0.0, 0.1, 0.2, 0.3], window_s=0.25) == 3


def test_autovacuum_transactions_are_read_from_the_servers_log() -> None:
    log = "\n".join(
        [
            '2026-12-03 16:17:12.083 UTC@xid=745@LOG:  automatic analyze of table "t.public.x"',
            "2026-12-03 16:17:12.102 UTC@xid=0@LOG:  automatic aggressive vacuum of table "
            '"t.pg_catalog.pg_class": index scans: 0',
            '2026-12-03 16:17:12.110 UTC@xid=750@LOG:  automatic vacuum of table "t.public.x"',
            "2026-12-03 16:17:13.000 UTC@xid=751@LOG:  statement: analyze x",
        ]
    )
    assert autovacuum_xids(log) == {745, 750}


def _point(t: float, accepted: int, submitted: int) -> Point:
    return Point(
        t=t,
        accepted=accepted,
        submitted=submitted,
        ready=0,
        work=0,
        events=0,
        db_terminal=0,
        callbacks=0,
    )


def test_all_routed_is_the_first_sample_with_everything_accepted_and_nothing_to_route() -> None:
    points = [_point(0.0, 0, 0), _point(0.5, 6, 0), _point(1.0, 10, 4), _point(1.5, 10, 0)]
    # At 0.5 nothing waited, but not everything had been accepted yet.
    assert all_routed_at(points, 10) == 1.5
    assert all_routed_at(points[:3], 10) is None


def test_route_waits_pair_the_kth_accepted_with_the_kth_routed() -> None:
    points = [_point(0.0, 0, 0), _point(0.5, 6, 4), _point(1.0, 10, 5), _point(1.5, 10, 0)]
    # Routed so far: 0, 2, 5, 10. Tasks 1-2 accepted at 0.5 and routed at 0.5; 3-5 routed at
    # 1.0 (3-6 accepted at 0.5); 6 routed at 1.5; 7-10 accepted at 1.0, routed at 1.5.
    assert route_waits(points, 10) == [0.0] * 2 + [0.5] * 3 + [1.0] + [0.5] * 4
    # Not routed by the last sample: no wait yet.
    assert route_waits(points[:3], 10) == [0.0] * 2 + [0.5] * 3


def test_route_waits_read_as_seconds_in_the_table() -> None:
    report = _report()
    report.modes["batch"].route_wait_s = spread([0.5, 1.0, 2.25])
    assert "| routed after its PubAck, s p50/p95/p99 | 1.0 / 2.2 / 2.2 |" in format_markdown(report)


def test_several_drivers_are_summed_and_writes_shown_per_kind_of_client() -> None:
    report = _report()
    mode = report.modes["batch"]
    mode.usage = {
        "driver0": Usage(peak_rss_mb=80.0, cpu_s=2.5),
        "driver1": Usage(peak_rss_mb=70.0, cpu_s=2.0),
        "executor0": Usage(peak_rss_mb=40.0, cpu_s=1.0),
    }
    mode.routed_s = 1.5
    mode.writes_by_kind = {
        "sensitive": KindWrites(
            tasks=5, rows=20, commits=1, rows_per_task=4.0, commits_per_task=0.2
        ),
        "non-sensitive": KindWrites(
            tasks=5, rows=10, commits=1, rows_per_task=2.0, commits_per_task=0.2
        ),
    }
    md = format_markdown(replace_config(report, drivers=2))
    assert "| peak RSS MB: drivers | 150 |" in md
    assert "| CPU s: drivers | 4.5 |" in md
    assert "1 driver," not in md and "2 drivers, 1 executors" in md
    assert "| all routed after (s) | 1.5 |" in md
    assert "| sensitive: rows / commits per task | 4.00 / 0.2000 |" in md
    assert "| non-sensitive: rows / commits per task | 2.00 / 0.2000 |" in md


def replace_config(report: FloodReport, **changes: object) -> FloodReport:
    report.config = msgspec.structs.replace(report.config, **changes)
    return report
