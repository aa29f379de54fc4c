"""The projector's memory stays bounded while the database is away: `running` rows offered by
heartbeats are capped, the oldest dropped first and counted."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tidegate.config import DriverSettings
from tidegate.driver.projector import Projector
from tidegate.metrics import DriverMetrics
from tidegate.wire import Heartbeat, RunningTask

T0 = datetime(2026, 11, 27, tzinfo=UTC)


def beat(first: int, count: int) -> Heartbeat:
    running = [
        RunningTask(
            task_id=f"c:k{i}",
            client="c",
            key=f"k{i}",
            attempt=1,
            pool="default",
            started_at=T0,
            submitted_at=T0,
        )
        for i in range(first, first + count)
    ]
    return Heartbeat(
        executor="e",
        host="h",
        pid=1,
        pools=["default"],
        slots=count,
        running=running,
        load=0.0,
        at=T0,
    )


def test_heartbeat_rows_waiting_for_the_database_are_capped() -> None:
    metrics = DriverMetrics()
    none: Any = None
    projector = Projector(none, none, DriverSettings(), metrics)
    projector.heartbeat_rows_max = 5
    projector.offer_heartbeat(beat(0, 4))
    projector.offer_heartbeat(beat(0, 4))  # the same tasks again: nothing new
    assert metrics.heartbeat_rows_dropped._value.get() == 0
    projector.offer_heartbeat(beat(4, 4))
    held = [key[0] for key in projector._heartbeat_rows]
    assert held == ["c:k3", "c:k4", "c:k5", "c:k6", "c:k7"]  # the oldest went first
    assert metrics.heartbeat_rows_dropped._value.get() == 3
