"""A work message's hold ends with its attempt, even when the cancel that ends it is lost.

nats-py's `request` waits in Python 3.11's `asyncio.wait_for`, which swallows a cancel that
arrives after the answer came in but before the waiting task ran again. A hold that survived
its cancel that way kept sending progress for a message already handed back, so the server
never redelivered it (tests/integration/test_cluster3.py: 7 tasks `queued` for 10 minutes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from nats.aio.msg import Msg

from tidegate.executor.workmsg import Slot, hold, stop_holding
from tidegate.wire import TaskSpec, WorkItem

ITEM = WorkItem(
    task_id="alpha:k1",
    client="alpha",
    spec=TaskSpec(key="k1", argv=["/bin/true"]),
    pool="default",
    task_class="short",
    submitted_at=datetime(2026, 1, 1, tzinfo=UTC),
)
ACK_WAIT_S = 1.5  # progress every 0.5 s


@dataclass
class _Client:
    """Answers progress the way nats-py's `request` waits for answers: `wait_for` on a
    future that the connection's reader resolves."""

    asked: list[asyncio.Future[bytes]] = field(default_factory=list)

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.asked.append(answer)
        return await asyncio.wait_for(answer, timeout)


@dataclass
class _Msg:
    _client: _Client
    subject: str = "tg.work.default.short.alpha"
    reply: str = "$JS.ACK.TG_WORK.work_default_short.1.1.1.0.0"


async def _until(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_hold_ends_even_when_its_cancel_meets_a_progress_answer() -> None:
    client = _Client()
    slot = Slot(item=ITEM, attempt=1)
    keeping = asyncio.create_task(hold(cast(Msg, _Msg(client)), slot, ACK_WAIT_S))
    await _until(lambda: len(client.asked) == 1)  # a progress is on the wire
    # Its answer comes in, and the attempt ends (a hand-back was just sent) before the hold
    # runs again: the cancel lands in `wait_for` after the answer, the moment it is lost.
    client.asked[0].set_result(b"")
    stop_holding(slot, keeping)
    await asyncio.wait({keeping}, timeout=3 * ACK_WAIT_S)
    assert keeping.done(), "the hold outlived its attempt"
    assert len(client.asked) == 1, "progress sent after the attempt ended"


async def test_a_hold_sends_no_progress_once_its_message_is_settled() -> None:
    client = _Client()
    slot = Slot(item=ITEM, attempt=1)
    keeping = asyncio.create_task(hold(cast(Msg, _Msg(client)), slot, ACK_WAIT_S))
    await _until(lambda: len(client.asked) == 1)
    client.asked[0].set_result(b"")
    slot.holding = False  # what `hand_back` does right before its nak
    await asyncio.wait({keeping}, timeout=3 * ACK_WAIT_S)
    assert keeping.done() and len(client.asked) == 1


async def test_a_hold_keeps_the_message_while_the_attempt_runs() -> None:
    client = _Client()
    slot = Slot(item=ITEM, attempt=1)
    keeping = asyncio.create_task(hold(cast(Msg, _Msg(client)), slot, ACK_WAIT_S))
    try:
        for n in range(1, 4):
            await _until(lambda n=n: len(client.asked) == n)  # type: ignore[misc]
            client.asked[-1].set_result(b"")
        assert not keeping.done() and not slot.let_go
    finally:
        stop_holding(slot, keeping)
