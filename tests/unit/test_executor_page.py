"""The Executors page's reading of heartbeats and control keys (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from jinja2 import Environment, FileSystemLoader

from tidegate.console.app import templates_dir
from tidegate.console.executors import (
    EXECUTOR_ID,
    ExecutorsPage,
    duration_words,
    executor_state,
    live_context,
    pending_of,
    view_of,
)
from tidegate.wire import ExecutorControl, Heartbeat, RunningTask

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)


def beat(*, running: int = 0, cordoned: bool = False, draining: bool = False) -> Heartbeat:
    return Heartbeat(
        executor="exec-0",
        host="h1",
        pid=42,
        pools=["default"],
        slots=4,
        running=[
            RunningTask(
                task_id=f"alpha:k/{i}",
                client="alpha",
                key=f"k/{i}",
                attempt=1 + i,
                pool="default",
                started_at=T0 - timedelta(seconds=90 + i),
                submitted_at=T0 - timedelta(seconds=100),
            )
            for i in range(running)
        ],
        load=0.5,
        at=T0 - timedelta(seconds=1),
        draining=draining,
        cordoned=cordoned,
    )


def order(*, cordoned: bool, drain: bool = False) -> ExecutorControl:
    return ExecutorControl(cordoned=cordoned, drain=drain, by="alice", at=T0)


@pytest.mark.parametrize(
    ("hb", "control", "state"),
    [
        (beat(), None, "active"),
        (beat(running=1, cordoned=True), order(cordoned=True), "cordoned"),
        (beat(cordoned=True), order(cordoned=True), "drained"),
        (beat(running=1, draining=True), order(cordoned=True, drain=True), "draining"),
        (None, order(cordoned=True), "drained"),  # stopped while cordoned
    ],
)
def test_state(hb: Heartbeat | None, control: ExecutorControl | None, state: str) -> None:
    assert executor_state(hb, control) == state


def test_pending_says_what_is_not_in_effect_yet() -> None:
    assert pending_of(beat(), order(cordoned=True)) == "cordon requested by alice"
    assert pending_of(beat(), order(cordoned=True, drain=True)) == "drain requested by alice"
    assert pending_of(beat(cordoned=True), order(cordoned=False)) == "uncordon requested by alice"
    assert pending_of(beat(cordoned=True), order(cordoned=True)) == ""
    assert pending_of(beat(), None) == ""


def test_durations() -> None:
    assert duration_words(-3) == "0 s"
    assert duration_words(59.9) == "59 s"
    assert duration_words(125) == "2 min 05 s"
    assert duration_words(3 * 3600 + 7 * 60) == "3 h 07 min"
    assert duration_words(2 * 86400 + 3600) == "2 d 1 h"


def test_executor_ids_are_kv_keys() -> None:
    for good in ("exec-0", "host.example-123", "a/b", "x=y_z"):
        assert EXECUTOR_ID.match(good)
    for bad in ("", ".x", "x.", "a b", "<script>", "é"):
        assert not EXECUTOR_ID.match(bad)


def test_view_and_render() -> None:
    hb = beat(running=2, cordoned=True)
    view = view_of("exec-0", hb, order(cordoned=True), at=T0, interval_s=0.4)
    assert view.state == "cordoned" and view.used == 2 and view.age == "1 s" and view.late
    assert [t.task_id for t in view.running] == ["alpha:k/1", "alpha:k/0"]  # oldest first
    assert view.running[0].running_for == "1 min 31 s"
    page = ExecutorsPage(at=T0, rows=[view])
    env = Environment(loader=FileSystemLoader(templates_dir()), autoescape=True)
    env.globals["csrf_token"] = lambda: "tok"
    html = env.get_template("executors_live.html").render(live_context(page))
    assert 'data-state="cordoned"' in html
    assert 'href="/task?id=alpha%3Ak/0"' in html
    assert 'action="/executors/exec-0/uncordon"' in html
    assert 'action="/executors/exec-0/drain"' in html
    assert 'name="_csrf_token" value="tok"' in html
    assert "2 of 4 slots in use" in html
