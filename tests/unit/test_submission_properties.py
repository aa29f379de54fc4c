"""Property tests of the routing decision: whatever a connection publishes as a submission,
`decide` answers with a task (queued), a rejection with a reason, or `Unroutable` (a message
dead letter); never another exception, and never an event the bus or the store cannot take.

The adversarial shapes are the ones issue 10 lists: random bytes, wrong types, huge strings,
deep JSON, NUL bytes, invalid UTF-8, odd dates, unknown pools, wildcard and dotted names.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from adversarial import BODIES, HEADERS, NAMES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import Decision, Unroutable, decide, to_publish
from tidegate.wire import (
    KEY_PATTERN,
    ClientRecord,
    Queued,
    Rejected,
    decode_event,
    decode_work_item,
)

STORED_AT = datetime(2026, 12, 2, 0, 0, 1, tzinfo=UTC)
CLIENTS = {"alpha": ClientRecord(name="alpha"), "beta": ClientRecord(name="beta", sensitive=True)}
LIMITS = Limits()


def _valid_text(s: str) -> bool:
    return "\0" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client=NAMES, body=BODIES, header=HEADERS, seq=st.integers(1, 2**63 - 1))
def test_any_submission_is_queued_rejected_with_a_reason_or_unroutable(
    client: str, body: bytes, header: str | None, seq: int
) -> None:
    try:
        d = decide(
            f"tg.submit.{client}",
            body,
            header,
            seq,
            STORED_AT,
            lookup=CLIENTS.get,
            settings=DriverSettings(),
            limits=LIMITS,
        )
    except Unroutable as exc:
        assert str(exc), "a dead letter carries its reason"
        return
    _check_decision(d)


def _check_decision(d: Decision) -> None:
    event = d.event
    assert isinstance(event, Queued | Rejected)
    # The id a client looks for: a key the schema accepts, storable text.
    assert re.match(KEY_PATTERN, event.key), event.key
    assert _valid_text(event.task_id) and _valid_text(event.client)
    if isinstance(event, Rejected):
        assert d.work is None
        assert event.reason and _valid_text(event.reason)
    else:
        assert d.work is not None and d.work.task_id == event.task_id
    # Whatever is published for it reads back the same on the other side of the bus.
    for out in to_publish(d):
        if out.subject.startswith("tg.event."):
            assert decode_event(out.payload) == event
        else:
            assert d.work is not None and decode_work_item(out.payload) == d.work
