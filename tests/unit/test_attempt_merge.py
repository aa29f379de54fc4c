"""A run's attempts history (store/attempts.py): the per-attempt monotone merge and how rows
carry it through `coalesce`. Pure logic, no servers."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

from tidegate.store.attempts import (
    Attempt,
    attempt_records,
    encode_attempts,
    merge_attempt,
    merge_attempts,
)
from tidegate.store.rows import TaskRow, coalesce, columns

T0 = datetime(2026, 12, 2, 0, 0, tzinfo=UTC)
S1, S2 = T0 + timedelta(seconds=1), T0 + timedelta(seconds=40)


def row(state: str, attempt: int, **kw: object) -> TaskRow:
    return TaskRow(
        task_id="c1:k1",
        client="c1",
        key="k1",
        submitted_at=T0,
        state=state,
        attempt=attempt,
        run=7,
        **kw,  # type: ignore[arg-type]
    )


REPORTS = [
    row("queued", 0, pool="default", task_class="short"),
    row("dispatched", 0),
    row("running", 1, executor="exec-a", started_at=S1),
    row(
        "failed",
        1,
        executor="exec-a",
        exit_code=3,
        reason="exit code 3",
        started_at=S1,
        finished_at=S1 + timedelta(seconds=2),
    ),
    row("running", 2, executor="exec-b", started_at=S2),
]


def test_a_row_carries_its_own_attempt_and_attempt_zero_none() -> None:
    (own,) = row("running", 1, executor="exec-a", started_at=S1).attempts
    assert own == Attempt(number=1, state="running", executor="exec-a", started_at=S1)
    assert row("queued", 0).attempts == ()
    assert row("dispatched", 0).attempts == ()


def test_every_order_of_the_reports_gives_one_history() -> None:
    expected = (
        Attempt(
            number=1,
            state="failed",
            executor="exec-a",
            started_at=S1,
            finished_at=S1 + timedelta(seconds=2),
            exit_code=3,
            reason="exit code 3",
        ),
        Attempt(number=2, state="running", executor="exec-b", started_at=S2),
    )
    for order in itertools.permutations(REPORTS):
        (out,) = coalesce(order)
        # The row is at the newest attempt; attempt 1's end is kept beside it.
        assert (out.state, out.attempt, out.exit_code) == ("running", 2, None)
        assert out.attempts == expected, order


def test_an_older_report_does_not_regress_its_attempt() -> None:
    done = Attempt(number=1, state="succeeded", exit_code=0, finished_at=S2)
    running = Attempt(number=1, state="running", executor="exec-a", started_at=S1)
    merged = merge_attempt(done, running)
    # The state stays; what only the older report knew (where, since when) is filled in.
    assert (merged.state, merged.exit_code, merged.finished_at) == ("succeeded", 0, S2)
    assert (merged.executor, merged.started_at) == ("exec-a", S1)
    assert merge_attempt(running, done) == merged


def test_a_tie_keeps_the_first_written() -> None:
    first = Attempt(number=1, state="succeeded", exit_code=0)
    second = Attempt(number=1, state="cancelled", reason="cancelled")
    assert merge_attempt(first, second) == first
    assert merge_attempt(second, first) == second


def test_histories_merge_per_attempt_in_attempt_order() -> None:
    a1 = Attempt(number=1, state="lost", reason="exec-a stopped reporting")
    a2 = Attempt(number=2, state="running", executor="exec-b")
    assert merge_attempts([a2], [a1]) == (a1, a2)
    assert merge_attempts([a1, a2], []) == (a1, a2)


def test_the_column_leaves_unknown_fields_out() -> None:
    (r,) = coalesce(REPORTS)
    (encoded,) = columns([r])["attempts"]
    stored = json.loads(encoded)
    assert stored["2"] == {
        "state": "running",
        "rank": 2,
        "executor": "exec-b",
        "started_at": "2026-12-02T00:00:40Z",
    }
    assert stored["1"]["exit_code"] == 3 and stored["1"]["rank"] == 3
    assert json.loads(encode_attempts(())) == {}


def test_records_newest_first_with_durations() -> None:
    (r,) = coalesce(REPORTS)
    stored = json.loads(encode_attempts(r.attempts))
    found = attempt_records(stored, {"attempt": 2, "state": "running"})
    assert [(a.attempt, a.state, a.exit_code) for a in found] == [
        (2, "running", None),
        (1, "failed", 3),
    ]
    assert found[0].duration_s is None and found[1].duration_s == 2.0
    assert found[1].started_at == S1


def test_a_row_from_before_the_history_shows_its_latest_attempt() -> None:
    old_row = {
        "attempt": 1,
        "state": "succeeded",
        "executor": "exec-a",
        "started_at": S1,
        "finished_at": S1 + timedelta(seconds=1.5),
        "exit_code": 0,
        "reason": "",
    }
    (only,) = attempt_records({}, old_row)
    assert (only.attempt, only.state, only.executor, only.exit_code) == (
        1,
        "succeeded",
        "exec-a",
        0,
    )
    assert only.duration_s == 1.5
    assert attempt_records(None, {"attempt": 0, "state": "queued"}) == []
