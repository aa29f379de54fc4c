"""Times on the wire: events and heartbeats with a naive, overflowing or absurd time do not
decode (a validation error, so that the stage sets them aside instead of crashing on them)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from tidegate.wire import (
    EARLIEST_TIME,
    LATEST_TIME,
    Heartbeat,
    Succeeded,
    check_time,
    decode_event,
    decode_heartbeat,
    encode,
)

T0 = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)


def event(**times: Any) -> bytes:
    body: dict[str, Any] = {
        "state": "succeeded",
        "task_id": "c:k",
        "client": "c",
        "key": "k",
        "attempt": 1,
        "at": T0.isoformat(),
        "submitted_at": T0.isoformat(),
        "finished_at": T0.isoformat(),
    }
    body.update(times)
    return json.dumps(body).encode()


def heartbeat(at: str, started_at: str | None = None) -> bytes:
    running = []
    if started_at is not None:
        running.append(
            {
                "task_id": "c:k",
                "client": "c",
                "key": "k",
                "attempt": 1,
                "pool": "default",
                "started_at": started_at,
                "submitted_at": T0.isoformat(),
            }
        )
    hb = {
        "executor": "e",
        "host": "h",
        "pid": 1,
        "pools": ["default"],
        "slots": 1,
        "running": running,
        "load": 0.0,
        "at": at,
    }
    return json.dumps(hb).encode()


BAD_TIMES = {
    "year 9999": "9999-12-31T23:59:59Z",
    "offset that overflows": "9999-12-31T23:59:59-23:59",
    "offset that underflows": "0001-01-01T00:00:00+23:59",
    "naive": "2026-11-27T00:00:00",
    "before 2000": "1970-01-01T00:00:00Z",
    "after 2199": "2200-01-01T00:00:00Z",
}


@pytest.mark.parametrize("field", ["at", "submitted_at", "finished_at", "started_at"])
@pytest.mark.parametrize("text", BAD_TIMES.values(), ids=BAD_TIMES.keys())
def test_event_with_a_bad_time_is_a_validation_error(field: str, text: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        decode_event(event(**{field: text}))


@pytest.mark.parametrize("text", BAD_TIMES.values(), ids=BAD_TIMES.keys())
def test_heartbeat_with_a_bad_time_is_a_validation_error(text: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="`at`"):
        decode_heartbeat(heartbeat(text))
    with pytest.raises(msgspec.ValidationError, match="started_at"):
        decode_heartbeat(heartbeat(T0.isoformat(), started_at=text))


def test_times_at_the_edges_and_in_any_offset_decode() -> None:
    east = timezone(timedelta(hours=14))
    for at in (EARLIEST_TIME, LATEST_TIME - timedelta(microseconds=1), T0.astimezone(east)):
        got = decode_event(event(at=at.isoformat()))
        assert got.at == at
        assert decode_heartbeat(heartbeat(at.isoformat())).at == at


def test_building_a_message_checks_too() -> None:
    with pytest.raises(ValueError, match="out of range"):
        Succeeded(
            task_id="c:k",
            client="c",
            key="k",
            attempt=1,
            at=datetime(9999, 12, 31, tzinfo=UTC),
            submitted_at=T0,
            finished_at=T0,
        )
    hb = Heartbeat(executor="e", host="h", pid=1, pools=[], slots=1, running=[], load=0.0, at=T0)
    assert decode_heartbeat(encode(hb)) == hb
    check_time("x", None)
