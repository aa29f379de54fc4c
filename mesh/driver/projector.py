"""The projector: writes the events stream (and heartbeats) into PostgreSQL in large batches.

One statement per batch, several transitions of a task coalesced into one row write, and a
cap on commits per second: the database sees a bounded rate whatever the flood, and the
backlog waits in JetStream. Writes are monotone upserts, so redelivery and replay are
harmless; a message is acked only after the commit that contains it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus.pull import ack_all, settle_quietly
from tidegate.bus.topology import PROJECTOR_ACK_WAIT_S
from tidegate.config import DriverSettings
from tidegate.metrics import DriverMetrics
from tidegate.store.rows import TaskRow, coalesce, row_from_event, rows_from_heartbeat
from tidegate.store.store import RowRefused, Store, permanent
from tidegate.wire import Heartbeat, decode_event

log = logging.getLogger(__name__)

# Bound on (task, attempt) pairs remembered as already projected `running` from heartbeats.
_SEEN_RUNNING_MAX = 500_000
# A batch held through a database outage is kept alive well inside the consumer's ack wait.
_KEEPALIVE_S = PROJECTOR_ACK_WAIT_S / 3
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
        self._heartbeat_rows: dict[tuple[str, int], TaskRow] = {}
        self._seen_running: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._last_commit = 0.0
        self._to_terminate: list[Msg] = []

    def offer_heartbeat(self, hb: Heartbeat) -> None:
        """Queue `running` rows for tasks this heartbeat shows for the first time."""
        for row in rows_from_heartbeat(hb):
            seen = (row.task_id, row.attempt)
            if seen in self._seen_running:
                continue
            self._seen_running[seen] = None
            self._heartbeat_rows[seen] = row
        while len(self._seen_running) > _SEEN_RUNNING_MAX:
            self._seen_running.popitem(last=False)

    async def run(self) -> None:
        sub = await self._js.pull_subscribe_bind(
            names.PROJECTOR_CONSUMER, stream=names.EVENTS_STREAM
        )
        try:
            while True:
                msgs = await self._collect(sub)
                rows, good = self._decode(msgs)
                if self._to_terminate:
                    await settle_quietly(self._to_terminate, "term")
                    self._to_terminate.clear()
                rows.extend(self._heartbeat_rows.values())
                self._heartbeat_rows.clear()
                if not rows:
                    continue
                if self._settings.persist == "per-event":
                    await self._write_per_event(rows)
                else:
                    await self._write_batch(rows, good)
                await ack_all(good)
        finally:
            await sub.unsubscribe()

    async def _collect(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        loop = asyncio.get_running_loop()
        max_batch = self._settings.projector_max_batch
        min_interval = 1.0 / self._settings.projector_max_commits_per_s
        msgs: list[Msg] = []
        deadline: float | None = None
        while len(msgs) < max_batch:
            wait = 1.0 if deadline is None else deadline - loop.time()
            if wait <= 0:
                break
            try:
                got = await sub.fetch(max_batch - len(msgs), timeout=max(wait, 0.1))
            except (nats.errors.TimeoutError, TimeoutError):
                got = []
            if got:
                msgs.extend(got)
                if deadline is None:
                    # Linger for more, and never commit faster than the cap allows.
                    deadline = max(
                        loop.time() + self._settings.projector_max_linger_s,
                        self._last_commit + min_interval,
                    )
            elif deadline is None and self._heartbeat_rows:
                break
        return msgs

    def _decode(self, msgs: Sequence[Msg]) -> tuple[list[TaskRow], list[Msg]]:
        rows: list[TaskRow] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                event = decode_event(msg.data)
                row = row_from_event(event)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                # Nothing to project; terminate it so it is not redelivered forever.
                log.warning("undecodable event on %s: %s", msg.subject, exc)
                self._metrics.bad_events.inc()
                self._to_terminate.append(msg)
                continue
            self._metrics.events.labels(state=event.state).inc()
            rows.append(row)
            good.append(msg)
        return rows, good

    async def _write_batch(self, rows: list[TaskRow], msgs: Sequence[Msg]) -> None:
        merged = coalesce(rows)
        self._metrics.coalesced.inc(len(rows) - len(merged))
        try:
            await self._retrying(lambda: self._store.upsert_tasks(merged), msgs)
        except RowRefused:
            # One row the database can never take must not hold back the others: write
            # them one by one and set the refused ones aside, loudly.
            for row in merged:
                try:
                    await self._retrying(partial(self._store.upsert_task_one, row), msgs)
                except RowRefused as exc:
                    self._metrics.refused_rows.inc()
                    log.error(
                        "row of %s refused by the database, not projected: %s",
                        row.task_id,
                        exc.__cause__,
                    )
            return
        self._metrics.rows.inc(len(merged))
        self._metrics.commits.inc()
        self._metrics.batch_size.observe(len(merged))

    async def _write_per_event(self, rows: list[TaskRow]) -> None:
        """Baseline mode: one transaction per state change, as classic engines do."""
        gate = asyncio.Semaphore(self._settings.per_event_connections)

        async def one(row: TaskRow) -> None:
            async with gate:
                await self._retrying(lambda: self._store.upsert_task_one(row), ())
                self._metrics.rows.inc()
                self._metrics.commits.inc()
                self._metrics.batch_size.observe(1)

        await asyncio.gather(*(one(r) for r in rows))

    async def _retrying(self, write: Callable[[], Awaitable[object]], msgs: Sequence[Msg]) -> None:
        """Retry a write until the database takes it, keeping the held messages alive.

        During an outage the projector holds one batch and stops fetching: the backlog
        waits in JetStream, not in memory, and is written once the database is back.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        last_keepalive = loop.time()
        while True:
            try:
                await write()
                self._last_commit = loop.time()
                return
            except Exception as exc:
                if permanent(exc):
                    raise RowRefused(str(exc)) from exc
                self._metrics.write_failures.inc()
                failures += 1
                delay = WRITE_RETRY.delay(failures)
                log.warning("projection write failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            if msgs and loop.time() - last_keepalive > _KEEPALIVE_S:
                await settle_quietly(msgs, "in_progress")
                last_keepalive = loop.time()
