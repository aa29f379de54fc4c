"""The route step: validate submissions, choose pool and class, queue them for dispatch.

Every client submits on its own subject, and drivers share one durable pull consumer per
client on the submission stream, taking a fair share of each in rounds. For each batch a driver
publishes every valid task to its client's ready queue (where the dispatcher applies caps,
rates and fairness) and a `queued` (or `rejected`) event to the events stream, and acks a
submission only after both PubAcks are in. A driver killed halfway leaves its submissions
unacked; another driver routes them again, and the dedup ids (run id, event id) make the
second publish a no-op. A key submitted again after the dedup window is the task's next run,
with ids of its own (see `decide.py`, the pure decision for one submission).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus import delivery
from tidegate.bus.deadletters import set_aside
from tidegate.bus.publish import MSG_ID_HEADER, Outgoing, PubAck, Publisher
from tidegate.bus.pull import ack_all, hand_back, settle_quietly
from tidegate.bus.quota import effective_quota, ready_room
from tidegate.bus.topology import ensure_route_consumer
from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import ClientLookup, Decision, Unroutable, decide, to_publish
from tidegate.driver.rounds import BoundSubscriptions, Strays, rotate
from tidegate.errors import BufferFull
from tidegate.metrics import DriverMetrics, count_dead_letter
from tidegate.wire import COMMAND_POLICY, NAME_RE, AnyEvent, now

log = logging.getLogger(__name__)

_IDLE_S = 0.05  # pause between rounds that found nothing to route
# A client whose ready queue was at its quota (`Limits.client_buffer_max`, or its own
# `buffer_max`) is looked at again this often; meanwhile its submissions are not fetched
# (they wait in the submission stream).
_FULL_RECHECK_S = 1.0

# Rounds fetched ahead of the one being routed: one is enough to hide the fetch behind the
# PubAcks; more would only hold more submissions unacked (and unroutable by other drivers).
_FETCH_AHEAD = 1

SUBMIT_STAGE = "submit"  # the dead-letter stage of submissions that cannot be routed


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
        self._count_dead_letter = count_dead_letter(metrics)
        # Forgotten well inside the consumers' inactive threshold: a cached subscription
        # never outlives its consumer (a vanished one is made again all the same).
        self._subs = BoundSubscriptions(
            js, names.TASKS_STREAM, max_idle_s=settings.route_inactive_threshold_s / 2
        )
        self._round = 0
        self._full: dict[str, float] = {}  # client → when its ready quota was found full
        self._strays = Strays(js, names.TASKS_STREAM, count=self._count_dead_letter)

    async def run(self) -> None:
        """Fetch and route, pipelined: the next round is fetched while this batch's PubAcks
        are awaited, so a flood is routed at the rate of publishing, not of fetch + publish
        one after the other. Batches are routed one at a time, in the order fetched."""
        ahead: asyncio.Queue[list[Msg]] = asyncio.Queue()
        # Batches in hand at once: the one being routed and those fetched ahead of it.
        room = asyncio.Semaphore(1 + _FETCH_AHEAD)
        held: list[list[Msg]] = []  # fetched, not taken by the routing loop yet (FIFO)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fetch_ahead(ahead, room, held))
                group.create_task(self._route_fetched(ahead, room, held))
        finally:
            left = [m for msgs in held for m in msgs]
            if left:
                # Fetched, never routed (a failure stopped the loop): back at once rather than
                # after the ack wait. A stopping driver hands back all it holds anyway.
                await settle_quietly(left, "nak")
            await self._subs.close()

    async def _fetch_ahead(
        self, ahead: asyncio.Queue[list[Msg]], room: asyncio.Semaphore, held: list[list[Msg]]
    ) -> None:
        while True:
            await room.acquire()
            msgs = await self.round()
            if msgs:
                held.append(msgs)
                ahead.put_nowait(msgs)
            else:
                room.release()
                await asyncio.sleep(_IDLE_S)

    async def _route_fetched(
        self, ahead: asyncio.Queue[list[Msg]], room: asyncio.Semaphore, held: list[list[Msg]]
    ) -> None:
        while True:
            msgs = await ahead.get()
            held.pop(0)
            try:
                await self.route_batch(msgs)
            finally:
                room.release()

    async def round(self) -> list[Msg]:
        """Take a fair share of every client's waiting submissions.

        Each client submits to its own subject and has its own consumer, so one client's
        flood of submissions is routed side by side with another's few, not ahead of them.
        """
        info = await self._js.stream_info(names.TASKS_STREAM, subjects_filter=names.SUBMIT_ALL)
        counts = {s: n for s, n in (info.state.subjects or {}).items() if n > 0}
        for subject in [s for s in counts if not self._routable(s)]:
            del counts[subject]
            try:
                await self._set_aside_unroutable(subject, first_seq=info.state.first_seq)
            except Exception as exc:  # retried next round; the others are routed meanwhile
                log.error("cannot set aside submissions on %r: %s", subject, exc)
        waiting: list[tuple[str, int]] = []
        for subject, n in counts.items():
            client = names.client_of_submit_subject(subject)
            if await self._ready_full(client):
                continue
            if self._has_own_quota(client):
                # JetStream holds only the stream-wide quota: this client's own is kept
                # here, by fetching no more than its ready queues have room for.
                room = await self._ready_room(client)
                if room == 0:
                    self._full[client] = asyncio.get_running_loop().time()
                    continue
                if room is not None:
                    n = min(n, room)
            waiting.append((subject, n))
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

    async def _ready_full(self, client: str) -> bool:
        """A client whose ready queue is at its quota is not fetched from: the publish would
        be refused, and every nak counts a delivery towards `max_deliver`, so its waiting
        submissions would end as dead letters instead of waiting (paused, capped, unserved)."""
        found = self._full.get(client)
        if found is None:
            return False
        now = asyncio.get_running_loop().time()
        if now - found < _FULL_RECHECK_S:
            return True
        if await self._ready_room(client) == 0:
            self._full[client] = now
            return True
        del self._full[client]
        return False

    def _has_own_quota(self, client: str) -> bool:
        record = self._lookup(client)
        return record is not None and record.buffer_max is not None

    async def _ready_room(self, client: str) -> int | None:
        """How many more of a client's tasks its ready queues take: 0 when one is at the
        stream-wide quota or all of them at the client's own (`buffer_max`); None when it has
        no quota of its own (JetStream holds the stream-wide one) or the queue cannot be read
        (try routing: a refusal marks it full again)."""
        try:
            info = await self._js.stream_info(
                names.READY_STREAM, subjects_filter=names.client_ready_filter(client)
            )
        except Exception as exc:
            log.warning("cannot read %s's ready queue: %s", client, exc)
            return None
        counts = list((info.state.subjects or {}).values())
        ceiling = info.config.max_msgs_per_subject or 0
        if ceiling > 0 and any(n >= ceiling for n in counts):
            return 0
        record = self._lookup(client)
        return ready_room(effective_quota(record.buffer_max if record else None, ceiling), counts)

    @staticmethod
    def _routable(subject: str) -> bool:
        """One client's subject: its token is a name a client can be registered under.
        Anything else (`tg.submit.a.b`, a wildcard token stored by a stray publish) gets no
        consumer (a wildcard one would overlap every client's) and is set aside."""
        return re.match(NAME_RE, names.client_of_submit_subject(subject)) is not None

    async def _set_aside_unroutable(self, subject: str, *, first_seq: int) -> None:
        """Move the submissions on a subject no client can own to the dead letters, a bounded
        number per round (no consumer can hold them)."""
        await self._strays.set_aside(
            subject,
            stage=SUBMIT_STAGE,
            reason=f"{subject!r} is not a client's submission subject "
            f"(client names match {NAME_RE})",
            first_seq=first_seq,
            limit=self._settings.route_batch,
        )

    async def _take(self, subject: str, count: int) -> list[Msg]:
        client = names.client_of_submit_subject(subject)
        # A short wait only: another driver may have taken them since the count.
        return await self._subs.pull(
            client,
            lambda: ensure_route_consumer(
                self._js,
                client,
                inactive_threshold_s=self._settings.route_inactive_threshold_s,
                max_deliver=self._limits.max_deliver,
            ),
            count,
            wait=0.05,
        )

    async def route_batch(self, msgs: list[Msg]) -> None:
        outgoing: list[list[Outgoing]] = []
        decisions: list[Decision] = []
        routed: list[Msg] = []
        unroutable: list[tuple[Msg, Unroutable]] = []
        for msg in msgs:
            header_id = (msg.headers or {}).get(MSG_ID_HEADER)
            try:
                d = decide(
                    msg.subject,
                    msg.data,
                    header_id,
                    delivery.stream_seq(msg),
                    delivery.stored_at(msg) or now(),
                    lookup=self._lookup,
                    settings=self._settings,
                    limits=self._limits,
                )
            except Unroutable as exc:
                unroutable.append((msg, exc))
                continue
            routed.append(msg)
            decisions.append(d)
            outgoing.append(to_publish(d))
        flat = [o for group in outgoing for o in group]
        results = await self._publisher.publish_many(flat)
        i = 0
        acks: list[Msg] = []
        naks: list[Msg] = []
        # Counted per batch: a labelled counter's lookup per task is a cost at flood rates.
        counted: Counter[tuple[str, str]] = Counter()
        for msg, group, d in zip(routed, outgoing, decisions, strict=True):
            mine = results[i : i + len(group)]
            i += len(group)
            if all(isinstance(r, PubAck) for r in mine):
                acks.append(msg)
                if d.work is None:
                    self._metrics.rejected.labels(reason=_reason_kind(d.event)).inc()
                    log.info("rejected %s: %s", d.event.task_id, getattr(d.event, "reason", ""))
                else:
                    counted[d.work.pool, d.work.task_class] += 1
            else:
                # Not acked: JetStream redelivers it after the ack wait; a nak with a delay
                # gives the buffer time to drain if the work stream is full.
                failure = next(r for r in mine if isinstance(r, Exception))
                log.warning("could not hand off %s (%s); will retry", d.event.task_id, failure)
                if isinstance(failure, BufferFull) and any(
                    names.parse_ready_subject(o.subject) is not None
                    for o, r in zip(group, mine, strict=True)
                    if r is failure
                ):
                    # Its ready quota is full: leave its submissions waiting where they are.
                    self._full[d.event.client] = asyncio.get_running_loop().time()
                self._metrics.handoff_failures.inc()
                naks.append(msg)
        for (pool, task_class), n in counted.items():
            self._metrics.routed.labels(pool=pool, task_class=task_class).inc(n)
        await ack_all(acks)
        await hand_back(naks)
        for msg, why in unroutable:
            await set_aside(
                self._js,
                msg,
                stage=SUBMIT_STAGE,
                reason=str(why),
                client=why.client,
                count=self._count_dead_letter,
            )


def _reason_kind(event: AnyEvent) -> str:
    """A small fixed set of label values for the rejected counter (reasons themselves vary)."""
    reason = getattr(event, "reason", "")
    if reason.startswith(COMMAND_POLICY):  # first: its reason repeats what the task asked for
        return "command_policy"
    for marker, kind in (
        ("bytes; the limit", "oversized"),
        ("unknown client", "unknown_client"),
        ("malformed JSON", "malformed"),
        ("Nats-Msg-Id", "bad_msg_id"),
    ):
        if marker in reason:
            return kind
    return "invalid"
