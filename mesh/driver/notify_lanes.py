"""One notifier partition's lanes: per client, several requests in flight, in order per task.

Each client's callbacks are laned by task (mesh/driver/task_lanes.py): a task's states go out
one request after another, in the order they happened; different tasks go concurrently, up to
the client's concurrency (`callback_concurrency`). A request is filled, up to the client's
`callback_batch_max`, with whatever waits while the others are in flight.

A lane belongs to the partition holder that made it (mesh/driver/notify_partition.py) and lives
as long as its lease: `stop` returns every event not handed off, for the holder to give back.
See mesh/driver/notify.py for the rules (sensitive writes first, outbox order, held budget).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeAlias

from nats.aio.msg import Msg

from tidegate.bus.pull import settle_quietly
from tidegate.driver.callbacks.outbox import Outbox, Term, TermPassed
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.transport import CallbackFailed, Transports, batch_max
from tidegate.driver.fence import DeliveredFence, Mark, mark_of
from tidegate.driver.sensitive import SensitiveWriter
from tidegate.driver.task_lanes import TaskLanes
from tidegate.errors import TidegateError
from tidegate.metrics import DriverMetrics
from tidegate.store.rows import TaskRow
from tidegate.store.store import Store
from tidegate.supervise import until_done
from tidegate.wire import DEFAULT_CALLBACK_HELD_MAX, ClientRecord

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
# Callbacks per outbox write once a client is behind its outbox: one statement for many.
_OUTBOX_BATCH = 500
_OUTBOX_RECHECK_S = 1.0
_ACK_SLICE = 500


class LeaseLost(TidegateError):
    """Another driver holds this notifier partition's lease now; stop sending at once."""


# A callback to send, its event's message (acked once handed off) and, for a sensitive
# client, the row written before the callback goes out.
Item: TypeAlias = tuple[Callback, Msg, TaskRow | None]
# A message not handed off, and the loop time at or before which its ack wait last started.
Held: TypeAlias = tuple[Msg, float]


def _task_of(item: Item) -> str:
    return item[0].task_id


@dataclass
class Lane:
    """One client's callbacks: laned by task, and how its outbox stands."""

    tasks: TaskLanes[Item]
    outboxed: bool = False  # has undelivered callbacks in the outbox: append behind them
    checked_at: float = 0.0
    enqueuing: int = 0  # outbox writes under way: the outbox is not empty, whatever a count says
    enqueued: int = 0  # outbox writes begun, ever: a count taken across one is stale
    spilling: bool = False
    pump_due: bool = False
    running: set[asyncio.Task[None]] = field(default_factory=set)


def fence_marks(handed_off: list[Item], start: int, *, every: bool = False) -> dict[str, Mark]:
    """The tasks of `handed_off[start:]` (just delivered or outboxed) with more than one state
    in `handed_off` (all unacked: an older one could come back after a newer one), with their
    newest: what a next holder must not go back behind. `every`: each task of it, whatever
    else is unacked here (an older state may be unacked at an earlier holder)."""
    seen: dict[str, int] = {}
    marks: dict[str, Mark] = {}
    for cb, _, _ in handed_off:
        seen[cb.task_id] = seen.get(cb.task_id, 0) + 1
        mark = mark_of(cb.run, cb.attempt, cb.state)
        marks[cb.task_id] = max(marks.get(cb.task_id, mark), mark)
    fresh = {cb.task_id for cb, _, _ in handed_off[start:]}
    return {task: marks[task] for task in fresh if every or seen[task] > 1}


async def _ack(items: list[Item]) -> None:
    # In slices with a yield between: acking a spilled backlog of tens of thousands would
    # otherwise hold the event loop, and every other client's lane, for a noticeable while.
    for i in range(0, len(items), _ACK_SLICE):
        await settle_quietly([m for _, m, _ in items[i : i + _ACK_SLICE]], "ack")
        await asyncio.sleep(0)


def held_max(record: ClientRecord | None) -> int:
    return max(1, int(getattr(record, "callback_held_max", DEFAULT_CALLBACK_HELD_MAX)))


class Lanes:
    """The lanes of one partition for one term of its lease."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        transports: Transports,
        clients: Callable[[str], ClientRecord | None],
        metrics: DriverMetrics,
        delivered: DeliveredFence,
        *,
        check_lease: Callable[[], None],
        term: Callable[[], Term],
        name: str,
        concurrency: int = DEFAULT_CONCURRENCY,
        fence_all_until: float = 0.0,
    ) -> None:
        self._outbox = outbox
        self._transports = transports
        self._clients = clients
        self._metrics = metrics
        self._delivered = delivered
        self._check_lease = check_lease  # raises LeaseLost once sending is no longer safe
        self._term = term  # this term's partition and lease revision, for outbox writes
        self._name = name
        self._concurrency = max(1, concurrency)
        # Loop time until which every state handed off is fenced (notify_partition.py).
        self._fence_all_until = fence_all_until
        self._lanes: dict[str, Lane] = {}
        self._unsent: list[Held] = []  # taken back from requests that did not settle
        self.held: dict[int, Msg] = {}  # id → message not acked yet, kept alive while lanes work
        # id → loop time at or before which the server last started its ack wait: when the pull
        # that brought it was asked for, or a keep-alive the server is known to have received.
        self._since: dict[int, float] = {}
        # Per partition: one partition's lost lease must not cancel another's pending writes.
        self._writer = SensitiveWriter(store, metrics)
        # Sensitive rows are handed to the writer as their events arrive (one group commit
        # for a whole pull), each callback waiting for its own row's commit before it goes.
        self._staged: list[TaskRow] = []
        self._stage_done: asyncio.Future[None] | None = None
        self._row_done: dict[int, asyncio.Future[None]] = {}  # id(msg) → its row committed
        self._writes: set[asyncio.Task[None]] = set()
        self._stopping = False
        # True until this term is recorded in the database and the outbox's clients are read
        # (the database did not answer when this term began): every lane stays behind a
        # possible outbox meanwhile, whatever a count says, because an earlier holder's write
        # may still be on its way in (see `Outbox.begin_term`).
        self.outbox_unknown = False
        self.lease_doubt = False  # a lane found the deadline passed: stop leading

    def mark_outboxed(self, client: str) -> None:
        self._lane(client).outboxed = True

    def put(self, client: str, item: Item, since: float) -> None:
        msg, row = item[1], item[2]
        self.held[id(msg)] = msg
        self._since[id(msg)] = since
        if row is not None:
            self._stage(msg, row)
        lane = self._lane(client)
        lane.tasks.put(item)
        if not lane.pump_due:
            # Once the whole pull is in: then each request takes what waits, not one each.
            lane.pump_due = True
            asyncio.get_running_loop().call_soon(self._pump, client, lane)

    def touched(self, ids: Iterable[int], at: float) -> None:
        """A keep-alive sent at `at` to the messages `ids` is known to have reached the server
        (a later request on the same connection was answered)."""
        for key in ids:
            if key in self._since:
                self._since[key] = max(self._since[key], at)

    def _lane(self, client: str) -> Lane:
        lane = self._lanes.get(client)
        if lane is None:
            # Outbox unknown: behind it until a count says otherwise (checked_at 0: at once).
            tasks = TaskLanes(_task_of, limit=self._concurrency)
            lane = self._lanes[client] = Lane(tasks=tasks, outboxed=self.outbox_unknown)
        return lane

    # --- sensitive rows, written before their callbacks ---------------------------------

    def _stage(self, msg: Msg, row: TaskRow) -> None:
        if self._stage_done is None:
            self._stage_done = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._flush_stage)
        self._staged.append(row)
        self._row_done[id(msg)] = self._stage_done

    def _flush_stage(self) -> None:
        rows, done = self._staged, self._stage_done
        self._staged, self._stage_done = [], None
        if done is None or self._stopping:
            return
        write = asyncio.create_task(self._write(rows, done), name=f"notify:{self._name}:rows")
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write(self, rows: list[TaskRow], done: asyncio.Future[None]) -> None:
        try:
            await self._writer.write(rows)
        except BaseException as exc:
            if not done.done():
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                else:
                    done.cancel()  # the lanes are stopping
            raise
        if not done.done():
            done.set_result(None)

    async def _rows_written(self, items: list[Item]) -> None:
        pending = {f for _, m, _ in items if (f := self._row_done.get(id(m))) is not None}
        if pending:
            # asyncio.wait, not gather: one waiter cancelled must not cancel a shared future.
            await asyncio.wait(pending)
            for f in pending:
                if f.cancelled():
                    raise asyncio.CancelledError  # the lanes are stopping
                if (exc := f.exception()) is not None:
                    raise exc

    # --- scheduling -----------------------------------------------------------------------

    def _pump(self, client: str, lane: Lane) -> None:
        """Start what may start: requests up to the concurrency, and a spill over budget."""
        lane.pump_due = False
        if self._stopping or self.lease_doubt:
            return
        record = self._clients(client)
        budget = held_max(record)
        if lane.tasks.held > budget and not lane.spilling:
            spilled = lane.tasks.take_idle()
            if spilled:
                lane.spilling = lane.outboxed = True
                spill = self._spill(client, lane, spilled, budget)
                self._start(client, lane, spilled, spill, request=False)
        size = _OUTBOX_BATCH if record is None or lane.outboxed else batch_max(record)
        while lane.tasks.can_take():
            items = lane.tasks.take(size)
            self._start(client, lane, items, partial(self._deliver_or_outbox, client, lane, items))

    def _start(
        self,
        client: str,
        lane: Lane,
        items: list[Item],
        hand_off: Callable[[], Awaitable[None]],
        *,
        request: bool = True,
    ) -> None:
        work = self._settle(client, lane, items, hand_off, request=request)
        task = asyncio.create_task(work, name=f"notify:{self._name}:{client}")
        lane.running.add(task)
        task.add_done_callback(lane.running.discard)

    async def _settle(
        self,
        client: str,
        lane: Lane,
        items: list[Item],
        hand_off: Callable[[], Awaitable[None]],
        *,
        request: bool,
    ) -> None:
        """Rows written, handed off (delivered or outboxed), fenced, acked; else handed back.
        Its tasks go on only once this is settled: nothing of theirs overtakes it."""
        settled = False
        try:
            await self._rows_written(items)
            await hand_off()
            every = asyncio.get_running_loop().time() < self._fence_all_until
            await self._delivered.record(fence_marks(items, 0, every=every))
            await _ack(items)
            settled = True
        except LeaseLost:
            self.lease_doubt = True  # the leading loop stops at its next turn
        except Exception:
            # Unexpected (every known failure is outboxed or retried above). Handed back, and
            # this term ends as on a lost lease: the task's later states must not go out
            # before these come back, and a new term takes them all again in order.
            log.exception("callbacks to %s: cannot hand off %d; handing back", client, len(items))
            self.lease_doubt = True
        finally:
            since = [self._since.pop(id(msg), 0.0) for _, msg, _ in items]
            for _, msg, _ in items:
                self.held.pop(id(msg), None)
                self._row_done.pop(id(msg), None)
            lane.tasks.done(items, request=request)
            if not settled:  # stopped mid-way: this term ends, and its holder gives them back
                self._unsent.extend(zip((m for _, m, _ in items), since, strict=True))
            else:
                self._pump(client, lane)

    def _spill(
        self, client: str, lane: Lane, items: list[Item], budget: int
    ) -> Callable[[], Awaitable[None]]:
        """The endpoint is slower than this client's events arrive: what waits goes to the
        outbox, in order, and later ones behind it (the lane is marked outboxed already)."""

        async def spill() -> None:
            started = lane.checked_at = asyncio.get_running_loop().time()
            try:
                callbacks = [cb for cb, _, _ in items]
                await self._to_outbox(lane, callbacks, f"held back: over {budget} waiting")
            finally:
                lane.spilling = False
            log.warning(
                "callbacks to %s: %d waiting, more than its %d; moved to the outbox in %.1fs "
                "(its endpoint is slower than its events arrive)",
                client,
                len(items),
                budget,
                asyncio.get_running_loop().time() - started,
            )

        return spill

    # --- handing off ------------------------------------------------------------------------

    async def _deliver_or_outbox(self, client: str, lane: Lane, items: list[Item]) -> None:
        callbacks = [cb for cb, _, _ in items]
        try:
            await self._deliver(client, lane, callbacks)
        except LeaseLost:
            raise
        except Exception as exc:
            # Whatever went wrong, the callbacks are kept, in order, in the outbox; a lane
            # that died here would strand them and its client's later ones.
            log.exception("callbacks to %s: unexpected failure; outboxing them", client)
            lane.outboxed = True
            await self._to_outbox(lane, callbacks, f"unexpected: {exc!r}")

    async def _deliver(self, client: str, lane: Lane, callbacks: list[Callback]) -> None:
        record = self._clients(client)
        if lane.outboxed and not await self._outbox_still_holds(client, lane):
            lane.outboxed = False
        if record is None or lane.outboxed:
            await self._to_outbox(lane, callbacks, "queued behind earlier undelivered callbacks")
            return
        try:
            await self._transports.send(record, callbacks, before_each=self._check_lease)
            self._metrics.callbacks.labels(result="delivered").inc(len(callbacks))
        except CallbackFailed as exc:
            # The endpoint failed: the client's later callbacks (every task's) wait behind it
            # in the outbox, retried with backoff, rather than hammering a failing endpoint
            # with `concurrency` requests at a time.
            self._metrics.callbacks.labels(result="delivered").inc(exc.delivered)
            log.warning("callback to %s failed (%s); retrying from the outbox", client, exc)
            lane.outboxed = True
            lane.checked_at = asyncio.get_running_loop().time()
            await self._to_outbox(lane, callbacks[exc.delivered :], str(exc))

    async def _outbox_still_holds(self, client: str, lane: Lane) -> bool:
        now = asyncio.get_running_loop().time()
        if self.outbox_unknown or lane.enqueuing or now - lane.checked_at < _OUTBOX_RECHECK_S:
            return True
        lane.checked_at = now
        begun = lane.enqueued
        try:
            held = await self._outbox.count(client) > 0
        except Exception as exc:  # cannot tell: keep the order safe, stay behind the outbox
            log.warning("cannot count %s's outbox (%s)", client, exc)
            return True
        # An outbox write begun meanwhile (by a concurrent request) may not be counted yet.
        return held or lane.enqueuing > 0 or lane.enqueued != begun

    async def _to_outbox(self, lane: Lane, callbacks: list[Callback], error: str) -> None:
        # The database down: the events stay unacked (and kept alive) meanwhile. A callback
        # that can never be stored is given up on (logged, counted) rather than retried
        # forever: `enqueue` makes that call, one callback at a time.
        # Only while the lease is surely ours: rows an old holder wrote after losing it would
        # be sent by the retry job after the newer states the next holder sends meanwhile.
        async def enqueue() -> list[Callback]:
            self._check_lease()
            try:
                return await self._outbox.enqueue(callbacks, error, term=self._term())
            except TermPassed as exc:  # the database's fence: a later holder has begun
                raise LeaseLost(str(exc)) from exc

        lane.enqueuing += 1
        lane.enqueued += 1
        try:
            refused = await until_done(
                enqueue, what="callback outbox", give_up=lambda exc: isinstance(exc, LeaseLost)
            )
        finally:
            lane.enqueuing -= 1
        lane.outboxed = True  # whatever a count said while this was being written
        self._metrics.callbacks.labels(result="outboxed").inc(len(callbacks) - len(refused))
        if refused:
            self._metrics.callbacks.labels(result="unstorable").inc(len(refused))
            log.error(
                "%d callbacks of %s cannot be stored in the outbox and are given up: %s",
                len(refused),
                refused[0].client,
                ", ".join(cb.event_id for cb in refused[:10]),
            )

    async def stop(self) -> list[Held]:
        """Every lane stopped; returns what was not handed off (unsettled, unacked), each
        with when the server last started its ack wait, for the holder to give back."""
        self._stopping = True
        tasks = [t for lane in self._lanes.values() for t in lane.running]
        for task in tasks:
            task.cancel()  # each hands its own items back (nak)
        await asyncio.gather(*tasks, return_exceptions=True)
        writes = list(self._writes)
        for write in writes:
            write.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        await self._writer.close()
        queued = [
            (m, self._since.get(id(m), 0.0))
            for lane in self._lanes.values()
            for _, m, _ in lane.tasks.drain()
        ]
        unsent, self._unsent = self._unsent + queued, []
        self.held.clear()
        self._since.clear()
        self._row_done.clear()
        self._lanes.clear()
        return unsent
