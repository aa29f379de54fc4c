"""Cancel requests as an executor follows them: the cancel bucket, watched into memory.

Every executor keeps the whole bucket (requests are kept a week; a few hundred bytes each), so
a task about to start is checked against memory, not with a KV read of its own: the read was a
round trip on every task's path. The mirror is ready (its initial values in) before the first
fetch. A request written a moment before its task is fetched may reach the watch only after
the task started: it then stops the running process, as any later request does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.kvwatch import KvMirror
from tidegate.executor.workmsg import Slot
from tidegate.wire import CancelRequest, WorkItem, decode_cancel

log = logging.getLogger(__name__)


def cancels(value: bytes, item: WorkItem) -> bool:
    """Whether a cancel bucket value asks to cancel this run; an unreadable one cancels
    nothing (logged), rather than stopping the watch."""
    try:
        request = decode_cancel(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("unreadable cancel request %r: %s", value[:200], exc)
        return False
    return _applies(request, item)


def _applies(request: CancelRequest, item: WorkItem) -> bool:
    # A request for an earlier run of this task id (kept a week) does not cancel this one.
    return request.task_id == item.task_id and request.applies_to(item.run, item.submitted_at)


async def cancel_requested(bucket: KeyValue, item: WorkItem) -> bool:
    """Whether a cancel of this run was requested before it started (one KV read: for an
    executor that runs without a `CancelMirror`)."""
    try:
        entry = await bucket.get(names.kv_key(item.task_id))
    except nats.js.errors.KeyNotFoundError:
        return False
    if not entry.value:
        return False
    return cancels(entry.value, item)


def stop_runs(running: Mapping[str, Slot], request: CancelRequest) -> None:
    """A cancel request arrived: stop the runs it names that run here (by their run key)."""
    if request.run is not None:
        slot = running.get(names.run_msg_id(request.task_id, request.run))
        slots = [slot] if slot is not None else []
    else:  # every run submitted until then: rare, and `running` is about a slot count long
        slots = [s for s in running.values() if s.item.task_id == request.task_id]
    for slot in slots:
        if request.applies_to(slot.item.run, slot.item.submitted_at):
            slot.cancel_reason = "cancelled by request"
            slot.cancel.set()


class CancelMirror:
    """The cancel bucket in memory; a request that arrives stops the run it names if that
    runs here already (`running`: the executor's attempts, by run key)."""

    def __init__(self, kv: KeyValue, running: Mapping[str, Slot]) -> None:
        self._running = running
        self._mirror: KvMirror[CancelRequest] = KvMirror(
            kv, decode_cancel, name="cancels", on_change=self._changed
        )
        self.ready = self._mirror.ready

    async def run(self) -> None:
        await self._mirror.run()

    def requested(self, item: WorkItem) -> bool:
        """Whether a cancel of this run is known: a dict look-up, no I/O."""
        request = self._mirror.get(names.kv_key(item.task_id))
        return request is not None and _applies(request, item)

    def _changed(self, _key: str, request: CancelRequest | None) -> None:
        if request is not None:
            stop_runs(self._running, request)
