"""Rows that linger before they are written (mesh/store/linger.py): a task that finishes within
the linger is one row write, insert and terminal state together."""

from __future__ import annotations

from datetime import UTC, datetime

from tidegate.store.linger import Lingering
from tidegate.store.rows import TaskRow
from tidegate.wire import TaskSpec

T0 = datetime(2026, 12, 2, tzinfo=UTC)
SPEC = TaskSpec(key="k", argv=["/bin/true"])


def row(state: str, task: str = "c:k", attempt: int = 0, run: int = 1) -> TaskRow:
    return TaskRow(
        task_id=task,
        client="c",
        key=task.split(":")[1],
        submitted_at=T0,
        state=state,
        attempt=attempt,
        spec=SPEC if state == "queued" else None,
        pool="default" if state == "queued" else None,
        exit_code=0 if state == "succeeded" else None,
        run=run,
    )


def test_a_task_finishing_within_the_linger_is_one_write() -> None:
    waiting: Lingering[str] = Lingering()
    waiting.add(row("queued"), "m-queued", now=10.0)
    assert waiting.take_due(10.1, 0.2) == []  # young and not terminal: waits
    waiting.add(row("running", attempt=1), None, now=10.1)  # from a heartbeat: no message
    waiting.add(row("succeeded", attempt=1), "m-done", now=10.15)
    (due,) = waiting.take_due(10.15, 0.2)
    assert due.msgs == ["m-queued", "m-done"]
    assert due.folded == 2
    # The one row carries the insert's spec side and the terminal state.
    assert (due.row.state, due.row.attempt, due.row.exit_code) == ("succeeded", 1, 0)
    assert due.row.spec == SPEC and due.row.pool == "default"
    assert len(waiting) == 0


def test_a_task_still_running_after_the_linger_is_written_then() -> None:
    waiting: Lingering[str] = Lingering()
    waiting.add(row("queued", task="c:a"), "qa", now=1.0)
    waiting.add(row("queued", task="c:b"), "qb", now=1.15)
    assert waiting.oldest_at() == 1.0
    (due,) = waiting.take_due(1.2, 0.2)  # only the one that waited a whole linger
    assert due.row.task_id == "c:a" and due.row.state == "queued"
    assert list(waiting.msgs()) == ["qb"]
    assert waiting.oldest_at() == 1.15


def test_runs_and_tasks_never_fold_together_and_a_full_batch_takes_everything() -> None:
    waiting: Lingering[str] = Lingering()
    waiting.add(row("queued", run=1), "r1", now=0.0)
    waiting.add(row("queued", run=2), "r2", now=0.0)
    waiting.add(row("queued", task="c:other"), "o", now=0.0)
    assert len(waiting) == 3
    due = waiting.take_due(0.0, 0.2, everything=True)
    assert [d.msgs for d in due] == [["r1"], ["r2"], ["o"]]
    assert waiting.oldest_at() is None


def test_an_older_report_arriving_late_does_not_move_the_row_back() -> None:
    waiting: Lingering[str] = Lingering()
    waiting.add(row("succeeded", attempt=1), "done", now=0.0)
    waiting.add(row("queued"), "queued", now=0.0)
    (due,) = waiting.take_due(0.0, 0.2)
    assert due.row.state == "succeeded" and due.row.spec == SPEC
