"""Messages delivered `max_deliver` times without being processed become message dead letters.

Every consumer has a bounded `max_deliver` (`bus.topology`). When a message reaches it,
JetStream stops delivering it and publishes an advisory naming its stream sequence; the
message itself stays in the stream (a work queue keeps it; an interest stream keeps it for
the consumer that never acked). This loop, shared by the drivers as a queue group (one driver
handles each advisory), reads the message, sets it aside with the reason "delivered N times
without being processed", then deletes it from its stream.

Advisories are fire-and-forget (a driver that was down, a reconnect, misses them), so a sweep
reconciles as well:

- A max-delivered message of a work-queue stream (submissions, ready, work) stays in the
  stream, delivered but no longer pending. When a consumer has nothing pending, every message
  of its filter at or before its last delivery is such a message; one seen there on two
  sweeps in a row is set aside like an advisory's. (A consumer that is never idle keeps its
  spent messages until it is: a work consumer with long tasks, for one.)
- An event (interest stream, two consumers) is deleted only once the other consumer has
  acked it, or its callback or projection would be lost with it: until then it is retried by
  the sweep. The events consumers set their poison aside in-band anyway (projector, notifier);
  the advisory covers a stage that crashes on a message every time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RawStreamMsg

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus.deadletters import MSG_ID_HEADER, set_aside_raw
from tidegate.bus.lost import lost_event, lost_message, task_of_msg_id
from tidegate.bus.stored import get_stored
from tidegate.wire import decode_work_item, now

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 60.0
_SWEEP_SCAN_MAX = 1000  # messages looked at per consumer and sweep
_CONSUMERS_PAGE = 256  # consumers the server lists per request
_STORE_TRIES = 3  # then the sweep tries again later
_STORE_RETRY = Backoff(base_s=0.5, cap_s=5.0)
# Stream → the stage whose consumer reads it (the events stream: by consumer).
_WORK_QUEUES = {
    names.TASKS_STREAM: "route",
    names.READY_STREAM: "ready",
    names.WORK_STREAM: "work",
}
_EVENT_CONSUMERS = {names.PROJECTOR_CONSUMER: "event", names.NOTIFY_CONSUMER: "notify"}


class MaxDeliveries(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of JetStream's max-deliveries advisory that matter here."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int = 0


def stage_of(stream: str, consumer: str) -> str | None:
    """The stage a consumer belongs to, None for streams that are not Tidegate's."""
    if stream == names.EVENTS_STREAM:
        if names.notify_partition_of_consumer(consumer) is not None:
            return "notify"  # every notifier partition's consumer
        return _EVENT_CONSUMERS.get(consumer)
    return _WORK_QUEUES.get(stream)


def client_of(subject: str) -> str | None:
    """The client a message of one of Tidegate's streams belongs to, None if it cannot tell."""
    if subject.startswith("tg.submit."):
        return names.client_of_submit_subject(subject) or None
    if (ready := names.parse_ready_subject(subject)) is not None:
        return ready[0]
    if (work := names.parse_work_subject(subject)) is not None:
        return work[2]
    return names.client_of_event_subject(subject)


class PoisonWatch:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        count: Callable[[str, str | None], None],
        *,
        sweep_every_s: float = SWEEP_EVERY_S,
    ) -> None:
        self._nc = nc
        self._js = js
        self._count = count
        self._sweep_every_s = sweep_every_s
        self._undeleted: set[tuple[str, str, int]] = set()  # events set aside, still in stream
        self._suspects: dict[tuple[str, str], set[int]] = {}  # stuck on the last sweep
        self.handled = 0  # advisories turned into dead letters (tests, logs)

    async def run(self) -> None:
        sub = await self._nc.subscribe(names.MAX_DELIVERIES_ADVISORY_ALL, queue=names.POISON_QUEUE)
        sweeper = asyncio.create_task(self._sweep_forever(), name="poison:sweep")
        try:
            async for msg in sub.messages:
                try:
                    advisory = msgspec.json.decode(msg.data, type=MaxDeliveries)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("unreadable max-deliveries advisory: %s", exc)
                    continue
                await self.handle(advisory)
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await sub.unsubscribe()

    async def handle(self, advisory: MaxDeliveries) -> bool:
        """Set aside and delete the message an advisory names; True if it was set aside."""
        stage = stage_of(advisory.stream, advisory.consumer)
        if stage is None:
            return False
        reason = (
            f"delivered {advisory.deliveries} times without being processed "
            f"(consumer {advisory.consumer})"
        )
        return await self._set_aside(
            advisory.stream,
            advisory.consumer,
            advisory.stream_seq,
            stage,
            reason,
            advisory.deliveries,
        )

    async def _set_aside(
        self, stream: str, consumer: str, seq: int, stage: str, reason: str, deliveries: int
    ) -> bool:
        try:
            raw = await get_stored(self._js, stream, seq)
        except nats.js.errors.NotFoundError:
            return False  # acked, deleted or set aside meanwhile
        if raw.subject is None:
            return False
        # A ready or work message is a task that will never run now: it is `lost`, with the
        # reason, before its message goes (else it would wait in `queued` forever).
        if not await self._report_lost(stream, raw, deliveries, reason):
            return False
        if not await self._store(stream, seq, raw, stage, reason):
            return False
        self.handled += 1
        await self._delete(stream, consumer, seq)
        return True

    async def _report_lost(
        self, stream: str, raw: RawStreamMsg, deliveries: int, reason: str
    ) -> bool:
        """Publish the `lost` event of the task a spent ready or work message carries; True
        when there is none to publish or it is published."""
        if stream not in (names.READY_STREAM, names.WORK_STREAM) or raw.subject is None:
            return True
        try:
            item = decode_work_item(raw.data or b"")
            client, key, run = item.client, item.spec.key, item.run
            submitted_at, sensitive = item.submitted_at, item.sensitive
        except Exception:  # unreadable: its message id may still name the task
            named = client_of(raw.subject)
            task = task_of_msg_id(named, (raw.headers or {}).get(MSG_ID_HEADER))
            if named is None or task is None:
                return True
            client, (key, run), submitted_at, sensitive = named, task, raw.time or now(), False
        event = lost_event(
            client=client,
            key=key,
            run=run,
            # Past every attempt it may have had: a late report of one cannot overtake it.
            attempt=deliveries if stream == names.WORK_STREAM else 0,
            submitted_at=submitted_at,
            reason=reason,
            sensitive=sensitive,
        )
        out = lost_message(event)
        try:
            await self._js.publish(
                out.subject, out.payload, timeout=5.0, headers={MSG_ID_HEADER: out.msg_id}
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            log.error("cannot report %s lost (%s); its message stays", event.task_id, exc)
            return False
        log.error("task %s is lost: %s", event.task_id, reason)
        return True

    async def _store(
        self, stream: str, seq: int, raw: RawStreamMsg, stage: str, reason: str
    ) -> bool:
        assert raw.subject is not None
        for attempt in range(1, _STORE_TRIES + 1):
            try:
                await set_aside_raw(
                    self._js,
                    subject=raw.subject,
                    data=raw.data or b"",
                    headers=raw.headers,
                    stage=stage,
                    reason=reason,
                    client=client_of(raw.subject),
                    origin_id=f"{stream}:{seq}",
                    stream_seq=seq,
                    count=self._count,
                )
                return True
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
                log.error(
                    "cannot set aside %s:%d (%s); try %d of %d",
                    stream,
                    seq,
                    exc,
                    attempt,
                    _STORE_TRIES,
                )
                await asyncio.sleep(_STORE_RETRY.delay(attempt))
        return False  # left in its stream: the sweep comes back to it

    async def _delete(self, stream: str, consumer: str, seq: int) -> None:
        if stream == names.EVENTS_STREAM and not await self._others_done(consumer, seq):
            self._undeleted.add((stream, consumer, seq))
            return
        try:
            await self._js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            pass
        self._undeleted.discard((stream, consumer, seq))

    async def _others_done(self, consumer: str, seq: int) -> bool:
        """Whether every other events consumer (the projector, every notifier partition) has
        acked `seq` (its ack floor passed it)."""
        for info in await self._consumers(names.EVENTS_STREAM):
            if info.name == consumer or stage_of(names.EVENTS_STREAM, info.name) is None:
                continue
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            if (floor or 0) < seq:
                return False
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every_s)
            try:
                await self.sweep()
            except Exception as exc:  # the next sweep tries again
                log.warning("dead-letter sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Reconcile what advisories may have missed; returns the messages set aside."""
        for stream, consumer, seq in list(self._undeleted):
            await self._delete(stream, consumer, seq)
        found = 0
        for stream, stage in _WORK_QUEUES.items():
            for info in await self._consumers(stream):
                found += await self._sweep_consumer(stream, stage, info)
        return found

    async def _consumers(self, stream: str) -> list[ConsumerInfo]:
        """Every consumer of a stream (the server answers 256 at a time)."""
        out: list[ConsumerInfo] = []
        while True:
            try:
                page = await self._js.consumers_info(stream, offset=len(out))
            except nats.js.errors.NotFoundError:
                return out
            out.extend(page)
            if len(page) < _CONSUMERS_PAGE:
                return out

    async def _sweep_consumer(self, stream: str, stage: str, info: ConsumerInfo) -> int:
        key = (stream, info.name)
        previous = self._suspects.pop(key, set())
        max_deliver = info.config.max_deliver or -1
        last = info.delivered.stream_seq if info.delivered else 0
        if max_deliver <= 0 or info.num_ack_pending or not last:
            return 0
        # Nothing pending, yet messages of this consumer at or before its last delivery are
        # still in the (work-queue) stream: each was delivered max_deliver times (or its
        # advisory is being handled right now). The ack floor does not tell: it moves past a
        # spent message once a later one is acked.
        subject = info.config.filter_subject or ">"
        suspects: set[int] = set()
        seq = 1
        while seq <= last and len(suspects) < _SWEEP_SCAN_MAX:
            try:
                raw = await get_stored(self._js, stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            if raw.seq is None or raw.seq > last:
                break
            suspects.add(raw.seq)
            seq = raw.seq + 1
        self._suspects[key] = suspects - previous
        found = 0
        reason = (
            f"delivered {max_deliver} times without being processed (consumer {info.name}; "
            "found by the sweep)"
        )
        for stuck in sorted(suspects & previous):
            found += await self._set_aside(stream, info.name, stuck, stage, reason, max_deliver)
        return found
