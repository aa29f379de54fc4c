"""What the callback stages store and hold: error texts fit for PostgreSQL, payloads the outbox
can keep, the per-client budget of held events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from tidegate.driver.callbacks.outbox import _storable, unstorable
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.transport import MAX_ERROR_CHARS, CallbackFailed, clean_error
from tidegate.driver.fence import mark_of
from tidegate.driver.notify import _fence_marks, held_max
from tidegate.errors import StoreError
from tidegate.wire import DEFAULT_CALLBACK_HELD_MAX, ClientRecord


def test_clean_error_strips_nul_and_control_characters_and_folds_space() -> None:
    assert (
        clean_error("HTTP 500:\x00 up\x01stream\n\n exploded\x00") == "HTTP 500: up stream exploded"
    )
    assert "\x00" not in str(CallbackFailed("bad \x00 body"))


def test_clean_error_is_bounded() -> None:
    text = clean_error("x" * 100_000)
    assert len(text) == MAX_ERROR_CHARS and text.endswith("…")


def test_clean_error_drops_lone_surrogates() -> None:
    # A body decoded with surrogateescape would hold these; PostgreSQL cannot encode them.
    assert clean_error("a\udcffb") == "a b"


def test_a_callback_is_made_storable_without_nul() -> None:
    cb = Callback(
        event_id="e",
        task_id="c:k",
        client="c",
        key="k",
        state="failed",
        attempt=1,
        at=datetime(2026, 12, 1, tzinfo=UTC),
        reason="exit\x00",
        log_tail="a\x00b",
    )
    kept = _storable(cb)
    assert (kept.reason, kept.log_tail) == ("exit", "ab")
    assert _storable(kept) is kept  # nothing to change: the same object


def test_unstorable_knows_client_side_data_errors_and_sqlstates() -> None:
    nul = psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    assert unstorable(nul)
    wrapped = StoreError("enqueue failed")
    wrapped.__cause__ = nul
    assert unstorable(wrapped)
    assert not unstorable(psycopg.OperationalError("connection refused"))
    assert not unstorable(OSError("no route"))


def test_held_budget_per_client() -> None:
    assert held_max(None) == DEFAULT_CALLBACK_HELD_MAX
    assert held_max(ClientRecord(name="a")) == DEFAULT_CALLBACK_HELD_MAX
    assert held_max(ClientRecord(name="a", callback_held_max=5)) == 5


def _cb(task: str, state: str, attempt: int = 1) -> Callback:
    return Callback(
        event_id=f"{task}-{state}-{attempt}",
        task_id=task,
        client="c",
        key=task,
        state=state,
        attempt=attempt,
        at=datetime(2026, 12, 1, tzinfo=UTC),
    )


def test_fence_marks_only_tasks_with_an_older_state_still_unacked() -> None:
    items: list[Any] = [
        (_cb("a", "dispatched"), None, None),
        (_cb("b", "succeeded"), None, None),
        (_cb("a", "running"), None, None),
        (_cb("a", "succeeded"), None, None),
    ]
    # Only `b` handed off so far: one state, nothing to fence.
    assert _fence_marks(items[:2], 1) == {}
    # The round with a's running and succeeded: a is fenced at its newest.
    assert _fence_marks(items, 2) == {"a": mark_of(0, 1, "succeeded")}
    # A later attempt is newer than any state of an earlier one.
    assert mark_of(0, 2, "dispatched") > mark_of(0, 1, "succeeded")


def test_fence_marks_every_task_while_an_earlier_holder_may_hold_older_states() -> None:
    items: list[Any] = [
        (_cb("a", "running"), None, None),
        (_cb("b", "succeeded"), None, None),
        (_cb("a", "succeeded"), None, None),
    ]
    # In a term's first ack wait, b's lone `succeeded` is fenced too: its `running` may be
    # unacked at a frozen holder and come back after it.
    assert _fence_marks(items, 1, every=True) == {
        "a": mark_of(0, 1, "succeeded"),
        "b": mark_of(0, 1, "succeeded"),
    }
    assert _fence_marks(items, 1) == {"a": mark_of(0, 1, "succeeded")}
