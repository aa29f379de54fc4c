"""The executor agent: pulls work for its pool, runs each task, reports its terminal state.

Work is fetched only for free slots. While a task runs, its work message is kept alive with
`in_progress`; the terminal event is published (PubAck received) *before* the work message is
acked, so a crash between the two re-runs the task rather than losing its result. A killed
executor stops sending progress and JetStream redelivers its tasks to another executor, as
the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus.publish import Outgoing, Publisher
from tidegate.bus.pull import first_message, take_available
from tidegate.bus.topology import Buckets, ensure_work_consumer
from tidegate.config import ExecutorSettings, Limits
from tidegate.executor import tasklogs
from tidegate.executor.process import ProcessLimits, run_process
from tidegate.executor.workmsg import Slot, ack, keepalive, nak, still_ours
from tidegate.metrics import ExecutorMetrics
from tidegate.supervise import until_done
from tidegate.wire import (
    FINISHED_BY_STATE,
    AnyEvent,
    ClientRecord,
    Heartbeat,
    Running,
    RunningTask,
    TaskClass,
    WorkItem,
    encode,
    now,
)

log = logging.getLogger(__name__)

_FETCH_MAX = 64
# A terminal report waits for NATS as long as it takes (JetStream holds the work meanwhile).
REPORT_RETRY = Backoff(base_s=0.2, cap_s=5.0)


def default_executor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")


class Executor:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: Publisher,
        buckets: Buckets,
        settings: ExecutorSettings,
        limits: Limits,
        metrics: ExecutorMetrics,
        *,
        log_dir: Path | None = None,
        clients: Callable[[str], ClientRecord | None] = lambda _name: None,
    ) -> None:
        self._js = js
        self._publisher = publisher
        self._buckets = buckets
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._log_dir = log_dir
        self._clients = clients
        self.id = settings.executor_id or default_executor_id()
        self.running: dict[str, Slot] = {}
        self._reserved = 0  # slots promised to an in-flight fetch
        # Wakes the fetch loops: a slot was freed, or the cordon or drain changed.
        self._wake = asyncio.Event()
        self._beat = asyncio.Event()  # write the heartbeat now, not at the next interval
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.cordoned = False  # an operator's cordon (or a drain): fetch no new work
        self._process_limits = ProcessLimits(
            kill_grace_s=settings.kill_grace_s,
            log_max_bytes=settings.log_max_bytes,
            log_tail_bytes=settings.log_tail_bytes,
        )
        metrics.slots.set(settings.slots)

    # -- fetching ---------------------------------------------------------------------------

    def _free(self) -> int:
        return self._settings.slots - len(self.running) - self._reserved

    async def fetch_loop(self, task_class: TaskClass) -> None:
        durable = await ensure_work_consumer(
            self._js, self._settings.pool, task_class, self._limits
        )
        sub = await self._js.pull_subscribe_bind(durable, stream=names.WORK_STREAM)
        try:
            while not self.draining:
                if self.cordoned or self._free() <= 0:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # Waiting for work holds one slot only, so an idle class never keeps the
                # other from filling the rest; once a task arrives, take what else is there.
                msgs = await self._reserving(1, first_message(sub, wait=1.0))
                # The task just fetched is not in `running` yet: count it. A task that came
                # while a cordon arrived was ours before it: it runs, but no more are taken.
                more = min(self._free() - len(msgs), _FETCH_MAX) if msgs else 0
                if self.cordoned:
                    more = 0
                if more > 0:
                    msgs += await self._reserving(more, take_available(sub, more))
                for msg in msgs:
                    self._metrics.fetched.inc()
                    self._start(msg)
        finally:
            await sub.unsubscribe()

    async def _reserving(self, n: int, fetch: Awaitable[list[Msg]]) -> list[Msg]:
        self._reserved += n
        try:
            return await fetch
        finally:
            self._reserved -= n
            self._wake.set()
            if self.cordon_in_effect:
                self._beat.set()  # the cordon is in effect only now: say so at once

    def _start(self, msg: Msg) -> None:
        try:
            item = msgspec.json.decode(msg.data, type=WorkItem)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("undecodable work message on %s: %s", msg.subject, exc)
            self._metrics.bad_work.inc()
            term = asyncio.create_task(msg.term())
            self._tasks.add(term)
            term.add_done_callback(self._tasks.discard)
            return
        slot = Slot(item=item, attempt=msg.metadata.num_delivered)
        self.running[item.task_id] = slot
        self._metrics.running.set(len(self.running))
        task = asyncio.create_task(self._run(msg, slot), name=f"task:{item.task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- running one task -------------------------------------------------------------------

    async def _run(self, msg: Msg, slot: Slot) -> None:
        item = slot.item
        # Kept alive for the whole attempt, reports included: a report waiting on a full
        # events stream must not let the task be handed to another executor meanwhile.
        ack_wait_s = self._limits.work_ack_wait_s
        keeping = asyncio.create_task(
            keepalive(msg, slot, ack_wait_s), name=f"keepalive:{item.task_id}"
        )
        try:
            event = await self._execute(msg, slot)
            await self._report(event)
            if still_ours(slot, ack_wait_s):
                await ack(msg)
            else:
                # Frozen or cut off for longer than the ack wait: JetStream has likely handed
                # the task to another executor, and our ack would delete *its* attempt's
                # work message. The report above is fenced by its attempt number anyway.
                log.warning(
                    "task %s attempt %d: no progress sent for over %.0fs; not acking, "
                    "another executor may run it",
                    item.task_id,
                    slot.attempt,
                    self._limits.work_ack_wait_s,
                )
            self._metrics.finished.labels(state=event.state).inc()
            log.info("task %s attempt %d: %s", item.task_id, slot.attempt, event.state)
        except asyncio.CancelledError:
            # Shut down mid-task: the process group is already killed; hand the task back
            # at once so another executor starts the next attempt without waiting.
            await asyncio.shield(nak(msg))
            raise
        except Exception:
            log.exception("task %s attempt %d: executor error", item.task_id, slot.attempt)
            await nak(msg)
        finally:
            keeping.cancel()
            if self.running.get(item.task_id) is slot:  # not a newer attempt's slot
                del self.running[item.task_id]
            self._metrics.running.set(len(self.running))
            self._wake.set()

    def _sensitive(self, item: WorkItem) -> bool:
        """The client's mode now (the registry), not when the task was dispatched."""
        record = self._clients(item.client)
        return item.sensitive if record is None else record.sensitive

    def _finished(self, slot: Slot, state: str, **fields: Any) -> AnyEvent:
        item = slot.item
        event = FINISHED_BY_STATE[state](
            task_id=item.task_id,
            client=item.client,
            key=item.spec.key,
            attempt=slot.attempt,
            submitted_at=item.submitted_at,
            executor=self.id,
            sensitive=self._sensitive(item),
            **fields,
        )
        return cast(AnyEvent, event)

    async def _execute(self, msg: Msg, slot: Slot) -> AnyEvent:
        item, attempt = slot.item, slot.attempt
        if attempt > item.spec.max_attempts:
            at = now()
            return self._finished(
                slot,
                "lost",
                at=at,
                finished_at=at,
                reason=f"gave up: delivered {attempt} times, over its limit of "
                f"{item.spec.max_attempts} attempts (its executors died, were cut off, or "
                "handed it back when stopping)",
            )
        if await self._cancel_requested(item.task_id):
            at = now()
            return self._finished(
                slot, "cancelled", at=at, finished_at=at, reason="cancelled before it started"
            )
        if self._sensitive(item):
            # A sensitive client hears of every transition; others see `running` through
            # the heartbeats, which cost no event per task.
            await self._report(
                Running(
                    task_id=item.task_id,
                    client=item.client,
                    key=item.spec.key,
                    attempt=attempt,
                    submitted_at=item.submitted_at,
                    executor=self.id,
                    at=now(),
                    started_at=slot.started_at,
                    sensitive=True,
                )
            )
        result = await run_process(
            item.spec,
            limits=self._process_limits,
            base_env=os.environ,
            log_path=self._log_path(slot),
            cancel=slot.cancel,
            cancel_reason=lambda: slot.cancel_reason,
        )
        return self._finished(
            slot,
            result.outcome,
            at=result.finished_at,
            exit_code=result.exit_code,
            reason=result.reason,
            log_tail=result.log_tail,
            started_at=result.started_at,
            finished_at=result.finished_at,
        )

    def _log_path(self, slot: Slot) -> Path | None:
        if self._log_dir is None:
            return None
        return tasklogs.log_path(self._log_dir, slot.item.task_id, slot.attempt, slot.started_at)

    async def _report(self, event: AnyEvent) -> None:
        """Publish an event until JetStream acknowledges it (a timeout is retried, same id)."""
        out = Outgoing(
            subject=names.event_subject(event.client),
            payload=encode(event),
            msg_id=event.event_id,
        )
        await until_done(
            partial(self._publisher.publish, out),
            what=f"reporting {event.event_id}",
            backoff=REPORT_RETRY,
        )

    async def _cancel_requested(self, task_id: str) -> bool:
        try:
            entry = await self._buckets.cancel.get(names.kv_key(task_id))
        except nats.js.errors.KeyNotFoundError:
            return False
        return bool(entry.value)

    def on_cancel(self, key: str, value: bytes | None) -> None:
        """A cancel request arrived (KV watch): stop the task if it runs here."""
        if value is None:
            return
        task_id = value.decode(errors="replace")
        slot = self.running.get(task_id)
        if slot is not None:
            slot.cancel_reason = "cancelled by request"
            slot.cancel.set()

    # -- cordon, heartbeat and drain --------------------------------------------------------

    def cordon(self, on: bool, *, by: str = "") -> None:
        """Stop (or resume) taking new work; running tasks are not touched."""
        if on != self.cordoned:
            log.info("executor %s %s by %s", self.id, "cordoned" if on else "uncordoned", by or "?")
        self.cordoned = on
        self._wake.set()
        self._beat.set()

    @property
    def cordon_in_effect(self) -> bool:
        """Cordoned, and no fetch that began before the cordon is still waiting for work:
        what the heartbeat reports, so that a reader may rely on "no new task starts here"."""
        return (self.cordoned or self.draining) and self._reserved == 0

    def snapshot(self) -> bytes:
        running = [
            RunningTask(
                task_id=s.item.task_id,
                client=s.item.client,
                key=s.item.spec.key,
                attempt=s.attempt,
                pool=s.item.pool,
                started_at=s.started_at,
                submitted_at=s.item.submitted_at,
            )
            for s in self.running.values()
        ]
        return encode(
            Heartbeat(
                executor=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                pools=[self._settings.pool],
                slots=self._settings.slots,
                running=running,
                load=os.getloadavg()[0],
                at=now(),
                draining=self.draining,
                cordoned=self.cordon_in_effect,
            )
        )

    async def heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            self._beat.clear()
            try:
                await self._buckets.executors.put(self.id, self.snapshot())
                last_ok = loop.time()
            except Exception as exc:
                log.warning("heartbeat not stored: %s", exc)
            self._metrics.heartbeat_age.set(loop.time() - last_ok)
            # A cordon or drain is shown at once, not an interval later. `asyncio.timeout`, not
            # `wait_for`: 3.11's wait_for loses a cancel that races the event being set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._limits.heartbeat_interval_s):
                    await self._beat.wait()

    async def drain(self) -> None:
        """Stop fetching, let running tasks finish until the deadline, hand back the rest."""
        self.draining = True
        self._wake.set()
        self._beat.set()
        if self._tasks:
            log.info(
                "draining: %d tasks running, waiting up to %.0fs",
                len(self._tasks),
                self._settings.drain_timeout_s,
            )
            await asyncio.wait(set(self._tasks), timeout=self._settings.drain_timeout_s)
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._settings.kill_grace_s + 5)

    async def forget(self) -> None:
        """Remove this executor's heartbeat key: a clean exit, not a death to reconcile."""
        try:
            await self._buckets.executors.delete(self.id)
        except Exception as exc:
            log.warning("could not remove heartbeat key: %s", exc)
