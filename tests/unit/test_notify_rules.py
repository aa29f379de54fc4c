"""The notifier's pure rules: who hears of what, and which late reports are dropped."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tidegate.driver.notify import LatestStates, wants_callback
from tidegate.wire import ClientRecord, Dispatched, Failed, Queued, Running, Succeeded, TaskSpec

T0 = datetime(2026, 11, 27, tzinfo=UTC)
HOOKED = ClientRecord(name="c", callback_url="http://127.0.0.1:9/hook")


def base(attempt: int = 1, sensitive: bool = False) -> dict[str, Any]:
    return dict(
        task_id="c:k",
        client="c",
        key="k",
        attempt=attempt,
        at=T0,
        submitted_at=T0,
        sensitive=sensitive,
    )


def test_non_sensitive_clients_hear_terminal_states_only() -> None:
    running = Running(**base(), executor="e", started_at=T0)
    done = Succeeded(**base(), finished_at=T0)
    assert not wants_callback(running, HOOKED)
    assert wants_callback(done, HOOKED)


def test_sensitive_clients_hear_every_transition_but_queued() -> None:
    spec = TaskSpec(key="k", argv=["true"])
    queued = Queued(**base(0, True), spec=spec, pool="p", task_class="short")
    assert not wants_callback(queued, HOOKED)
    assert wants_callback(Dispatched(**base(0, True), pool="p"), HOOKED)
    assert wants_callback(Running(**base(1, True), executor="e", started_at=T0), HOOKED)


def test_no_transport_or_unknown_client_means_no_callback() -> None:
    done = Succeeded(**base(), finished_at=T0)
    assert not wants_callback(done, ClientRecord(name="c"))
    assert not wants_callback(done, None)


def test_late_report_of_an_older_attempt_is_stale() -> None:
    fence = LatestStates()
    second = Succeeded(**base(2), finished_at=T0)
    first = Failed(**base(1), finished_at=T0, exit_code=7)
    assert not fence.stale(second)
    assert fence.stale(first)
    assert not fence.stale(second)  # a redelivered duplicate is not stale


def test_the_fence_forgets_the_oldest_tasks_beyond_its_limit() -> None:
    fence = LatestStates(limit=2)
    for key in ("a", "b", "c"):
        fence.stale(Succeeded(**{**base(2), "task_id": f"c:{key}"}, finished_at=T0))
    late_a = Failed(**{**base(1), "task_id": "c:a"}, finished_at=T0)
    late_c = Failed(**{**base(1), "task_id": "c:c"}, finished_at=T0)
    assert not fence.stale(late_a)  # forgotten: bounded memory wins over a rare late report
    assert fence.stale(late_c)


def test_the_fence_is_per_run() -> None:
    """A later run of the task id starts again at attempt 1: it is not stale after the
    earlier run's attempt 3, and the earlier run's late report stays stale."""
    fence = LatestStates()
    old_run = Succeeded(**base(3), finished_at=T0, run=10)
    new_run = Running(**base(1), executor="e1", started_at=T0, run=25)
    assert not fence.stale(old_run)
    assert not fence.stale(new_run)
    assert fence.stale(Failed(**base(2), finished_at=T0, exit_code=1, run=10))
