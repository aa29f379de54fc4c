"""How an executor follows its control key, and the wire form of that key (no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from nats.js.kv import KeyValue

from tidegate.config import ExecutorSettings, Limits
from tidegate.executor.agent import Executor
from tidegate.executor.control import ControlFollower
from tidegate.metrics import ExecutorMetrics
from tidegate.wire import (
    ExecutorControl,
    Heartbeat,
    decode_executor_control,
    decode_heartbeat,
    encode,
)

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
NO_SERVER: Any = None  # the agent touches NATS only in its loops, which these tests do not run


def agent() -> Executor:
    return Executor(
        NO_SERVER,
        NO_SERVER,
        NO_SERVER,
        ExecutorSettings(executor_id="exec-0", slots=2),
        Limits(),
        ExecutorMetrics(),
    )


def entry(value: bytes | None, *, revision: int = 1, operation: str | None = None) -> Any:
    return KeyValue.Entry(
        bucket="tg_executor_control",
        key="exec-0",
        value=value,
        revision=revision,
        delta=0,
        created=0,
        operation=operation,
    )


def control(*, cordoned: bool, drain: bool = False) -> bytes:
    return encode(ExecutorControl(cordoned=cordoned, drain=drain, by="alice", at=T0))


def follower(a: Executor) -> ControlFollower:
    return ControlFollower(cast(KeyValue, NO_SERVER), a)


def test_control_round_trip() -> None:
    value = ExecutorControl(cordoned=True, drain=True, by="alice", at=T0)
    assert decode_executor_control(encode(value)) == value
    # `drain` may be left out: a plain cordon.
    plain = decode_executor_control(b'{"cordoned": true, "by": "b", "at": "2026-12-01T00:00:00Z"}')
    assert plain.cordoned and not plain.drain


def test_heartbeat_of_an_older_executor_decodes_uncordoned() -> None:
    hb = Heartbeat(
        executor="e", host="h", pid=1, pools=["default"], slots=1, running=[], load=0.0, at=T0
    )
    data = json.loads(encode(hb))
    del data["cordoned"]
    back = decode_heartbeat(json.dumps(data).encode())
    assert back.cordoned is False and back.draining is False


async def test_cordon_and_uncordon_follow_the_key() -> None:
    a = agent()
    f = follower(a)
    assert not a.cordoned and not a.cordon_in_effect
    f._apply(entry(control(cordoned=True)))
    assert a.cordoned and a.cordon_in_effect
    assert decode_heartbeat(a.snapshot()).cordoned
    f._apply(entry(control(cordoned=False), revision=2))
    assert not a.cordoned and not decode_heartbeat(a.snapshot()).cordoned
    assert not f.drain_requested.is_set()


async def test_a_removed_key_uncordons_and_a_bad_value_changes_nothing() -> None:
    a = agent()
    f = follower(a)
    f._apply(entry(control(cordoned=True)))
    f._apply(entry(b"{not json", revision=2))
    assert a.cordoned
    f._apply(entry(b"", revision=3, operation="DEL"))
    assert not a.cordoned


async def test_drain_cordons_and_asks_to_stop_once() -> None:
    a = agent()
    f = follower(a)
    f._apply(entry(control(cordoned=False, drain=True), revision=7))
    assert a.cordoned and f.drain_requested.is_set()
    assert f._drain is not None and f._drain[1:] == ("exec-0", 7)
    f._apply(entry(control(cordoned=False, drain=True), revision=8))  # the watch repeats it
    assert f._drain[1:] == ("exec-0", 7)


@pytest.mark.parametrize("reserved", [0, 1])
async def test_cordon_is_in_effect_once_no_fetch_is_waiting(reserved: int) -> None:
    a = agent()
    a._reserved = reserved  # a fetch that began before the cordon may still bring a task
    a.cordon(True, by="alice")
    assert a.cordon_in_effect is (reserved == 0)
    assert decode_heartbeat(a.snapshot()).cordoned is (reserved == 0)
