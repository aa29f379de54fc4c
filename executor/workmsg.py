"""The work message of a running task: kept alive while the task runs, acked after its report,
handed back (nak) when the executor gives the task up.

JetStream counts a work message as this executor's only while `in_progress` reaches it within
the ack wait; past that, the task may already be another executor's next attempt, and neither
a progress nor an ack from here may touch it any more.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg

from tidegate.backoff import Backoff
from tidegate.wire import WorkItem, now

log = logging.getLogger(__name__)

# An ack after the report is stored: a few tries, then the task runs again (at least once).
ACK_TRIES = 5
ACK_RETRY = Backoff(base_s=0.2, cap_s=3.2)


@dataclass
class Slot:
    """A task running here: what the heartbeat reports and what a cancel request reaches."""

    item: WorkItem
    attempt: int
    started_at: datetime = field(default_factory=now)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = "cancelled by request"
    # Last moment (loop time) JetStream surely still counted the work message as ours.
    touched: float = field(default_factory=lambda: asyncio.get_running_loop().time())


def still_ours(slot: Slot, ack_wait_s: float) -> bool:
    elapsed = asyncio.get_running_loop().time() - slot.touched
    return elapsed < ack_wait_s


async def keepalive(msg: Msg, slot: Slot, ack_wait_s: float) -> None:
    interval = max(ack_wait_s / 3, 0.5)
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        if not still_ours(slot, ack_wait_s):
            continue  # too late: a progress now could extend another executor's attempt
        try:
            sent = loop.time()
            # A request, not a plain publish: only the server's answer proves it counted
            # this progress (a publish made while disconnected would just be buffered).
            await msg._client.request(msg.reply, b"+WPI", timeout=interval)
            slot.touched = sent
        except Exception as exc:  # disconnected: keep trying, the server may come back
            log.warning("in_progress for %s failed: %s", msg.subject, exc)


async def ack(msg: Msg) -> None:
    for failures in range(1, ACK_TRIES + 1):
        try:
            await msg.ack_sync(timeout=2.0)
            return
        except Exception as exc:
            log.warning("ack of %s failed (%s), try %d", msg.subject, exc, failures)
            await asyncio.sleep(ACK_RETRY.delay(failures))
    # Not acked: the work message is redelivered and the task runs again; its result is
    # already reported, and the projection keeps the first terminal state of the new attempt.


async def nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except Exception as exc:
        log.warning("nak of %s failed: %s", msg.subject, exc)
