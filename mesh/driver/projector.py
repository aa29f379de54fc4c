"""The projector: writes the events stream (and heartbeats) into PostgreSQL in large batches.

One statement per batch, several transitions of a task coalesced into one row write, and a
cap on commits per second: the database sees a bounded rate whatever the flood, and the
backlog waits in JetStream. In batch mode a row waits up to a linger for its task's next state
(mesh/store/linger.py), so a task that finishes within it is one row write, any other two; the
cap is the driver's, shared with its other writers (the `Store` it is given is paced:
mesh/store/pace.py). Writes are monotone upserts, so redelivery and replay are
harmless; a message is acked only after the commit that contains it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus import delivery
from tidegate.bus.deadletters import set_aside
from tidegate.bus.pull import ack_all, pull, settle_quietly
from tidegate.bus.topology import PROJECTOR_ACK_WAIT_S
from tidegate.config import DriverSettings
from tidegate.metrics import DriverMetrics, count_dead_letter
from tidegate.store.linger import Lingering, RowKey, row_key
from tidegate.store.rows import TaskRow, coalesce, row_from_event, rows_from_heartbeat
from tidegate.store.store import RowRefused, Store, unwritable
from tidegate.wire import Heartbeat, decode_event

log = logging.getLogger(__name__)

# Bound on (task, attempt) pairs remembered as already projected `running` from heartbeats.
_SEEN_RUNNING_MAX = 500_000
# A batch held through a database outage is kept alive well inside the consumer's ack wait
# (a third of it, read from the consumer itself: `Limits.projector_ack_wait_s`), by a task of
# its own: however long one write waits (for a pooled connection, for the server), the
# keep-alive is not behind it.
_KEEPALIVE_PART = 3
# `running` rows from heartbeats waiting for the database (an outage): beyond this the oldest
# go (counted). Losing one costs only the intermediate `running` row of a non-sensitive task;
# its terminal event is in the stream and projects when the database is back.
_HEARTBEAT_ROWS_MAX = 100_000
WRITE_RETRY = Backoff(base_s=0.2, cap_s=5.0)


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        store: Store,
        settings: DriverSettings,
        metrics: DriverMetrics,
    ) -> None:
        self._js = js
        self._store = store
        self._settings = settings
        self._metrics = metrics
        # Keyed by (task id, run, attempt): two runs of a task id may run at once.
        self._heartbeat_rows: dict[tuple[str, int, int], TaskRow] = {}
        self._seen_running: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._last_commit = 0.0
        self._poison: list[tuple[Msg, str]] = []  # to set aside as dead letters, with why
        self._count_dead = count_dead_letter(metrics)
        self.heartbeat_rows_max = _HEARTBEAT_ROWS_MAX
        self._carry: list[Msg] = []  # delivered late, adopted during a write: next batch
        # Batch mode: rows waiting up to a linger for their task's next state (store/linger.py).
        self._lingering: Lingering[Msg] = Lingering()
        self._keepalive_s = PROJECTOR_ACK_WAIT_S / _KEEPALIVE_PART

    def offer_heartbeat(self, hb: Heartbeat) -> None:
        """Queue `running` rows for tasks this heartbeat shows for the first time."""
        for row in rows_from_heartbeat(hb):
            seen = (row.task_id, row.run, row.attempt)
            if seen in self._seen_running:
                continue
            self._seen_running[seen] = None
            self._heartbeat_rows[seen] = row
        while len(self._seen_running) > _SEEN_RUNNING_MAX:
            self._seen_running.popitem(last=False)
        # Bounded while the database is away: the oldest rows go first (dicts keep order).
        while len(self._heartbeat_rows) > self.heartbeat_rows_max:
            del self._heartbeat_rows[next(iter(self._heartbeat_rows))]
            self._metrics.heartbeat_rows_dropped.inc()

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            names.PROJECTOR_CONSUMER, stream=names.EVENTS_STREAM
        )
        try:
            info = await self._js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        except Exception as exc:  # keep the default: the topology's own ack wait
            log.warning("cannot read the projector consumer's ack wait (%s)", exc)
        else:
            if info.config.ack_wait:
                self._keepalive_s = info.config.ack_wait / _KEEPALIVE_PART
        try:
            while True:
                msgs = await self._collect(sub)
                if self._settings.persist == "per-event":
                    await self._round_per_event(msgs, sub)
                else:
                    await self._round_batch(msgs, sub)
        finally:
            await sub.unsubscribe()

    async def _round_batch(self, msgs: list[Msg], sub: JetStreamContext.PullSubscription) -> None:
        """Fold the round's rows into what lingers; write what is due in one statement; ack
        its messages. What is not due yet waits for the next round (`store/linger.py`)."""
        loop = asyncio.get_running_loop()
        rows, good = self._decode(msgs)
        await self._set_aside_poison()
        now = loop.time()
        for row, msg in zip(rows, good, strict=True):
            self._lingering.add(row, msg, now)
        self._stage_heartbeats(now)
        full = len(self._lingering) >= self._settings.projector_max_batch
        due = self._lingering.take_due(now, self._settings.projector_max_linger_s, everything=full)
        if not due:
            return
        # The messages still lingering are kept alive too: a long write (an outage) must not
        # let their ack wait run out.
        held = list(self._lingering.msgs())
        async with self._kept_alive([*(m for w in due for m in w.msgs), *held], sub):
            refused = await self._write_batch([w.row for w in due])
        self._metrics.coalesced.inc(sum(w.folded for w in due))
        done: list[Msg] = []
        for waited in due:
            reason = refused.get(row_key(waited.row))
            if reason is None:
                done.extend(waited.msgs)
            else:
                why = f"the database cannot take its row: {reason}"
                self._poison.extend((m, why) for m in waited.msgs)
        await ack_all(done)
        await self._set_aside_poison()

    async def _round_per_event(
        self, msgs: list[Msg], sub: JetStreamContext.PullSubscription
    ) -> None:
        rows, good = self._decode(msgs)
        await self._set_aside_poison()
        # Rows from events first, one per message in `good`; heartbeat rows after.
        all_rows = rows + list(self._heartbeat_rows.values())
        self._heartbeat_rows.clear()
        if not all_rows:
            return
        async with self._kept_alive(good, sub):
            refused = await self._write_per_event(all_rows)
        if refused:
            good = self._refused_aside(rows, good, refused)
        await ack_all(good)
        await self._set_aside_poison()

    def _stage_heartbeats(self, now: float) -> None:
        """Heartbeats' `running` rows linger like the others (batch mode): a task that
        finishes soon after never has its `running` state written on its own."""
        for row in self._heartbeat_rows.values():
            self._lingering.add(row, None, now)
        self._heartbeat_rows.clear()

    @asynccontextmanager
    async def _kept_alive(
        self, msgs: Sequence[Msg], sub: JetStreamContext.PullSubscription
    ) -> AsyncIterator[None]:
        """Keep `msgs` ours (`in_progress`) while the block runs, however long it waits; and
        the messages the server delivered after a pull gave up waiting (they sit unseen in
        the subscription's queue, their ack wait running): taken in, kept alive as well, and
        projected with the next batch."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._keepalive_s)
                self._carry.extend(_adopt_waiting(sub))
                await settle_quietly([*msgs, *self._carry], "in_progress")

        task = asyncio.create_task(beat(), name="project:keepalive") if msgs else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _refused_aside(
        self, rows: Sequence[TaskRow], msgs: Sequence[Msg], refused: dict[RowKey, str]
    ) -> list[Msg]:
        """The messages whose row was refused go to the dead letters; the others are returned."""
        keep: list[Msg] = []
        for row, msg in zip(rows, msgs, strict=True):
            reason = refused.get(row_key(row))
            if reason is None:
                keep.append(msg)
            else:
                self._poison.append((msg, f"the database cannot take its row: {reason}"))
        return keep

    async def _set_aside_poison(self) -> None:
        """Set aside what cannot be projected, once, with its reason: never retried forever,
        never holding back the messages behind it. A message whose dead letter could not be
        stored is handed back (nak with a delay) and comes again."""
        poison, self._poison = self._poison, []
        for msg, reason in poison:
            await set_aside(
                self._js,
                msg,
                stage="event",
                reason=reason,
                client=names.client_of_event_subject(msg.subject),
                count=self._count_dead,
            )

    async def _collect(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """The messages of one round. The round ends a linger after the oldest row waiting
        (new or lingering), and never sooner than a linger after the last write, nor faster
        than the commit cap; or when a full batch is waiting."""
        loop = asyncio.get_running_loop()
        s = self._settings
        batch_mode = s.persist != "per-event"
        spacing = max(1.0 / s.projector_max_commits_per_s, s.projector_max_linger_s)
        # Messages adopted while the last batch was written come first.
        msgs, self._carry = self._carry, []
        first_at: float | None = loop.time() if msgs else None

        def deadline() -> float | None:
            if batch_mode:
                self._stage_heartbeats(loop.time())
                oldest = self._lingering.oldest_at()
                if oldest is not None:
                    first = oldest if first_at is None else min(first_at, oldest)
                    return max(first + s.projector_max_linger_s, self._last_commit + spacing)
            if first_at is None:
                return None
            return max(first_at + s.projector_max_linger_s, self._last_commit + spacing)

        while len(msgs) + len(self._lingering) < s.projector_max_batch:
            until = deadline()
            if until is None and not batch_mode and self._heartbeat_rows:
                break  # per-event mode: heartbeat rows are written at once
            wait = 1.0 if until is None else until - loop.time()
            if wait <= 0:
                break
            try:
                # `pull`, not `fetch`: each message is noted as it arrives, so a driver stopped
                # mid-collection hands back even the ones a half-done fetch would drop.
                want = s.projector_max_batch - len(msgs) - len(self._lingering)
                got = await pull(sub, want, wait=max(wait, 0.1))
            except (nats.errors.TimeoutError, TimeoutError):
                got = []
            if got:
                msgs.extend(got)
                if first_at is None:
                    first_at = loop.time()
        return msgs

    def _decode(self, msgs: Sequence[Msg]) -> tuple[list[TaskRow], list[Msg]]:
        rows: list[TaskRow] = []
        good: list[Msg] = []
        states: Counter[str] = Counter()
        for msg in msgs:
            if _delivered(msg) > 1:
                self._metrics.projection_redelivered.inc()
            try:
                event = decode_event(msg.data)
                names.check_event_subject(msg.subject, event.client)
                row = row_from_event(event)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                # Nothing to project (a date in year 9999, a naive time, broken JSON): set it
                # aside, so it is neither redelivered forever nor lost without a trace.
                log.warning("undecodable event on %s: %s", msg.subject, exc)
                self._metrics.bad_events.inc()
                self._poison.append((msg, f"undecodable event: {exc}"))
                continue
            states[event.state] += 1
            rows.append(row)
            good.append(msg)
        # Counted per batch: a labelled counter's lookup per event is a cost at flood rates.
        for state, n in states.items():
            self._metrics.events.labels(state=state).inc(n)
        return rows, good

    async def _write_batch(self, rows: list[TaskRow]) -> dict[RowKey, str]:
        """One statement for the batch; the rows it could never take, with why."""
        merged = coalesce(rows)
        self._metrics.coalesced.inc(len(rows) - len(merged))
        try:
            await self._retrying(lambda: self._store.upsert_tasks(merged))
        except RowRefused:
            # One row the database can never take must not hold back the others: write
            # them one by one and set the refused ones aside, loudly.
            refused: dict[RowKey, str] = {}
            for row in merged:
                try:
                    await self._retrying(partial(self._store.upsert_task_one, row))
                except RowRefused as exc:
                    refused[row_key(row)] = self._refused(row, exc)
            return refused
        self._metrics.rows.inc(len(merged))
        self._metrics.commits.inc()
        self._metrics.batch_size.observe(len(merged))
        return {}

    async def _write_per_event(self, rows: list[TaskRow]) -> dict[RowKey, str]:
        """Baseline mode: one transaction per state change, as classic engines do."""
        gate = asyncio.Semaphore(self._settings.per_event_connections)
        refused: dict[RowKey, str] = {}

        async def one(row: TaskRow) -> None:
            async with gate:
                try:
                    await self._retrying(lambda: self._store.upsert_task_one(row))
                except RowRefused as exc:
                    refused[row_key(row)] = self._refused(row, exc)
                    return
                self._metrics.rows.inc()
                self._metrics.commits.inc()
                self._metrics.batch_size.observe(1)

        await asyncio.gather(*(one(r) for r in rows))
        return refused

    def _refused(self, row: TaskRow, exc: RowRefused) -> str:
        self._metrics.refused_rows.inc()
        reason = str(exc.__cause__ or exc)
        log.error("row of %s refused, set aside: %s", row.task_id, reason)
        return reason

    async def _retrying(self, write: Callable[[], Awaitable[object]]) -> None:
        """Retry a write until the database takes it (the held messages are kept alive by
        `_kept_alive` meanwhile).

        During an outage the projector holds one batch and stops fetching: the backlog
        waits in JetStream, not in memory, and is written once the database is back. Give-up
        rule: an error about the data, not about reaching the database (`unwritable`: a
        constraint, a value out of range, a NUL byte, a date Python cannot shift), is raised
        at once as `RowRefused`; retrying could never make it pass.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                await write()
                self._last_commit = loop.time()
                return
            except Exception as exc:
                if unwritable(exc):
                    raise RowRefused(str(exc)) from exc
                self._metrics.write_failures.inc()
                failures += 1
                delay = WRITE_RETRY.delay(failures)
                log.warning("projection write failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)


def _adopt_waiting(sub: JetStreamContext.PullSubscription) -> list[Msg]:
    """Take what waits in a pull subscription's queue (deliveries that came after their pull
    request was given up on), as nats-py's next fetch would, minus the status messages."""
    inner = sub._sub
    out: list[Msg] = []
    while not inner._pending_queue.empty():
        msg = inner._pending_queue.get_nowait()
        inner._pending_size -= len(msg.data)
        if not msg.data and msg.headers and "Status" in msg.headers:
            continue  # the end of a pull request (no messages, timeout): not a delivery
        out.append(msg)
    return out


def _delivered(msg: Msg) -> int:
    try:
        return delivery.delivered(msg)
    except Exception:  # not a JetStream delivery (tests): once
        return 1
