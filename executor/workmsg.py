"""The work message of a running task: held while the task runs, acked after its report,
handed back when the executor gives the task up.

Ownership. JetStream counts a work message as this executor's only while `in_progress` reaches
it within the ack wait; past that, the task may already be another executor's next attempt.
`Slot.touched` is the *send* time of the last progress the server answered (a request, not a
publish: a publish made while disconnected is only buffered, and its answer proves the server
restarted its ack timer at some moment after we sent it). So the work is surely ours until
`touched + ack_wait`, less a margin for the progress's time on the wire. An executor that can no
longer prove it (its progress went unanswered: cut off from NATS, or frozen by SIGSTOP or a
stalled VM; the loop's monotonic clock shows the jump at once when it runs again) lets the task
go: it kills the process group with SIGKILL at once — every moment the stale copy runs it may
repeat the side effects of the attempt that now owns the task — and sends nothing more for that
attempt: no event, no ack (it would delete the new attempt's message), no nak (it would hand
the new attempt's message to a third executor).

Attempts and hand-backs. JetStream's `num_delivered` counts every delivery, a graceful
hand-back (drain, shutdown, an executor's own error before the process started) included, and
the redelivered message is the same bytes: nothing in it can say "handed back". So the
executor that hands a message back first records it in the hand-backs bucket, keyed by task and
the message's stream sequence, as the number of hand-backs so far; the next executor subtracts
that from `num_delivered` to get the attempt. Only the holder of a message writes its key (one
holder at a time), so a plain put is enough. Without the record (NATS refused the put, or an
executor died or was cut off) the delivery counts as an attempt: an attempt is never lost,
only occasionally charged. The work consumer's `max_deliver` allows for hand-backs on top of
the most attempts a task may ask for (`WORK_HANDBACK_ALLOWANCE` in bus/topology.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import datetime

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus import delivery
from tidegate.wire import WorkItem, now

log = logging.getLogger(__name__)

# An ack after the report is stored: a few tries, then the task runs again (at least once).
ACK_TRIES = 5
ACK_RETRY = Backoff(base_s=0.2, cap_s=3.2)
# An executor's own error before the process started (say, no process could be forked): the
# message goes back with a growing delay, and this executor pauses its fetching as long.
PRESTART_RETRY = Backoff(base_s=1.0, cap_s=60.0)
# Recording a hand-back may not hold up a shutdown: past this the delivery counts as an attempt.
RECORD_TIMEOUT_S = 2.0
LET_GO_REASON = "no longer this executor's task: its progress was not accepted within the ack wait"


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
    handbacks: int = 0  # earlier deliveries of this message that were handed back
    pgid: int | None = None  # the process group, once the process started
    let_go: bool = False  # ownership lost: the group is killed, nothing is reported
    ended: bool = False  # the attempt ended while still ours: its result stands
    reported: bool = False  # the terminal event is stored: only the ack is left
    acked: bool = False  # the ack is sent (a second one would only be refused)
    holding: bool = True  # `hold` may still send progress (False: settled or ended)
    occupying: bool = True  # counts against the executor's slots (False once its process ended)
    settling: asyncio.Future[bool] | None = None  # its report and ack, batched (settle.py)


def ownership_margin(ack_wait_s: float) -> float:
    """Time a progress may spend on the wire: the work counts as ours this much less."""
    return min(1.0, 0.1 * ack_wait_s)


def _left(slot: Slot, ack_wait_s: float) -> float:
    held = asyncio.get_running_loop().time() - slot.touched
    return ack_wait_s - ownership_margin(ack_wait_s) - held


def still_ours(slot: Slot, ack_wait_s: float) -> bool:
    return not slot.let_go and _left(slot, ack_wait_s) > 0


def let_go(slot: Slot) -> None:
    """Ownership lost: kill the task's process group now and make the runner end."""
    if slot.let_go:
        return
    slot.let_go = True
    if slot.pgid is not None:
        # ESRCH: already gone; EPERM: only leftovers that changed credentials remain.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(slot.pgid, signal.SIGKILL)
    slot.cancel_reason = LET_GO_REASON
    slot.cancel.set()
    log.warning(
        "task %s attempt %d: %s; process group %s killed, nothing reported",
        slot.item.task_id,
        slot.attempt,
        LET_GO_REASON,
        slot.pgid if slot.pgid is not None else "(not started)",
    )


def started(slot: Slot, pgid: int) -> None:
    """The process group exists: a task let go meanwhile dies at once, not after a grace."""
    slot.pgid = pgid
    if slot.let_go:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


async def hold(msg: Msg, slot: Slot, ack_wait_s: float) -> None:
    """Keep the work message ours with `in_progress` while the task runs; let the task go the
    moment that can no longer be proven. Runs until `stop_holding` (the attempt ended) or let
    go; a cancel alone may be lost (see `stop_holding`), so it also ends once `slot.holding`
    is off, and never sends a progress after that."""
    interval = max(ack_wait_s / 3, 0.5)
    loop = asyncio.get_running_loop()
    while slot.holding:
        # Wake at the deadline at the latest: a frozen executor resumed past it acts at once.
        await asyncio.sleep(max(0.0, min(interval, _left(slot, ack_wait_s))))
        if not slot.holding:
            return  # settled meanwhile: a progress now would undo a hand-back's nak
        if not still_ours(slot, ack_wait_s):
            if not slot.ended:  # a result found while ours is reported; it is just not acked
                let_go(slot)
            return
        sent = loop.time()
        try:
            # The server answers a progress that has a reply subject: only the answer proves
            # it restarted the ack timer.
            await msg._client.request(
                msg.reply, b"+WPI", timeout=max(0.05, min(interval, _left(slot, ack_wait_s)))
            )
            slot.touched = sent
        except Exception as exc:  # disconnected: keep trying until the deadline
            log.warning("in_progress for %s failed: %s", msg.subject, exc)


def stop_holding(slot: Slot, keeping: asyncio.Task[None]) -> None:
    """End `hold` for good: the attempt is over, or its message is being settled.

    The flag, not only the cancel: `hold` waits for each progress's answer in nats-py's
    `request`, i.e. in Python 3.11's `asyncio.wait_for`, which swallows a cancel that arrives
    once the answer is in but before the waiting task ran again. A hold that survived its cancel
    would go on sending progress for good: the server answers progress for a message we acked
    (only wasted), but a progress after a hand-back's nak restarts the ack timer and cancels the
    redelivery, so the task would sit ack-pending, never run, while nothing logs a thing."""
    slot.holding = False
    keeping.cancel()


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


async def nak(msg: Msg, delay: float | None = None) -> None:
    try:
        await msg.nak(delay=delay)
    except Exception as exc:
        log.warning("nak of %s failed: %s", msg.subject, exc)


# -- hand-backs ------------------------------------------------------------------------------


def _key(msg: Msg, slot: Slot) -> str:
    return names.handback_key(slot.item.task_id, delivery.stream_seq(msg))


async def count_handbacks(kv: KeyValue, msg: Msg, slot: Slot) -> int:
    """How many earlier deliveries of this message were handed back (not attempts)."""
    if delivery.delivered(msg) <= 1:
        return 0  # the first delivery: nothing was handed back yet, no look-up needed
    try:
        entry = await kv.get(_key(msg, slot))
    except nats.js.errors.KeyNotFoundError:
        return 0
    if not entry.value:  # deleted, or aged out (nats-py returns an empty entry then)
        return 0
    try:
        count = int(entry.value)
    except ValueError:
        log.error("unreadable hand-back count %r: counted as 0", entry.value[:40])
        return 0
    # Never more than the deliveries before this one: an attempt is at least 1.
    return max(0, min(count, delivery.delivered(msg) - 1))


async def hand_back(kv: KeyValue, msg: Msg, slot: Slot, *, delay: float | None = None) -> None:
    """Give the message back without spending an attempt: record the hand-back, then nak."""
    try:
        async with asyncio.timeout(RECORD_TIMEOUT_S):
            await kv.put(_key(msg, slot), str(slot.handbacks + 1).encode())
    except Exception as exc:
        log.warning(
            "hand-back of %s not recorded (%s): its next delivery counts as an attempt",
            slot.item.task_id,
            exc,
        )
    # Held up to here (the record may take a while); from the nak on, no progress may follow.
    slot.holding = False
    await nak(msg, delay)


async def forget_handbacks(kv: KeyValue, msg: Msg, slot: Slot) -> None:
    """The message is acked: its count is of no more use (its TTL removes it otherwise)."""
    if slot.handbacks == 0:
        return
    try:
        await kv.purge(_key(msg, slot))
    except Exception as exc:
        log.info("hand-back count of %s left to expire: %s", slot.item.task_id, exc)


@dataclass(frozen=True)
class AfterError:
    """What an executor error in the middle of an attempt leads to."""

    handed_back: bool  # True: the attempt is not spent (the process never started)
    delay_s: float  # the message's redelivery delay, and this executor's fetch pause


def after_error(slot: Slot) -> AfterError:
    """An executor's own error (not the task's: a missing cwd or argv is a task failure,
    reported as `failed`). Before the process started, the task did nothing: a hand-back, not
    an attempt. After, its side effects may have happened: an attempt. Either way the message
    comes back only after a delay that grows with each such error, never in a tight loop."""
    if slot.pgid is None:
        return AfterError(handed_back=True, delay_s=PRESTART_RETRY.delay(slot.handbacks + 1))
    return AfterError(handed_back=False, delay_s=PRESTART_RETRY.delay(slot.attempt))
