"""Settling finished attempts in batches: terminal events published pipelined, and each work
message acked only once its event's PubAck is in.

An attempt's slot is free as soon as its process ended (agent.py); what is left — storing the
terminal event, then acking the work message — goes through here, so that the round trips of
many attempts overlap instead of each holding a slot. Attempts that end within `LINGER_S` of
each other share one batch: one `publish_many` (one timer for all PubAcks), then their acks
(plain publishes) and a single flush, whose PONG says the server has read every ack of the
batch (a connection's messages are handled in order). The order is the guarantee: a work
message is acked only after JetStream stored its terminal event, and only while the work is
still provably this executor's (`still_ours`), so a crash in between re-runs the task rather
than losing its result. Anything a batch could not do is left to the attempt's own coroutine,
which retries it alone, as long as it takes (`Settler.settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Final

from nats.aio.msg import Msg

from tidegate import names
from tidegate.bus.natsconn import round_trip
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.executor.reports import report
from tidegate.executor.workmsg import (
    ACK_RETRY,
    ACK_TRIES,
    RECORD_TIMEOUT_S,
    Slot,
    ack,
    still_ours,
)
from tidegate.wire import AnyEvent, encode

log = logging.getLogger(__name__)

# Attempts ending this close together share a batch. Their slots are free already: the linger
# costs a task's report a moment of latency, not the executor any throughput, and saves a
# write and a round trip per attempt in a flood.
LINGER_S: Final = 0.02
BATCH_MAX: Final = 512  # a batch this full goes at once
FLUSH_TIMEOUT_S: Final = 2.0  # seconds


@dataclass(eq=False)
class _Pending:
    msg: Msg
    slot: Slot
    event: AnyEvent
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Settler:
    """One per executor. `settle` returns once the attempt is reported, and acked if the
    work is still ours (True) or left unacked because it no longer is (False)."""

    def __init__(self, publisher: Publisher, ack_wait_s: float) -> None:
        self._publisher = publisher
        self._ack_wait_s = ack_wait_s
        self._batch: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent so far (a figure for tests and benchmarks)

    async def settle(self, msg: Msg, slot: Slot, event: AnyEvent) -> bool:
        pending = _Pending(msg, slot, event)
        slot.settling = pending.done
        self._batch.append(pending)
        if len(self._batch) >= BATCH_MAX:
            self._send_now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LINGER_S, self._send_now)
        try:
            # Shielded: a drain's cancel must not drop the outcome of a publish already sent;
            # the caller reads it from the slot (`reported`, `acked`).
            return await asyncio.shield(pending.done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("batched report of %s failed (%s); retrying alone", event.event_id, exc)
        return await self._alone(msg, slot, event)

    async def _alone(self, msg: Msg, slot: Slot, event: AnyEvent) -> bool:
        if not slot.reported:
            await report(self._publisher, event)  # until JetStream has it
            slot.reported = True
        if slot.acked:
            return True
        if not still_ours(slot, self._ack_wait_s):
            return False
        await ack(msg)
        slot.acked = True
        return True

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        self.batches += 1
        task = asyncio.create_task(self._send(batch), name="settle-batch")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            outs = [
                Outgoing(
                    subject=names.event_subject(p.event.client),
                    payload=encode(p.event),
                    msg_id=p.event.event_id,
                )
                for p in batch
            ]
            results = await self._publisher.publish_many(outs)
            acking: list[_Pending] = []
            for p, result in zip(batch, results, strict=True):
                if not isinstance(result, PubAck):
                    _fail(p, result)
                    continue
                p.slot.reported = True
                if still_ours(p.slot, self._ack_wait_s):
                    acking.append(p)
                else:
                    _finish(p, False)  # reported; the ack is no longer ours to send
            await self._ack(acking)
        except BaseException as exc:
            for p in batch:
                _fail(p, exc if isinstance(exc, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(exc, Exception):
                raise

    async def _ack(self, batch: list[_Pending]) -> None:
        """Ack every message (buffered publishes), then one flush to know the server read
        them; a failed flush sends them again (a second ack of a message is harmless)."""
        if not batch:
            return
        nc = batch[0].msg._client
        for failures in range(1, ACK_TRIES + 1):
            todo = [p for p in batch if not p.done.done()]
            for p in todo:
                if still_ours(p.slot, self._ack_wait_s):
                    # The reply subject of a delivery names that delivery: acking it again
                    # after a lost flush is safe, and `msg.ack` refuses a second call.
                    await nc.publish(p.msg.reply, b"+ACK")
                    p.slot.acked = True
                else:
                    _finish(p, False)
            try:
                await round_trip(nc, FLUSH_TIMEOUT_S)
            except Exception as exc:
                log.warning("acks of %d tasks not confirmed (%s), try %d", len(todo), exc, failures)
                await asyncio.sleep(ACK_RETRY.delay(failures))
                continue
            for p in todo:
                _finish(p, p.slot.acked)
            return
        # Not confirmed: if an ack was lost the task runs again (at least once); its result
        # is stored already, and the projection keeps the first terminal state.
        for p in batch:
            _finish(p, p.slot.acked)

    async def close(self) -> None:
        """Send what waits and let the batches in flight end (a drain's last step)."""
        self._send_now()
        if self._flushes:
            await asyncio.wait(set(self._flushes))


async def settled_anyway(slot: Slot) -> None:
    """A batch that already sent the attempt's event goes on after the attempt's cancel:
    wait (briefly) for what it did, so that a stored result is acked, not handed back."""
    settling = slot.settling
    if settling is None or settling.done():
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(RECORD_TIMEOUT_S):
            await asyncio.shield(settling)


def _finish(p: _Pending, acked: bool) -> None:
    if not p.done.done():
        p.done.set_result(acked)


def _fail(p: _Pending, exc: BaseException) -> None:
    if not p.done.done():
        p.done.set_exception(exc)
        p.done.exception()  # retrieved: the caller may be gone (cancelled) by now
