"""One flattening of a state event, read by both the projection row and the callback payload."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tidegate import wire
from tidegate.driver.callbacks.payload import callback_from_event, callback_from_flat, encode_one
from tidegate.store.flatten import FlatEvent, flatten
from tidegate.store.rows import row_from_event, row_from_flat

T0 = datetime(2026, 11, 27, 23, 59, 58, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)
SPEC = wire.TaskSpec(key="k1", argv=["/bin/true"])
COMMON: dict[str, Any] = {
    "task_id": "c1:k1",
    "client": "c1",
    "key": "k1",
    "attempt": 2,
    "at": T1,
    "submitted_at": T0,
}
# README, "HTTP callbacks are POSTed JSON (...)": the outside contract, in this order.
CONTRACT = [
    "event_id",
    "task_id",
    "client",
    "key",
    "state",
    "attempt",
    "at",
    "executor",
    "exit_code",
    "reason",
    "log_tail",
    "started_at",
    "finished_at",
    "run",
]


def every_event() -> list[wire.AnyEvent | wire.Finished]:
    finished: dict[str, Any] = dict(
        executor="e1", exit_code=3, reason="why", log_tail="tail", started_at=T0, finished_at=T1
    )
    return [
        wire.Queued(**COMMON, spec=SPEC, pool="p", task_class="long"),
        wire.Dispatched(**COMMON, pool="p", executor="e1"),
        wire.Running(**COMMON, executor="e1", started_at=T0),
        *(cls(**COMMON, **finished) for cls in wire.FINISHED_BY_STATE.values()),
    ]


def test_each_state_carries_its_own_fields() -> None:
    base: dict[str, Any] = {**COMMON}
    queued, dispatched, running, *finished = (flatten(e) for e in every_event())
    assert queued == FlatEvent(
        **base,
        event_id="c1:k1/2/queued",
        state="queued",
        spec=SPEC,
        pool="p",
        task_class="long",
    )
    # The spec side is the queued event's alone, even though `dispatched` names the pool too.
    assert dispatched == FlatEvent(
        **base, event_id="c1:k1/2/dispatched", state="dispatched", executor="e1"
    )
    assert running == FlatEvent(
        **base, event_id="c1:k1/2/running", state="running", executor="e1", started_at=T0
    )
    for flat, state in zip(finished, wire.FINISHED_BY_STATE, strict=True):
        assert flat == FlatEvent(
            **base,
            event_id=f"c1:k1/2/{state}",
            state=state,
            executor="e1",
            exit_code=3,
            reason="why",
            log_tail="tail",
            started_at=T0,
            finished_at=T1,
        )


def test_finished_defaults_stay_empty_strings_not_nulls() -> None:
    flat = flatten(wire.Lost(**COMMON, finished_at=T1))
    assert (flat.executor, flat.exit_code, flat.reason, flat.log_tail) == (None, None, "", "")


@pytest.mark.parametrize("event", every_event(), ids=lambda e: e.state)
def test_row_and_callback_agree_with_the_flat_event(event: wire.AnyEvent | wire.Finished) -> None:
    flat = flatten(event)
    row, callback = row_from_event(event), callback_from_event(event)
    assert row == row_from_flat(flat) and callback == callback_from_flat(flat)
    shared = [
        "task_id",
        "client",
        "key",
        "state",
        "attempt",
        "executor",
        "exit_code",
        "reason",
        "log_tail",
        "started_at",
        "finished_at",
        "run",
    ]
    for name in shared:
        assert getattr(row, name) == getattr(callback, name) == getattr(flat, name), name
    assert (row.spec, row.pool, row.task_class) == (flat.spec, flat.pool, flat.task_class)
    assert row.submitted_at == flat.submitted_at
    assert (callback.event_id, callback.at) == (event.event_id, event.at)


@pytest.mark.parametrize("event", every_event(), ids=lambda e: e.state)
def test_callback_json_is_exactly_the_contract(event: wire.AnyEvent | wire.Finished) -> None:
    data = json.loads(encode_one(callback_from_event(event)))
    assert list(data) == CONTRACT


def test_callback_json_bytes_are_pinned() -> None:
    event = wire.Failed(**COMMON, executor="e1", exit_code=3, reason="r", finished_at=T1)
    assert encode_one(callback_from_event(event)) == (
        b'{"event_id":"c1:k1/2/failed","task_id":"c1:k1","client":"c1","key":"k1",'
        b'"state":"failed","attempt":2,"at":"2026-11-28T00:00:03Z","executor":"e1",'
        b'"exit_code":3,"reason":"r","log_tail":"","started_at":null,'
        b'"finished_at":"2026-11-28T00:00:03Z","run":0}'
    )
