"""The notifier: calls each client back with its tasks' states, in order, never losing one.

One driver at a time holds the notifier lease and consumes the events stream in order; the
others stand by and take over when its lease lapses. Per client, callbacks go out one request
at a time (a "lane"), so a task's states arrive in the order they happened, while a client
whose endpoint hangs only holds up its own lane.

- A sensitive event is written to the database (a small group commit) *before* its callback
  goes out, so a status query never lags a callback.
- A non-sensitive client hears of terminal states only, called back as soon as the event
  arrives; the projector writes it later, in its batches.
- A callback that fails goes to the outbox (the only per-callback write), and so does every
  later callback of that client until the retry job has drained the outbox: order holds.

An event's message is acked only once its callback was delivered or written to the outbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.lease import Leases
from tidegate.bus.pull import ack_all, pull, settle_quietly
from tidegate.bus.topology import LEASE_TTL_S, NOTIFY_ACK_WAIT_S
from tidegate.driver.callbacks.outbox import Outbox
from tidegate.driver.callbacks.payload import Callback, callback_from_flat
from tidegate.driver.callbacks.transport import CallbackFailed, Transports
from tidegate.errors import TidegateError
from tidegate.metrics import DriverMetrics
from tidegate.store.flatten import FlatEvent, flatten
from tidegate.store.rows import TaskRow, coalesce, row_from_flat
from tidegate.store.store import Store, permanent
from tidegate.supervise import until_done
from tidegate.wire import STATE_RANK, AnyEvent, ClientRecord, decode_event

log = logging.getLogger(__name__)

_RENEW_S = LEASE_TTL_S / 5  # renewed several times per TTL: one slow renewal is not a loss
_MAX_IN_FLIGHT = 20_000  # events held in lanes, not yet acked
_LANE_BATCH = 200
_OUTBOX_RECHECK_S = 1.0
_LATEST_MAX = 200_000
_KEEPALIVE_S = NOTIFY_ACK_WAIT_S / 3  # held callbacks stay ours behind a slow endpoint


class LeaseLost(TidegateError):
    """Another driver holds the notifier lease now; stop sending at once."""


@dataclass
class Lane:
    queue: asyncio.Queue[tuple[Callback, Msg]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    outboxed: bool = False  # has undelivered callbacks in the outbox: append behind them
    checked_at: float = 0.0


def wants_callback(event: AnyEvent, record: ClientRecord | None) -> bool:
    if record is None or not (record.callback_url or record.callback_nats):
        return False
    if event.state == "queued":
        return False  # the PubAck was the acceptance
    return event.terminal or event.sensitive


class LatestStates:
    """The newest (attempt, rank) called back per task (bounded), to drop late reports: an
    executor that was cut off may report attempt 1 after attempt 2 was called back."""

    def __init__(self, limit: int = _LATEST_MAX) -> None:
        self._limit = limit
        self._latest: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def stale(self, event: AnyEvent) -> bool:
        key = (event.attempt, STATE_RANK[event.state])
        last = self._latest.get(event.task_id)
        if last is not None and key < last:
            log.info("not calling back %s: attempt %d is stale", event.event_id, event.attempt)
            return True
        self._latest[event.task_id] = key
        self._latest.move_to_end(event.task_id)
        while len(self._latest) > self._limit:
            self._latest.popitem(last=False)
        return False


class Notifier:
    def __init__(
        self,
        js: JetStreamContext,
        store: Store,
        outbox: Outbox,
        transports: Transports,
        clients: Callable[[str], ClientRecord | None],
        leases: Leases,
        metrics: DriverMetrics,
    ) -> None:
        self._js = js
        self._store = store
        self._outbox = outbox
        self._transports = transports
        self._clients = clients
        self._leases = leases
        self._metrics = metrics
        self._lanes: dict[str, Lane] = {}
        self._held: dict[int, Msg] = {}  # id → message not acked yet, kept alive while lanes work
        self._room = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._fence = LatestStates()
        self.leading = False
        self._revision = 0

    async def run(self) -> None:
        while True:
            revision = await self._leases.acquire(names.NOTIFIER_LEASE)
            if revision is None:
                await asyncio.sleep(_RENEW_S)
                continue
            log.info("this driver now sends the callbacks (%s)", self._leases.owner)
            self.leading = True
            self._revision = revision
            try:
                await self._lead()
            except LeaseLost:
                log.warning("notifier lease lost; another driver sends the callbacks now")
            finally:
                self.leading = False
                await self._stop_lanes()
                await self._leases.release(names.NOTIFIER_LEASE, self._revision)

    async def _lead(self) -> None:
        pending = await self._outbox.pending_clients()
        for client in pending:
            self._lane(client).outboxed = True
        consume = asyncio.create_task(self._consume(), name="notify:consume")
        loop = asyncio.get_running_loop()
        kept_alive = loop.time()
        try:
            while not consume.done():
                await asyncio.wait({consume}, timeout=_RENEW_S)
                if consume.done():
                    break
                renewed = await self._leases.renew(names.NOTIFIER_LEASE, self._revision)
                if renewed is None:
                    raise LeaseLost
                self._revision = renewed  # released with this one when leading ends
                if loop.time() - kept_alive > _KEEPALIVE_S:
                    # A lane stuck behind a slow endpoint or a database outage must not
                    # have its events redelivered (and sent twice, out of order).
                    kept_alive = loop.time()
                    held = list(self._held.values())
                    await settle_quietly(held, "in_progress")
            consume.result()
        finally:
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)

    async def _consume(self) -> None:
        sub = await self._js.pull_subscribe_bind(names.NOTIFY_CONSUMER, stream=names.EVENTS_STREAM)
        try:
            while True:
                msgs = await pull(sub, 500, wait=1.0)
                if msgs:
                    await self._handle(msgs)
        finally:
            await sub.unsubscribe()

    async def _handle(self, msgs: list[Msg]) -> None:
        events: list[tuple[FlatEvent, Msg]] = []  # to call back, in order
        rows: list[TaskRow] = []  # sensitive transitions, written before their callbacks
        done: list[Msg] = []
        for msg in msgs:
            try:
                event = decode_event(msg.data)
                wanted = wants_callback(event, self._clients(event.client))
                flat = flatten(event) if wanted else None
                # Sensitive rows are built here, where a bad one can still be refused.
                row = row_from_flat(flat) if flat is not None and event.sensitive else None
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                log.warning("undecodable event on %s: %s", msg.subject, exc)
                await msg.term()
                continue
            if row is not None:
                rows.append(row)
            if flat is not None and not self._fence.stale(event):
                events.append((flat, msg))
            else:
                done.append(msg)
        if rows:
            await self._persist(coalesce(rows))
        for flat, msg in events:
            await self._room.acquire()
            self._held[id(msg)] = msg
            lane = self._lane(flat.client)
            lane.queue.put_nowait((callback_from_flat(flat), msg))
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(
                    self._drive(flat.client, lane), name=f"notify:{flat.client}"
                )
        await ack_all(done)

    async def _persist(self, rows: list[TaskRow]) -> None:
        """Group commit of sensitive transitions: the database knows before the client does."""
        try:
            await until_done(
                partial(self._store.upsert_tasks, rows),
                what="sensitive group commit",
                give_up=permanent,
                on_failure=lambda _exc: self._metrics.write_failures.inc(),
            )
        except Exception:
            # A row the database refuses must not hold back the others' callbacks.
            for row in rows:
                await self._persist_one(row)
            return
        self._metrics.commits.inc()
        self._metrics.rows.inc(len(rows))

    async def _persist_one(self, row: TaskRow) -> None:
        try:
            await until_done(
                partial(self._store.upsert_task_one, row),
                what="sensitive write",
                give_up=permanent,
            )
        except Exception as exc:
            self._metrics.refused_rows.inc()
            log.error("sensitive row of %s refused: %s", row.task_id, exc)

    def _lane(self, client: str) -> Lane:
        lane = self._lanes.get(client)
        if lane is None:
            lane = self._lanes[client] = Lane()
        return lane

    async def _drive(self, client: str, lane: Lane) -> None:
        while not lane.queue.empty():
            items = [lane.queue.get_nowait()]
            while len(items) < _LANE_BATCH and not lane.queue.empty():
                items.append(lane.queue.get_nowait())
            try:
                try:
                    await self._deliver(client, lane, [cb for cb, _ in items])
                except Exception as exc:
                    # Whatever went wrong, the callbacks are kept, in order, in the outbox;
                    # a lane that died here would strand them and its client's later ones.
                    log.exception("callbacks to %s: unexpected failure; outboxing them", client)
                    lane.outboxed = True
                    await self._to_outbox([cb for cb, _ in items], f"unexpected: {exc!r}")
                await settle_quietly([m for _, m in items], "ack")
            finally:
                for _, msg in items:
                    self._held.pop(id(msg), None)
                    self._room.release()

    async def _deliver(self, client: str, lane: Lane, callbacks: list[Callback]) -> None:
        record = self._clients(client)
        if lane.outboxed and not await self._outbox_still_holds(client, lane):
            lane.outboxed = False
        if record is None or lane.outboxed:
            await self._to_outbox(callbacks, "queued behind earlier undelivered callbacks")
            return
        try:
            await self._transports.send(record, callbacks)
            self._metrics.callbacks.labels(result="delivered").inc(len(callbacks))
        except CallbackFailed as exc:
            self._metrics.callbacks.labels(result="delivered").inc(exc.delivered)
            log.warning("callback to %s failed (%s); retrying from the outbox", client, exc)
            lane.outboxed = True
            lane.checked_at = asyncio.get_running_loop().time()
            await self._to_outbox(callbacks[exc.delivered :], str(exc))

    async def _outbox_still_holds(self, client: str, lane: Lane) -> bool:
        now = asyncio.get_running_loop().time()
        if now - lane.checked_at < _OUTBOX_RECHECK_S:
            return True
        lane.checked_at = now
        try:
            return await self._outbox.count(client) > 0
        except Exception as exc:  # cannot tell: keep the order safe, stay behind the outbox
            log.warning("cannot count %s's outbox (%s)", client, exc)
            return True

    async def _to_outbox(self, callbacks: list[Callback], error: str) -> None:
        # The database down: the events stay unacked (and kept alive) meanwhile.
        await until_done(partial(self._outbox.enqueue, callbacks, error), what="callback outbox")
        self._metrics.callbacks.labels(result="outboxed").inc(len(callbacks))

    async def _stop_lanes(self) -> None:
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
        await asyncio.gather(
            *(lane.task for lane in self._lanes.values() if lane.task), return_exceptions=True
        )
        # Whatever was not handed off is given back, for the next leader to send in order.
        for lane in self._lanes.values():
            while not lane.queue.empty():
                _, msg = lane.queue.get_nowait()
                self._held.pop(id(msg), None)
                self._room.release()
                await msg.nak()
        self._lanes.clear()
