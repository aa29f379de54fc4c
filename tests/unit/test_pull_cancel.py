"""A pull cancelled at the wrong instant must not drop a message it already took.

nats-py's `next_msg` awaits a task of its own. When that task has taken a message off the
queue and a cancel reaches the caller before it resumes, the message is neither returned nor
left in the queue; a stopping component could then never hand it back, and it would wait out
its consumer's ack wait. The fake subscription below reproduces that shape exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.msg import Msg

from tidegate.bus.handback import TAKEN
from tidegate.bus.pull import take_available


class _Conn:
    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        return None


class _Sub:
    """The shape of nats-py's `Subscription.next_msg`: an inner task awaited by the caller."""

    def __init__(self, took: asyncio.Event) -> None:
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._took = took

    async def next_msg(self, timeout: float) -> Msg:
        async def get() -> Msg:
            msg = await self.queue.get()
            self._took.set()  # wakes the test before the caller: it cancels in between
            return msg

        return await asyncio.create_task(get())


class _PullSub:
    def __init__(self, took: asyncio.Event) -> None:
        self._nc = _Conn()
        self._nms = "$JS.API.CONSUMER.MSG.NEXT.S.C"
        self._deliver = "_INBOX.x"
        self._sub = _Sub(took)


async def test_a_cancel_after_the_message_left_the_queue_keeps_it_for_the_hand_back() -> None:
    took = asyncio.Event()
    sub = _PullSub(took)
    msg = Msg(_client=None, subject="work", reply="$JS.ACK.S.C.1.1.1.0.0", data=b"task")  # type: ignore[arg-type]
    caller = asyncio.create_task(take_available(sub, 5))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the caller is now waiting inside next_msg
    sub._sub.queue.put_nowait(msg)
    await took.wait()
    caller.cancel()  # the inner task is done; the caller has not resumed yet
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    assert any(m is msg for m in TAKEN.unsettled()), "the message taken was dropped"
    for fetch in list(TAKEN.fetches):  # the shielded take ends by its own timeout
        fetch.cancel()
    _forget(msg)


def _forget(msg: Any) -> None:
    msg._ackd = True  # settled: other tests of this process never see it
    TAKEN.unsettled()
