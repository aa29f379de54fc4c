"""The executor agent: pulls work for its pool, runs each task, reports its terminal state.

Work is fetched only for free slots, in one request for all of them. A slot is taken only while
its task's process runs: storing the terminal event and acking the work message are batched
with other attempts' (settle.py) after the slot is free again. Until then the work message is
kept alive with `in_progress`, and the task stays in the heartbeat; the terminal event is
published (PubAck received) *before* the work message is acked, so a crash between the two
re-runs the task rather than losing its result. Cancel requests are read from a watched mirror
of the cancel bucket (cancels.py), not with a read per task. A killed executor stops sending
progress and JetStream redelivers its tasks to another executor, as
the next attempt. One that is only cut off or frozen kills such a task's process group as soon
as it can no longer prove the task is its own, and reports nothing for it; a task it hands
back (drain, shutdown, its own error before the process started) spends no attempt
(workmsg.py says how both work).
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
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus import delivery
from tidegate.bus.buckets import Buckets
from tidegate.bus.publish import Publisher
from tidegate.bus.pull import first_message, take_available
from tidegate.bus.topology import ensure_work_consumer
from tidegate.config import ExecutorSettings, Limits, Settings
from tidegate.executor import tasklogs
from tidegate.executor.cancels import CancelMirror, cancel_requested
from tidegate.executor.process import ProcessLimits, run_process
from tidegate.executor.reports import (
    finished_event,
    heartbeat,
    lose_undecodable,
    report,
    running_event,
)
from tidegate.executor.settle import Settler, settled_anyway
from tidegate.executor.taskenv import TaskLaunch
from tidegate.executor.workmsg import (
    Slot,
    ack,
    after_error,
    count_handbacks,
    forget_handbacks,
    hand_back,
    hold,
    let_go,
    nak,
    started,
    still_ours,
    stop_holding,
)
from tidegate.metrics import ExecutorMetrics
from tidegate.wire import (
    AnyEvent,
    ClientRecord,
    TaskClass,
    WorkItem,
    decode_work_item,
    encode,
    now,
)

log = logging.getLogger(__name__)

_FETCH_MAX = 64


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
        watch_cancels: bool = False,
        launch: TaskLaunch | None = None,
    ) -> None:
        self._js = js
        self._publisher = publisher
        self._buckets = buckets
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._log_dir = log_dir
        self._clients = clients
        # How tasks start (environment, user, limits): decided once, here or by the caller,
        # which also knows the server URLs that must never reach a task.
        self._launch = launch or TaskLaunch.from_settings(Settings(executor=settings))
        self.id = settings.executor_id or default_executor_id()
        # Every attempt held here, keyed by run: running, or ended and being settled.
        self.running: dict[str, Slot] = {}
        self._occupied = 0  # slots taken: attempts whose process has not ended yet
        self._reserved = 0  # slots promised to an in-flight fetch
        self._settler = Settler(publisher, limits.work_ack_wait_s)
        self._logs = tasklogs.LogFiles() if log_dir is not None else None
        # With `watch_cancels`, `cancel_loop` must run (supervised by the caller); without it,
        # a task about to start reads its cancel key (one KV read per task).
        self.cancels = CancelMirror(buckets.cancel, self.running) if watch_cancels else None
        # Wakes the fetch loops: a slot was freed, or the cordon or drain changed.
        self._wake = asyncio.Event()
        self._beat = asyncio.Event()  # write the heartbeat now, not at the next interval
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.cordoned = False  # an operator's cordon (or a drain): fetch no new work
        self._paused_until = 0.0  # loop time: an executor error pauses fetching until then
        self._process_limits = ProcessLimits(
            kill_grace_s=settings.kill_grace_s,
            log_max_bytes=settings.log_max_bytes,
            log_tail_bytes=settings.log_tail_bytes,
        )
        metrics.slots.set(settings.slots)

    # -- fetching ---------------------------------------------------------------------------

    def _free(self) -> int:
        # Attempts still being reported count beyond a slot's worth of them: if JetStream takes
        # no events (a full events stream), the executor stops taking work rather than pile up
        # finished tasks it cannot report, each holding its work message.
        slots = self._settings.slots
        over = max(0, len(self.running) - self._occupied - slots)
        return slots - self._occupied - over - self._reserved

    def _release(self, slot: Slot) -> None:
        """The attempt's process is over (or never started): its slot takes the next task."""
        if slot.occupying:
            slot.occupying = False
            self._occupied -= 1
            self._wake.set()

    async def fetch_loop(self, task_class: TaskClass) -> None:
        durable = await ensure_work_consumer(
            self._js, self._settings.pool, task_class, self._limits
        )
        sub = await self._js.pull_subscribe_bind(durable, stream=names.WORK_STREAM)
        if self.cancels is not None:
            # A request stored before this executor started must be known before any task is.
            await self.cancels.ready.wait()
        try:
            while not self.draining:
                pause = self._paused_until - asyncio.get_running_loop().time()
                if self.cordoned or self._free() <= 0 or pause > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause if pause > 0 else None):
                            await self._wake.wait()
                    continue
                # What is there now, for every free slot, in one request answered at once.
                free = min(self._free(), _FETCH_MAX)
                msgs = await self._reserving(free, take_available(sub, free))
                if not msgs and not self.cordoned and self._free() > 0:
                    # Nothing yet: waiting for work holds one slot only, so an idle class never
                    # keeps the other from filling the rest; once a task arrives, take what
                    # else is there. A cluster electing the consumer's leader answers 503 for
                    # a while: wait it out on the same subscription.
                    first = first_message(sub, wait=1.0, wait_out_unavailable=True)
                    msgs = await self._reserving(1, first)
                    # The task just fetched is not started yet: count it. A task that came
                    # while a cordon arrived was ours before it: it runs, but no more are taken.
                    more = min(self._free() - len(msgs), _FETCH_MAX) if msgs else 0
                    if more > 0 and not self.cordoned:
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
            item = decode_work_item(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # It can never run: its task (named by the message id) is lost with the reason,
            # and the message is set aside as a dead letter, not retried.
            self._metrics.bad_work.inc()
            lose = asyncio.create_task(
                lose_undecodable(self._js, self._publisher, msg, exc, self._clients, self.id)
            )
            self._tasks.add(lose)
            lose.add_done_callback(self._tasks.discard)
            return
        slot = Slot(item=item, attempt=delivery.delivered(msg))
        # Keyed by run: two runs of one task id may run here side by side.
        self.running[names.run_msg_id(item.task_id, item.run)] = slot
        self._occupied += 1
        self._metrics.running.set(len(self.running))
        task = asyncio.create_task(self._run(msg, slot), name=f"task:{item.task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- running one task -------------------------------------------------------------------

    async def _run(self, msg: Msg, slot: Slot) -> None:
        item = slot.item
        # Kept alive for the whole attempt, its settling included: a report waiting on a full
        # events stream must not let the task be handed to another executor meanwhile.
        ack_wait_s = self._limits.work_ack_wait_s
        keeping = asyncio.create_task(hold(msg, slot, ack_wait_s), name=f"hold:{item.task_id}")
        handbacks = self._buckets.handbacks
        try:
            slot.handbacks = await count_handbacks(handbacks, msg, slot)
            slot.attempt = delivery.delivered(msg) - slot.handbacks
            event = await self._execute(msg, slot)
            self._release(slot)
            if not still_ours(slot, ack_wait_s):
                # Let go (its group is killed), or it ended while this executor was frozen:
                # another executor runs the task now, and only its attempt may report.
                let_go(slot)
                self._metrics.let_go.inc()
                return
            slot.ended = True
            if await self._settler.settle(msg, slot, event):
                await forget_handbacks(handbacks, msg, slot)
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
            # at once so another executor starts it without waiting, and without spending an
            # attempt. Reported already: only the ack was left. Let go: nothing to send.
            await settled_anyway(slot)
            if still_ours(slot, ack_wait_s) and not slot.acked:
                await asyncio.shield(ack(msg) if slot.reported else hand_back(handbacks, msg, slot))
            raise
        except Exception:
            log.exception("task %s attempt %d: executor error", item.task_id, slot.attempt)
            if still_ours(slot, ack_wait_s):
                await self._after_error(msg, slot)
        finally:
            self._release(slot)
            stop_holding(slot, keeping)
            run_key = names.run_msg_id(item.task_id, item.run)
            if self.running.get(run_key) is slot:  # not a newer attempt's slot
                del self.running[run_key]
            self._metrics.running.set(len(self.running))
            self._wake.set()

    async def _after_error(self, msg: Msg, slot: Slot) -> None:
        """Back with a delay, never in a tight loop; and this executor fetches nothing new
        for as long, since whatever failed here (fork, memory, NATS) may fail the next too."""
        then = after_error(slot)
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + then.delay_s)
        self._metrics.executor_errors.labels(handed_back=str(then.handed_back).lower()).inc()
        if then.handed_back:
            await hand_back(self._buckets.handbacks, msg, slot, delay=then.delay_s)
        else:
            await nak(msg, then.delay_s)

    def _sensitive(self, item: WorkItem) -> bool:
        """The client's mode now (the registry), not when the task was dispatched."""
        record = self._clients(item.client)
        return item.sensitive if record is None else record.sensitive

    def _finished(self, slot: Slot, state: str, **fields: Any) -> AnyEvent:
        sensitive = self._sensitive(slot.item)
        return finished_event(slot, state, executor=self.id, sensitive=sensitive, **fields)

    async def _execute(self, msg: Msg, slot: Slot) -> AnyEvent:
        item, attempt = slot.item, slot.attempt
        if attempt > item.spec.max_attempts:
            at = now()
            return self._finished(
                slot,
                "lost",
                at=at,
                finished_at=at,
                reason=f"gave up: attempt {attempt} is over its limit of "
                f"{item.spec.max_attempts} attempts (its executors died or were cut off while "
                "it ran; hand-backs by stopping executors are not counted)",
            )
        if await self._cancel_known(item):
            at = now()
            return self._finished(
                slot, "cancelled", at=at, finished_at=at, reason="cancelled before it started"
            )
        if self._sensitive(item):
            # A sensitive client hears of every transition; others see `running` through
            # the heartbeats, which cost no event per task.
            await report(self._publisher, running_event(slot, executor=self.id))
        result = await run_process(
            item.spec,
            limits=self._process_limits,
            base_env=self._launch.base_env,
            wrapper=self._launch.wrapper,
            run_as=self._launch.run_as,
            log_path=self._log_path(slot),
            open_log=self._logs.open if self._logs is not None else None,
            cancel=slot.cancel,
            cancel_reason=lambda: slot.cancel_reason,
            on_start=partial(started, slot),
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

    async def _cancel_known(self, item: WorkItem) -> bool:
        if self.cancels is not None:
            return self.cancels.requested(item)
        return await cancel_requested(self._buckets.cancel, item)

    async def cancel_loop(self) -> None:
        """Follow the cancel bucket (with `watch_cancels`): supervise it beside the fetch loops."""
        if self.cancels is not None:
            await self.cancels.run()

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
        return encode(
            heartbeat(
                self.id,
                pool=self._settings.pool,
                slots=self._settings.slots,
                running=self.running.values(),
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
        await self._settler.close()

    async def forget(self) -> None:
        """Remove this executor's heartbeat key: a clean exit, not a death to reconcile."""
        try:
            await self._buckets.executors.delete(self.id)
        except Exception as exc:
            log.warning("could not remove heartbeat key: %s", exc)
