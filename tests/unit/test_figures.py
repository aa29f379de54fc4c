"""The overview's pure figures: rates from counter samples, backlog from subject totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js.api import ConsumerConfig, ConsumerInfo

from tidegate.console.backlog import (
    ClientFigures,
    StageTotals,
    client_figures,
    pool_figures,
    ready_by_client,
    running_by_client,
    stage_totals,
    submitted_by_client,
    work_by_client,
    work_figures,
)
from tidegate.console.figures import rates_and_charts
from tidegate.console.rates import (
    Increase,
    current_drivers,
    horizon,
    increases,
    rate_over,
    rate_series,
    spread,
)
from tidegate.wire import DriverStats, Heartbeat, RunningTask

T0 = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
E0 = T0.timestamp()


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def sample(
    driver: str, t: float, accepted: int, *, seq: int = 1, started: float = -1000.0, **more: int
) -> DriverStats:
    counters: dict[str, Any] = dict(
        finished=0, commits=0, rows=0, callbacks_delivered=0, callbacks_outboxed=0
    )
    counters.update(more)
    return DriverStats(
        driver=driver,
        started_at=at(started),
        at=at(t),
        seq=seq,
        every_s=5.0,
        accepted=accepted,
        **counters,
    )


def steady(driver: str, per_s: float, until: float, every: float = 5.0) -> list[DriverStats]:
    """A driver sampling every `every` seconds from t=0 while accepting `per_s` tasks/s."""
    out, t = [], 0.0
    while t <= until:
        out.append(sample(driver, t, round(1000 + per_s * t)))
        t += every
    return out


# --- increases -----------------------------------------------------------------------------------


def test_increases_are_differences_of_consecutive_samples_of_one_driver() -> None:
    got = increases([sample("d", 10, 130), sample("d", 0, 100), sample("d", 5, 110)], "accepted")
    assert got == [Increase(E0, E0 + 5, 10), Increase(E0 + 5, E0 + 10, 20)]


def test_a_first_sample_in_hand_is_only_a_baseline() -> None:
    assert increases([sample("d", 0, 500, seq=7)], "accepted") == []


def test_the_first_sample_after_a_start_counts_from_the_start() -> None:
    got = increases([sample("d", 5, 40, seq=0, started=2)], "accepted")
    assert got == [Increase(E0 + 2, E0 + 5, 40)]


def test_a_counter_reset_is_never_negative() -> None:
    # Same driver id, restarted at t=12 (a drop in the counter and a new start time).
    samples = [
        sample("d", 0, 100),
        sample("d", 10, 150),
        sample("d", 15, 7, seq=0, started=12),
        sample("d", 20, 27, seq=1, started=12),
    ]
    got = increases(samples, "accepted")
    assert all(i.amount >= 0 for i in got)
    assert got == [
        Increase(E0, E0 + 10, 50),
        Increase(E0 + 12, E0 + 15, 7),  # counted from the restart
        Increase(E0 + 15, E0 + 20, 20),
    ]


def test_a_drop_without_a_new_start_time_is_a_reset_too() -> None:
    got = increases([sample("d", 0, 100), sample("d", 5, 3)], "accepted")
    assert got == [Increase(E0, E0 + 5, 3)]


# --- buckets and series ------------------------------------------------------------------------


def test_spread_shares_an_increase_by_overlap_and_keeps_its_total() -> None:
    totals = spread([Increase(E0 + 5, E0 + 25, 40)], first=E0, bucket_s=10, n=3)
    assert totals == pytest.approx([10, 20, 10])


def test_an_instant_increase_lands_in_its_bucket() -> None:
    assert spread([Increase(E0 + 12, E0 + 12, 9)], first=E0, bucket_s=10, n=2) == [0, 9]


def test_rates_are_summed_across_drivers_per_bucket() -> None:
    samples = steady("a", 10, 600) + steady("b", 5, 600)
    series = rate_series(samples, "accepted", end=E0 + 600, span_s=600, bucket_s=20)
    assert len(series) == 30
    assert [v for _, v in series] == pytest.approx([15.0] * 30)
    assert series[-1][0] == E0 + 600  # points at their bucket's end


def test_a_restart_gives_no_negative_rate() -> None:
    before = [sample("d", t, 1000 + 10 * t) for t in range(0, 100, 5)]
    after = [sample("d", t, 10 * (t - 100), seq=t, started=100) for t in range(100, 200, 5)]
    series = rate_series(before + after, "accepted", end=E0 + 200, span_s=200, bucket_s=20)
    assert all(v >= 0 for _, v in series)
    assert min(v for _, v in series) > 0


def test_a_gap_is_averaged_over_its_length_not_a_spike() -> None:
    # The stats stream lost the samples between t=20 and t=80 (say, NATS was away).
    samples = [sample("d", 0, 0), sample("d", 20, 200), sample("d", 80, 800)]
    series = rate_series(samples, "accepted", end=E0 + 80, span_s=80, bucket_s=20)
    assert [v for _, v in series] == pytest.approx([10, 10, 10, 10])


def test_the_series_starts_where_the_data_does() -> None:
    series = rate_series(steady("d", 2, 100), "accepted", end=E0 + 100, span_s=3600, bucket_s=20)
    assert series[0][0] == E0 + 20 and len(series) == 5


def test_no_samples_no_series_and_no_rate() -> None:
    assert rate_series([], "accepted", end=E0) == []
    assert rate_over([], "accepted", end=E0, window_s=30) is None


def test_rate_over_the_last_window() -> None:
    samples = steady("a", 4, 120)
    assert rate_over(samples, "accepted", end=E0 + 120, window_s=30) == pytest.approx(4)
    # A history shorter than the window is averaged over what there is.
    young = [sample("n", 5, 50, seq=0, started=0)]
    assert rate_over(young, "accepted", end=E0 + 5, window_s=30) == pytest.approx(10)


def test_the_horizon_waits_for_active_drivers_only() -> None:
    samples = [sample("a", 100, 1), sample("b", 97, 1), sample("gone", 10, 1)]
    assert horizon(samples) == E0 + 97
    assert horizon([]) is None
    assert current_drivers(samples, E0 + 101) == 2


def test_rates_and_charts_from_samples() -> None:
    samples = steady("a", 10, 300)
    rates, charts, drivers = rates_and_charts(samples, E0 + 301)
    assert rates.accepted == pytest.approx(10)
    assert rates.finished == 0
    assert drivers == 1
    assert [c.key for c in charts] == ["accepted", "finished", "commits", "callbacks_delivered"]
    assert charts[0].points[-1][0] == E0 + 300
    assert all(v == pytest.approx(10) for _, v in charts[0].points)
    # Every driver silent for a while: the history stays, the rate "now" is unknown.
    later_rates, later_charts, later_drivers = rates_and_charts(samples, E0 + 900)
    assert later_drivers == 0 and later_rates.accepted is None
    assert later_charts[0].points == charts[0].points
    empty_rates, empty_charts, none_current = rates_and_charts([], E0)
    assert empty_rates.accepted is None and none_current == 0
    assert all(c.points == [] for c in empty_charts)


# --- backlog -------------------------------------------------------------------------------------


def beat(name: str, pool: str, slots: int, *running: tuple[str, str]) -> Heartbeat:
    return Heartbeat(
        executor=name,
        host="h",
        pid=1,
        pools=[pool],
        slots=slots,
        running=[
            RunningTask(
                task_id=f"{c}:{k}",
                client=c,
                key=k,
                attempt=1,
                pool=pool,
                started_at=T0,
                submitted_at=T0,
            )
            for c, k in running
        ],
        load=0.0,
        at=T0,
    )


def test_per_client_figures_from_subject_totals_and_heartbeats() -> None:
    submitted = submitted_by_client({"tg.submit.a": 3, "tg.submit.b": 0})
    ready = ready_by_client({"tg.ready.a.default": 2, "tg.ready.a.gpu": 1, "junk": 9})
    work = work_by_client({"tg.work.default.short.b": 4, "tg.work.gpu.long.b": 1})
    running = running_by_client([beat("e1", "default", 4, ("b", "1"), ("b", "2"))])
    rows = client_figures(
        submitted=submitted, ready=ready, work=work, running=running, paused=["a"]
    )
    assert rows == [
        ClientFigures(client="a", submitted=3, ready=3, work=0, running=0, paused=True),
        ClientFigures(client="b", submitted=0, ready=0, work=5, running=2),
    ]


def test_a_stage_that_could_not_be_read_is_unknown_not_zero() -> None:
    rows = client_figures(submitted={"a": 1}, ready=None, work={}, running=None)
    assert rows == [ClientFigures(client="a", submitted=1, ready=None, work=0, running=None)]
    totals = stage_totals(submitted={"a": 1, "b": 2}, ready=None, work={}, running=None)
    assert totals == StageTotals(submitted=3, ready=None, work=0, running=None)
    # Nothing readable at all: unknown, not an empty (all zero) system.
    assert client_figures(submitted=None, ready=None, work=None, running=None) == []
    assert stage_totals(submitted=None, ready=None, work=None, running=None) == StageTotals(
        submitted=None, ready=None, work=None, running=None
    )


def consumer(pool: str, cls: str, ack_pending: int) -> ConsumerInfo:
    return ConsumerInfo(
        name=f"work_{pool}_{cls}",
        stream_name="TG_WORK",
        config=ConsumerConfig(filter_subject=f"tg.work.{pool}.{cls}.*"),
        created=T0,
        num_ack_pending=ack_pending,
    )


def test_work_queues_per_pool_and_class() -> None:
    subjects = {"tg.work.default.short.a": 5, "tg.work.default.short.b": 2, "tg.work.gpu.long.a": 1}
    rows = work_figures(subjects, [consumer("default", "short", 3)])
    assert [(w.pool, w.task_class, w.stored, w.delivered, w.waiting) for w in rows] == [
        ("default", "short", 7, 3, 4),
        ("gpu", "long", 1, 0, 1),
    ]
    unknown = work_figures(subjects, None)
    assert all(w.delivered is None for w in unknown)


def test_pools_from_heartbeats() -> None:
    beats = [
        beat("e1", "default", 4, ("a", "1")),
        beat("e2", "default", 8),
        beat("g1", "gpu", 2, ("a", "2"), ("b", "3")),
    ]
    assert [(p.pool, p.executors, p.slots, p.running) for p in pool_figures(beats)] == [
        ("default", 2, 12, 1),
        ("gpu", 1, 2, 2),
    ]
