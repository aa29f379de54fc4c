"""An executor's heartbeat (its snapshot in the executors bucket) and an operator's control
value for it (the control bucket)."""

from __future__ import annotations

from datetime import datetime

import msgspec
from msgspec import Struct

from tidegate.wire.times import check_time


class RunningTask(Struct, frozen=True, kw_only=True):
    task_id: str
    client: str
    key: str
    attempt: int
    pool: str
    started_at: datetime
    submitted_at: datetime
    run: int = 0  # the run's id, as on `WorkItem`

    def __post_init__(self) -> None:
        check_time("started_at", self.started_at)
        check_time("submitted_at", self.submitted_at)


class Heartbeat(Struct, frozen=True, kw_only=True):
    """An executor's snapshot, written to the executors KV bucket every interval."""

    executor: str
    host: str
    pid: int
    pools: list[str]
    slots: int
    running: list[RunningTask]
    load: float
    at: datetime
    draining: bool = False
    # Takes no new work (an operator's cordon, or a drain). Defaults keep older heartbeats
    # decodable.
    cordoned: bool = False

    def __post_init__(self) -> None:
        check_time("at", self.at)


_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)


class ExecutorControl(Struct, frozen=True, kw_only=True):
    """An operator's instruction to one executor, the value of its key in the control bucket.

    `cordoned`: take no new work (running tasks go on) until a value without it arrives.
    `drain`: cordon, let the running tasks finish (up to the drain timeout, then hand back the
    rest) and exit; the executor then rewrites its key as cordoned only, so that it comes back
    cordoned when restarted.
    """

    cordoned: bool
    drain: bool = False
    by: str
    at: datetime


_control_decoder = msgspec.json.Decoder(ExecutorControl)


def decode_executor_control(data: bytes) -> ExecutorControl:
    return _control_decoder.decode(data)
