"""A handed-back work message comes back, whatever its hold was doing at that moment; and an
executor's pull that finds no consumer to answer (503) waits instead of failing.

The hold's progress is a request to the server. When the attempt ends right after a progress's
answer came in but before the hold ran again, Python 3.11's `wait_for` (inside nats-py's
`request`) swallows the hold's cancel. Such a hold kept sending progress for good, and each
progress restarted the ack timer of the message just nak'ed: the task sat ack-pending, never
ran again, and nothing logged (tests/integration/test_cluster3.py, 7 of 3,000 tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.pull import first_message
from tidegate.bus.topology import ensure_all, ensure_work_consumer
from tidegate.config import Limits
from tidegate.executor.workmsg import Slot, hand_back, hold, stop_holding
from tidegate.wire import TaskSpec, WorkItem, decode_work_item, encode

ACK_WAIT_S = 1.5  # a progress every 0.5 s
LIMITS = Limits(work_ack_wait_s=ACK_WAIT_S)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url, "test-hold")
    yield conn
    await conn.close()


async def _one_work_message(js: JetStreamContext) -> tuple[JetStreamContext.PullSubscription, Msg]:
    durable = await ensure_work_consumer(js, "default", "short", LIMITS)
    item = WorkItem(
        task_id="alpha:k1",
        client="alpha",
        spec=TaskSpec(key="k1", argv=["/bin/true"]),
        pool="default",
        task_class="short",
        submitted_at=datetime.now(UTC),
    )
    await js.publish(names.work_subject("default", "short", "alpha"), encode(item))
    sub = await js.pull_subscribe_bind(durable, stream=names.WORK_STREAM)
    got = await first_message(sub, wait=5.0)
    assert len(got) == 1
    return sub, got[0]


async def _progress_in_flight(nc: NATS, known: set[str]) -> asyncio.Future[Msg]:
    """The answer future of the next request the connection makes (the hold's progress)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5 * ACK_WAIT_S
    while loop.time() < deadline:
        # nats-py keeps each request's answer future here until the answer comes in.
        fresh = [f for token, f in nc._resp_map.items() if token not in known]
        if fresh:
            return fresh[0]
        await asyncio.sleep(0.005)
    raise AssertionError("the hold sent no progress")


async def test_a_hand_back_is_redelivered_even_if_the_holds_cancel_is_lost(nc: NATS) -> None:
    js = nc.jetstream()
    buckets = await ensure_all(js, LIMITS)
    sub, msg = await _one_work_message(js)
    slot = Slot(item=decode_work_item(msg.data), attempt=1)
    known = set(nc._resp_map)
    keeping = asyncio.create_task(hold(msg, slot, ACK_WAIT_S))
    answer = await _progress_in_flight(nc, known)
    # The attempt ends the moment the progress's answer is in, before the hold runs again:
    # the cancel reaches `wait_for` too late and is swallowed (Python 3.11).
    answer.add_done_callback(lambda _f: stop_holding(slot, keeping))
    await asyncio.wait({keeping}, timeout=5 * ACK_WAIT_S)
    assert keeping.done(), "the hold outlived its attempt"
    await hand_back(buckets.handbacks, msg, slot, delay=0.2)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4 * ACK_WAIT_S
    again: list[Msg] = []
    while not again and loop.time() < deadline:
        again = await first_message(sub, wait=0.5)
    assert again, "the handed-back message was not redelivered"
    assert again[0].metadata.sequence.stream == msg.metadata.sequence.stream
    assert again[0].metadata.num_delivered == 2
    await again[0].ack()


async def test_a_pull_without_a_consumer_to_answer_waits_and_then_takes(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_all(js, LIMITS)
    durable = await ensure_work_consumer(js, "default", "short", LIMITS)
    sub = await js.pull_subscribe_bind(durable, stream=names.WORK_STREAM)
    # No consumer, nobody answers the pull: the server says 503, as while a cluster elects
    # the consumer's leader.
    await js.delete_consumer(names.WORK_STREAM, durable)
    loop = asyncio.get_running_loop()
    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        await first_message(sub, wait=0.5)  # the router's form: it makes the consumer again
    started = loop.time()
    assert await first_message(sub, wait=0.5, wait_out_unavailable=True) == []
    assert loop.time() - started >= 0.4  # waited like a pull, no tight loop
    # The consumer is back: the same subscription takes work again.
    await ensure_work_consumer(js, "default", "short", LIMITS)
    item = WorkItem(
        task_id="alpha:k2",
        client="alpha",
        spec=TaskSpec(key="k2", argv=["/bin/true"]),
        pool="default",
        task_class="short",
        submitted_at=datetime.now(UTC),
    )
    await js.publish(names.work_subject("default", "short", "alpha"), encode(item))
    got: list[Msg] = []
    deadline = loop.time() + 10
    while not got and loop.time() < deadline:
        got = await first_message(sub, wait=0.5)
    assert [decode_work_item(m.data).task_id for m in got] == ["alpha:k2"]
    await got[0].ack()
