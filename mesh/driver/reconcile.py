"""The reconciler: tasks that nothing will ever run are reported `lost`, with the reason.

JetStream recovers from a dead executor by itself: its work messages are delivered again
after the ack wait, to another executor of the pool. What it cannot recover is a pool with no
executor at all: its tasks would wait in the ready and work queues forever, `queued` or
`running` in the database. Every driver watches the executors' heartbeats; once a pool has
had no live executor for `lost_after_s` (plus the work ack wait when some of its tasks were
running), the driver holding the reconcile lease takes that pool's waiting messages off their
queues and reports each task `lost`.

A message is removed first (acked) and its `lost` event published after: an executor that
comes back in between finds nothing to run, and never runs a task reported lost. The event's
dedup id makes a repeated report harmless.

A served pool can strand a task too: its executor died, and its work message is gone (set
aside after too many deliveries, removed by an operator). The database still shows it
`running`; once no heartbeat lists it and no queue holds its client's messages for longer
than the work ack wait plus `lost_after_s`, and the projection has caught up with every event
published so far (so that a task that did finish is not taken for stranded), it is `lost`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.lease import Leases
from tidegate.bus.lost import lose_unreadable, lost_event, lost_message
from tidegate.bus.publish import Publisher, unsendable
from tidegate.bus.topology import ensure_ready_consumer, ensure_work_consumer
from tidegate.config import DriverSettings, Limits
from tidegate.driver.dispatch import READY_STAGE
from tidegate.driver.rounds import BoundSubscriptions, Strays
from tidegate.errors import Unsendable
from tidegate.metrics import DriverMetrics, count_dead_letter
from tidegate.store.queries import Q
from tidegate.store.store import Store
from tidegate.supervise import until_done
from tidegate.wire import (
    NAME_RE,
    ClientRecord,
    Heartbeat,
    Lost,
    TaskClass,
    WorkItem,
    decode_work_item,
    now,
)

log = logging.getLogger(__name__)

_BATCH = 500  # messages taken off one queue per pull
_BATCHES_PER_PASS = 20  # a longer backlog goes over a few passes
WORK_STAGE = "work"
_STORE_WAIT_S = 30.0


class Reconciler:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: Publisher,
        leases: Leases,
        heartbeats: Callable[[], list[Heartbeat]],
        clients: Callable[[str], ClientRecord | None],
        settings: DriverSettings,
        limits: Limits,
        metrics: DriverMetrics,
        store: Store | None = None,
    ) -> None:
        self._js = js
        self._store = store
        self._publisher = publisher
        self._leases = leases
        self._heartbeats = heartbeats
        self._clients = clients
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._count_dead_letter = count_dead_letter(metrics)
        self._ready = BoundSubscriptions(js, names.READY_STREAM)
        self._work = BoundSubscriptions(js, names.WORK_STREAM)
        self._ready_strays = Strays(js, names.READY_STREAM, count=self._count_dead_letter)
        self._work_strays = Strays(js, names.WORK_STREAM, count=self._count_dead_letter)
        self._started: float | None = None
        self._live_at: dict[str, float] = {}  # pool → when a live executor last served it
        self.lost = 0  # tasks this driver reported lost

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._started is None:
            self._started = loop.time()
        try:
            while True:
                # Every driver watches, so that whoever holds the lease next knows how long
                # each pool has been without an executor (since its own start at worst).
                self.observe()
                revision = await self._leases.acquire(names.RECONCILE_LEASE)
                if revision is not None:
                    try:
                        await self.reconcile_once()
                    finally:
                        await self._leases.release(names.RECONCILE_LEASE, revision)
                await asyncio.sleep(self._settings.reconcile_every_s)
        finally:
            await self._ready.close()
            await self._work.close()

    def observe(self) -> set[str]:
        """The pools served by a live executor now (a cordoned one still counts: an
        operator's choice, not a death)."""
        at = asyncio.get_running_loop().time()
        live = {pool for hb in self._heartbeats() for pool in hb.pools}
        for pool in live:
            self._live_at[pool] = at
        return live

    def dead_for(self, pool: str) -> float:
        """Seconds the pool has had no live executor, as far as this driver has seen."""
        at = asyncio.get_running_loop().time()
        since = max(self._live_at.get(pool, 0.0), self._started or at)
        return at - since

    async def reconcile_once(self) -> int:
        """One pass: every pool without an executor for too long loses its waiting tasks."""
        live = self.observe()
        bound = self._settings.lost_after_s
        lost = 0
        ready = await self._subject_counts(names.READY_STREAM, names.READY_ALL)
        for subject, n in ready.items():
            parsed = names.parse_ready_subject(subject)
            if n > 0 and parsed is None:
                await self._stray(self._ready_strays, READY_STAGE, subject)
            if n <= 0 or parsed is None:
                continue
            client, pool = parsed
            dead = self.dead_for(pool)
            if pool in live or dead < bound:
                continue
            lost += await self._drain_ready(client, pool, dead)
        work = await self._subject_counts(names.WORK_STREAM, names.WORK_ALL)
        classes: set[tuple[str, str]] = set()
        for subject, n in work.items():
            parsed_work = names.parse_work_subject(subject)
            if n > 0 and not _work_consumer_matches(parsed_work):
                await self._stray(self._work_strays, WORK_STAGE, subject)
            elif n > 0 and parsed_work is not None:
                classes.add((parsed_work[0], parsed_work[1]))
        for pool, task_class in sorted(classes):
            dead = self.dead_for(pool)
            if pool in live or dead < bound or task_class not in names.TASK_CLASSES:
                continue
            lost += await self._drain_work(pool, task_class, dead)
        if self._store is not None:
            try:
                # Bounded: a database that does not answer must not hold up the next pass.
                async with asyncio.timeout(_STORE_WAIT_S):
                    lost += await self._lose_stranded()
            except Exception as exc:  # the database away: the queues' part above still ran
                log.warning("cannot look for stranded running tasks: %s", exc)
        self.lost += lost
        return lost

    async def _lose_stranded(self) -> int:
        """Tasks the database shows unfinished that nothing will finish any more: no
        heartbeat lists them, and no queue holds their message any more (gone with a dead
        executor: set aside after too many deliveries, purged by an operator), for longer
        than the work ack wait plus the bound. Only once the projection has caught up with
        every event published so far: a task that did finish is not reported lost."""
        assert self._store is not None
        waited = self._settings.lost_after_s + self._limits.work_ack_wait_s
        before = now() - timedelta(seconds=waited)
        busy: set[str] = set()  # clients with messages waiting: their tasks may still run
        for stream, subjects in (
            (names.READY_STREAM, names.READY_ALL),
            (names.WORK_STREAM, names.WORK_ALL),
        ):
            for subject, n in (await self._subject_counts(stream, subjects)).items():
                client = _client_of(subject)
                if n > 0 and client is not None:
                    busy.add(client)
        params = {"before": before, "busy": sorted(busy), "limit": _BATCH}
        rows = await self._store.fetch_all(Q.stranded_tasks, params, what="stranded tasks")
        # By task id alone: an executor of an earlier version reports no run.
        running = {t.task_id for hb in self._heartbeats() for t in hb.running}
        candidates = {(r["task_id"], r["run"]) for r in rows if r["task_id"] not in running}
        if not candidates:
            return 0
        # Every terminal event is published before its work message is acked (gone): once the
        # projector has stored every event up to now, a row still unfinished is stranded.
        last = (await self._js.stream_info(names.EVENTS_STREAM)).state.last_seq
        if not await self._projected_through(last):
            return 0
        rows = await self._store.fetch_all(Q.stranded_tasks, params, what="stranded tasks")
        lost = 0
        for row in rows:
            if (row["task_id"], row["run"]) not in candidates:
                continue
            record = self._clients(row["client"])
            event = lost_event(
                client=row["client"],
                key=row["key"],
                run=row["run"],
                attempt=row["attempt"],
                submitted_at=row["submitted_at"],
                reason=_stranded_reason(row["state"], row["executor"], waited),
                sensitive=bool(record and record.sensitive),
                executor=row["executor"],
            )
            if not await self._report(event):
                continue
            log.warning("task %s is lost: %s", event.task_id, event.reason)
            lost += 1
        return lost

    async def _projected_through(self, seq: int, within_s: float = 5.0) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            info = await self._js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
            if info.ack_floor.stream_seq >= seq:
                return True
            if loop.time() > deadline:
                return False  # the projection lags: look again next pass
            await asyncio.sleep(0.2)

    async def _stray(self, strays: Strays, stage: str, subject: str) -> None:
        """Messages no consumer of this version can take: set aside, not left for ever."""
        try:
            await strays.set_aside(
                subject,
                stage=stage,
                reason=f"{subject!r} is not a subject this version of Tidegate writes",
                first_seq=1,
                limit=_BATCH,
            )
        except Exception as exc:  # next pass
            log.warning("cannot set aside messages on %r: %s", subject, exc)

    async def _subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        info = await self._js.stream_info(stream, subjects_filter=subjects)
        return dict(info.state.subjects or {})

    async def _drain_ready(self, client: str, pool: str, dead: float) -> int:
        reason = f"no live executor in pool {pool} for {dead:.0f} s"
        taken = 0
        for _ in range(_BATCHES_PER_PASS):
            msgs = await self._pull(
                self._ready,
                names.ready_consumer(client, pool),
                partial(ensure_ready_consumer, self._js, client, pool),
            )
            for msg in msgs:
                await self._lose(msg, READY_STAGE, reason, attempt=0)
            taken += len(msgs)
            if len(msgs) < _BATCH:
                break
        return taken

    async def _drain_work(self, pool: str, task_class: str, dead: float) -> int:
        cls: TaskClass = "short" if task_class == "short" else "long"
        durable = await ensure_work_consumer(self._js, pool, cls, self._limits)
        info = await self._js.consumer_info(names.WORK_STREAM, durable)
        # Tasks that were running when their executor died come back only after the ack wait:
        # until then JetStream may still hand them to an executor (the normal recovery).
        if (info.num_ack_pending or info.num_redelivered) and (
            dead < self._settings.lost_after_s + self._limits.work_ack_wait_s
        ):
            return 0
        reason = f"no live executor in pool {pool} for {dead:.0f} s"
        taken = 0
        for _ in range(_BATCHES_PER_PASS):
            msgs = await self._pull(self._work, durable, partial(_same, durable))
            for msg in msgs:
                # This pull is a delivery too: the ones before it were the task's attempts.
                await self._lose(msg, WORK_STAGE, reason, attempt=msg.metadata.num_delivered - 1)
            taken += len(msgs)
            if len(msgs) < _BATCH:
                break
        return taken

    async def _pull(
        self, subs: BoundSubscriptions, durable: str, ensure: Callable[[], Awaitable[str]]
    ) -> list[Msg]:
        try:
            return await subs.pull(durable, ensure, _BATCH, wait=0.2)
        except (nats.errors.TimeoutError, TimeoutError):
            return []

    async def _lose(self, msg: Msg, stage: str, reason: str, *, attempt: int) -> None:
        try:
            item: WorkItem = decode_work_item(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            client = _client_of(msg.subject)
            record = self._clients(client) if client else None
            await lose_unreadable(
                self._js,
                self._publisher,
                msg,
                stage=stage,
                client=client,
                reason=f"undecodable {stage} message on {msg.subject}: {exc}",
                attempt=max(attempt, 0),
                sensitive=bool(record and record.sensitive),
                count=self._count_dead_letter,
            )
            return
        # Off the queue first: nobody can run it once it is reported lost.
        try:
            await msg.ack_sync(timeout=5.0)
        except Exception as exc:  # not removed: it stays queued, the next pass tries again
            log.warning("cannot take %s off its queue (%s); next pass", item.task_id, exc)
            return
        record = self._clients(item.client)
        event = lost_event(
            client=item.client,
            key=item.spec.key,
            run=item.run,
            attempt=max(attempt, 0),
            submitted_at=item.submitted_at,
            reason=reason,
            sensitive=item.sensitive if record is None else record.sensitive,
        )
        if await self._report(event):
            log.warning("task %s is lost: %s", item.task_id, reason)

    async def _report(self, event: Lost) -> bool:
        """Publish `event` until JetStream has it (the events stream may be full or away for a
        while); False for an event that can never be published, which retrying cannot fix."""
        try:
            await until_done(
                partial(self._publisher.publish, lost_message(event)),
                what=f"reporting {event.event_id}",
                give_up=unsendable,
            )
        except Unsendable as exc:
            log.error("task %s is lost, but that cannot be reported: %s", event.task_id, exc)
            return False
        return True


async def _same(durable: str) -> str:
    return durable


def _stranded_reason(state: str, executor: str | None, waited: float) -> str:
    if executor:
        return (
            f"no executor runs it and no queue holds it any more: its executor {executor} "
            f"stopped reporting over {waited:.0f} s ago"
        )
    return (
        f"{state} for over {waited:.0f} s, but no queue holds it any more (its message was set "
        "aside as a dead letter or removed) and no executor runs it"
    )


def _work_consumer_matches(parsed: tuple[str, str, str] | None) -> bool:
    """Whether some pool's work consumer can take a work subject (its client token does not
    matter: the consumer's filter takes any)."""
    if parsed is None:
        return False
    pool, task_class, _client = parsed
    return bool(re.match(NAME_RE, pool)) and task_class in names.TASK_CLASSES


def _client_of(subject: str) -> str | None:
    ready = names.parse_ready_subject(subject)
    if ready is not None:
        return ready[0]
    work = names.parse_work_subject(subject)
    return work[2] if work is not None else None
