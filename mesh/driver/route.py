"""The route step: validate submissions, choose pool and class, queue them for dispatch.

Every client submits on its own subject, and drivers share one durable pull consumer per
client on the submission stream, taking a fair share of each in rounds. For each batch a driver
publishes every valid task to its client's ready queue (where the dispatcher applies caps,
rates and fairness) and a `queued` (or `rejected`) event to the events stream, and acks a
submission only after both PubAcks are in. A driver killed halfway leaves its submissions
unacked; another driver routes them again, and the dedup ids (task id, event id) make the
second publish a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.publish import MSG_ID_HEADER, Outgoing, PubAck, Publisher
from tidegate.bus.pull import ack_all, pull, settle_quietly
from tidegate.bus.topology import ensure_route_consumer
from tidegate.config import DriverSettings, Limits
from tidegate.driver.rounds import BoundSubscriptions, rotate
from tidegate.errors import InvalidTask
from tidegate.metrics import DriverMetrics
from tidegate.wire import (
    KEY_PATTERN,
    NAME_RE,
    AnyEvent,
    ClientRecord,
    Queued,
    Rejected,
    TaskClass,
    WorkItem,
    decode_spec,
    encode,
    now,
    task_id,
)

log = logging.getLogger(__name__)

_IDLE_S = 0.05  # pause between rounds that found nothing to route

ClientLookup = Callable[[str], ClientRecord | None]

INVALID_CLIENT = "_invalid"  # where submissions on a subject no client can own are rejected
_KEY = re.compile(KEY_PATTERN)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to publish for one submission: a work item and its event, or a rejection."""

    event: AnyEvent
    work: WorkItem | None = None


def task_class(timeout_s: float, short_max_timeout_s: float) -> TaskClass:
    return "short" if timeout_s <= short_max_timeout_s else "long"


def decide(
    msg_subject: str,
    data: bytes,
    header_msg_id: str | None,
    stream_seq: int,
    submitted_at: datetime,
    *,
    lookup: ClientLookup,
    settings: DriverSettings,
    limits: Limits,
) -> Decision:
    """Pure routing decision for one submission (no I/O; unit-testable)."""
    client = names.client_of_submit_subject(msg_subject)
    # `submitted_at` is JetStream's stored time of the submission: the same when another
    # driver routes it again, so the row lands in the same day partition.
    at = submitted_at
    # The key is read from the dedup header when the body cannot be trusted, so even a
    # malformed submission gets a rejected state under the id its client will look for; but
    # only a key the schema would accept, or a bad header could make an unstorable row.
    prefix = f"{client}:"
    key = header_msg_id[len(prefix) :] if header_msg_id and header_msg_id.startswith(prefix) else ""
    if not _KEY.match(key):
        key = f"_unkeyed-{stream_seq}"
    if not re.match(NAME_RE, client):
        # Not a name any client can be registered under: file it under a fixed one.
        reason = f"{msg_subject!r} does not name a valid client (names match {NAME_RE})"
        return Decision(
            event=Rejected(
                task_id=task_id(INVALID_CLIENT, f"_seq-{stream_seq}"),
                client=INVALID_CLIENT,
                key=f"_seq-{stream_seq}",
                attempt=0,
                at=at,
                submitted_at=at,
                reason=reason,
                finished_at=at,
            )
        )

    def reject(reason: str) -> Decision:
        sensitive = bool(record and record.sensitive)
        return Decision(
            event=Rejected(
                task_id=task_id(client, key),
                client=client,
                key=key,
                attempt=0,
                at=at,
                submitted_at=at,
                reason=reason,
                finished_at=at,
                sensitive=sensitive,
            )
        )

    record = lookup(client)
    if len(data) > limits.max_task_bytes:
        return reject(f"task is {len(data)} bytes; the limit is {limits.max_task_bytes}")
    if record is None:
        return reject(f"unknown client {client!r}: register it with `tidegate client add`")
    try:
        spec = decode_spec(data)
    except InvalidTask as exc:
        return reject(str(exc))
    if header_msg_id is not None and header_msg_id != names.msg_id(client, spec.key):
        return reject(
            f"Nats-Msg-Id {header_msg_id!r} does not match the task key; "
            f"use {names.msg_id(client, spec.key)!r}"
        )
    tid = task_id(client, spec.key)
    pool = spec.pool or record.default_pool or settings.default_pool
    cls = task_class(spec.timeout_s, settings.short_max_timeout_s)
    work = WorkItem(
        task_id=tid,
        client=client,
        spec=spec,
        pool=pool,
        task_class=cls,
        submitted_at=at,
        sensitive=record.sensitive,
    )
    queued = Queued(
        task_id=tid,
        client=client,
        key=spec.key,
        attempt=0,
        at=at,
        submitted_at=at,
        spec=spec,
        pool=pool,
        task_class=cls,
        sensitive=record.sensitive,
    )
    return Decision(event=queued, work=work)


class Router:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: Publisher,
        lookup: ClientLookup,
        settings: DriverSettings,
        limits: Limits,
        metrics: DriverMetrics,
    ) -> None:
        self._js = js
        self._publisher = publisher
        self._lookup = lookup
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._subs = BoundSubscriptions(js, names.TASKS_STREAM)
        self._round = 0
        self._unroutable: set[str] = set()

    async def run(self) -> None:
        try:
            while True:
                msgs = await self.round()
                if msgs:
                    await self.route_batch(msgs)
                else:
                    await asyncio.sleep(_IDLE_S)
        finally:
            await self._subs.close()

    async def round(self) -> list[Msg]:
        """Take a fair share of every client's waiting submissions.

        Each client submits to its own subject and has its own consumer, so one client's
        flood of submissions is routed side by side with another's few, not ahead of them.
        """
        info = await self._js.stream_info(names.TASKS_STREAM, subjects_filter=names.SUBMIT_ALL)
        waiting = [
            (s, n) for s, n in (info.state.subjects or {}).items() if n > 0 and self._routable(s)
        ]
        if not waiting:
            return []
        self._round += 1
        waiting = rotate(waiting, self._round)
        share = max(1, self._settings.route_batch // len(waiting))
        pulls = [self._take(subject, min(n, share)) for subject, n in waiting]
        msgs: list[Msg] = []
        for (subject, _), got in zip(
            waiting, await asyncio.gather(*pulls, return_exceptions=True), strict=True
        ):
            if isinstance(got, BaseException):
                # One client's consumer failing must not stop routing for the others.
                log.error("cannot route submissions on %s: %s", subject, got)
                continue
            msgs.extend(got)
        return msgs

    def _routable(self, subject: str) -> bool:
        """A literal subject: a wildcard token stored by a stray publish cannot get a
        consumer of its own (it would overlap every client's)."""
        client = names.client_of_submit_subject(subject)
        if "*" in client or ">" in client or "." in client:
            if subject not in self._unroutable:
                self._unroutable.add(subject)
                log.error("ignoring submissions on %r: not one client's subject", subject)
            return False
        return True

    async def _take(self, subject: str, count: int) -> list[Msg]:
        client = names.client_of_submit_subject(subject)
        sub = await self._subs.get(client, lambda: ensure_route_consumer(self._js, client))
        # A short wait only: another driver may have taken them since the count.
        return await pull(sub, count, wait=0.05)

    async def route_batch(self, msgs: list[Msg]) -> None:
        outgoing: list[list[Outgoing]] = []
        decisions: list[Decision] = []
        for msg in msgs:
            header_id = (msg.headers or {}).get(MSG_ID_HEADER)
            d = decide(
                msg.subject,
                msg.data,
                header_id,
                msg.metadata.sequence.stream,
                msg.metadata.timestamp or now(),
                lookup=self._lookup,
                settings=self._settings,
                limits=self._limits,
            )
            decisions.append(d)
            outgoing.append(_outgoing(d))
        flat = [o for group in outgoing for o in group]
        results = await self._publisher.publish_many(flat)
        i = 0
        acks: list[Msg] = []
        naks: list[Msg] = []
        for msg, group, d in zip(msgs, outgoing, decisions, strict=True):
            mine = results[i : i + len(group)]
            i += len(group)
            if all(isinstance(r, PubAck) for r in mine):
                acks.append(msg)
                if d.work is None:
                    self._metrics.rejected.labels(reason=_reason_kind(d.event)).inc()
                    log.info("rejected %s: %s", d.event.task_id, getattr(d.event, "reason", ""))
                else:
                    self._metrics.routed.labels(
                        pool=d.work.pool, task_class=d.work.task_class
                    ).inc()
            else:
                # Not acked: JetStream redelivers it after the ack wait; a nak with a delay
                # gives the buffer time to drain if the work stream is full.
                failure = next(r for r in mine if isinstance(r, Exception))
                log.warning("could not hand off %s (%s); will retry", d.event.task_id, failure)
                self._metrics.handoff_failures.inc()
                naks.append(msg)
        await ack_all(acks)
        await settle_quietly(naks, "nak", delay=2.0)


def _outgoing(d: Decision) -> list[Outgoing]:
    event_out = Outgoing(
        subject=names.event_subject(d.event.client),
        payload=encode(d.event),
        msg_id=d.event.event_id,
    )
    if d.work is None:
        return [event_out]
    ready_out = Outgoing(
        subject=names.ready_subject(d.work.client, d.work.pool),
        payload=encode(d.work),
        msg_id=d.work.task_id,
    )
    return [ready_out, event_out]


def _reason_kind(event: AnyEvent) -> str:
    """A small fixed set of label values for the rejected counter (reasons themselves vary)."""
    reason = getattr(event, "reason", "")
    for marker, kind in (
        ("bytes; the limit", "oversized"),
        ("unknown client", "unknown_client"),
        ("malformed JSON", "malformed"),
        ("Nats-Msg-Id", "bad_msg_id"),
    ):
        if marker in reason:
            return kind
    return "invalid"
