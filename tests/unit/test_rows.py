"""Projection rows and coalescing: pure logic, no servers."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from tidegate import wire
from tidegate.store.rows import TaskRow, coalesce, merge, row_from_event, rows_from_heartbeat

T0 = datetime(2026, 11, 27, 23, 59, 58, tzinfo=UTC)
SPEC = wire.TaskSpec(key="k1", argv=["/bin/true"], labels={"name": "daily"})


def row(state: str, attempt: int = 1, **kw: object) -> TaskRow:
    return TaskRow(
        task_id="c1:k1",
        client="c1",
        key="k1",
        submitted_at=T0,
        state=state,
        attempt=attempt,
        **kw,  # type: ignore[arg-type]
    )


def test_submitted_on_is_the_utc_day() -> None:
    assert row("queued").submitted_on == date(2026, 11, 27)
    # 19:30 on the 27th in New York is already the 28th in UTC.
    late = datetime(2026, 11, 28, 0, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=-5)))
    r = TaskRow(task_id="a", client="c", key="a", submitted_at=late, state="queued", attempt=1)
    assert r.submitted_on == date(2026, 11, 28)


def test_naive_or_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        TaskRow(
            task_id="a",
            client="c",
            key="a",
            submitted_at=datetime(2026, 1, 1),
            state="queued",
            attempt=1,
        )
    with pytest.raises(ValueError, match="unknown state"):
        row("finished")


def test_coalesce_picks_the_highest_attempt_and_rank() -> None:
    rows = [
        row("queued", spec=SPEC, pool="default", task_class="short"),
        row("dispatched", executor="e1"),
        row("running", executor="e1", started_at=T0),
        row("succeeded", exit_code=0, reason="", log_tail="ok", finished_at=T0 + timedelta(1)),
    ]
    for order in itertools.permutations(rows):
        (out,) = coalesce(order)
        assert out.state == "succeeded"
        assert out.exit_code == 0
        assert out.log_tail == "ok"
        assert out.spec == SPEC  # kept from the queued row whatever came later
        assert out.pool == "default" and out.task_class == "short"
        assert out.started_at == T0  # the terminal row lacks it; the running row had it
        assert out.executor == "e1"


def test_late_stale_terminal_does_not_beat_a_newer_attempt() -> None:
    running2 = row("running", attempt=2, executor="e2", started_at=T0 + timedelta(minutes=1))
    failed1 = row(
        "failed",
        attempt=1,
        executor="e1",
        exit_code=1,
        reason="boom",
        finished_at=T0 + timedelta(minutes=2),
    )
    (out,) = coalesce([running2, failed1])
    assert (out.state, out.attempt, out.executor) == ("running", 2, "e2")
    assert out.exit_code is None and out.reason is None and out.finished_at is None
    assert out.started_at == running2.started_at
    assert coalesce([failed1, running2]) == [out]


def test_tie_keeps_the_first_seen() -> None:
    first = row("succeeded", exit_code=0, finished_at=T0)
    second = row("cancelled", reason="cancelled", finished_at=T0 + timedelta(seconds=1))
    assert coalesce([first, second]) == [first]
    assert coalesce([second, first]) == [second]


def test_one_row_per_task_and_day_in_first_seen_order() -> None:
    a = row("queued")
    b = TaskRow(task_id="c1:k2", client="c1", key="k2", submitted_at=T0, state="queued", attempt=1)
    # The same id submitted again on a later day is a different row (a different partition).
    a_next_day = TaskRow(
        task_id="c1:k1",
        client="c1",
        key="k1",
        submitted_at=T0 + timedelta(1),
        state="queued",
        attempt=1,
    )
    out = coalesce([b, a, row("running"), a_next_day, b])
    assert [(r.task_id, r.submitted_on.day, r.state) for r in out] == [
        ("c1:k2", 27, "queued"),
        ("c1:k1", 27, "running"),
        ("c1:k1", 28, "queued"),
    ]


def test_executor_kept_within_an_attempt_only() -> None:
    running = row("running", executor="e1", started_at=T0)
    lost = row("lost", reason="executor e1 stopped heartbeating")
    assert merge(running, lost).executor == "e1"
    assert merge(lost, running).executor == "e1"
    lost2 = row("lost", attempt=2)
    assert merge(running, lost2).executor is None
    assert merge(lost2, running).executor is None


def test_row_from_every_event_type() -> None:
    common: dict[str, Any] = {
        "task_id": "c1:k1",
        "client": "c1",
        "key": "k1",
        "attempt": 1,
        "at": T0,
        "submitted_at": T0,
    }
    q = row_from_event(wire.Queued(**common, spec=SPEC, pool="p", task_class="long"))
    assert (q.state, q.spec, q.pool, q.task_class) == ("queued", SPEC, "p", "long")
    d = row_from_event(wire.Dispatched(**common, pool="p", executor="e1"))
    assert (d.state, d.executor) == ("dispatched", "e1")
    r = row_from_event(wire.Running(**common, executor="e1", started_at=T0))
    assert (r.state, r.started_at) == ("running", T0)
    for state, cls in wire.FINISHED_BY_STATE.items():
        f = row_from_event(
            cls(**common, exit_code=3, reason="why", log_tail="tail", started_at=T0, finished_at=T0)
        )
        assert (f.state, f.exit_code, f.reason, f.log_tail, f.finished_at) == (
            state,
            3,
            "why",
            "tail",
            T0,
        )
        assert f.spec is None


def test_rows_from_heartbeat() -> None:
    hb = wire.Heartbeat(
        executor="e9",
        host="h",
        pid=1,
        pools=["default"],
        slots=4,
        load=0.1,
        at=T0,
        running=[
            wire.RunningTask(
                task_id="c1:k1",
                client="c1",
                key="k1",
                attempt=2,
                pool="default",
                started_at=T0,
                submitted_at=T0,
            ),
        ],
    )
    (r,) = rows_from_heartbeat(hb)
    assert (r.state, r.attempt, r.executor, r.started_at, r.pool) == (
        "running",
        2,
        "e9",
        T0,
        "default",
    )


def test_two_runs_of_a_task_id_are_two_rows_never_merged() -> None:
    """A key submitted again after the dedup window is the next run: its own row, even when
    the first run is further along (a later attempt, a terminal state)."""
    first_done = row("failed", attempt=3, run=10, exit_code=1, finished_at=T0)
    second_queued = row("queued", attempt=0, run=25, spec=SPEC, pool="default")
    second_running = row("running", attempt=1, run=25, executor="e2", started_at=T0)
    for order in itertools.permutations([first_done, second_queued, second_running]):
        out = {r.run: r for r in coalesce(order)}
        assert set(out) == {10, 25}
        assert (out[10].state, out[10].attempt, out[10].exit_code) == ("failed", 3, 1)
        assert (out[25].state, out[25].attempt, out[25].spec) == ("running", 1, SPEC)


def test_rows_carry_the_run_of_their_event_and_heartbeat() -> None:
    event = wire.Succeeded(
        task_id="c1:k1", client="c1", key="k1", attempt=1, at=T0, submitted_at=T0,
        finished_at=T0, run=31,
    )  # fmt: skip
    assert row_from_event(event).run == 31
    hb = wire.Heartbeat(
        executor="e1", host="h", pid=1, pools=["default"], slots=1, load=0.0, at=T0,
        running=[
            wire.RunningTask(task_id="c1:k1", client="c1", key="k1", attempt=1,
                             pool="default", started_at=T0, submitted_at=T0, run=31),
        ],
    )  # fmt: skip
    assert [r.run for r in rows_from_heartbeat(hb)] == [31]
