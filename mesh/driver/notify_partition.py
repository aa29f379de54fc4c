"""One notifier partition: its lease, its durable consumer, its lanes (mesh/driver/notify.py).

A partition is held by one driver at a time; a driver may hold several. Each has its own lease
revision and sending deadline, so losing one partition's lease stops only that partition's
sending and its events only.

What a holder held and did not hand off goes back at once (nak). A holder whose lease passed
(frozen, cut off) gives back only the events whose ack wait surely still runs: the server has
not delivered them again, and the next holder, whose term began while they were unacked here,
checks every one against the shared fence (mesh/driver/fence.py) in the first ack wait of its
term. The others may already be the next holder's, and a late nak would have them delivered
again after that window, an older state after a newer one: they are left to the ack wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus import delivery
from tidegate.bus.buckets import LEASE_TTL_S
from tidegate.bus.deadletters import set_aside
from tidegate.bus.lease import Leases
from tidegate.bus.pull import ack_all, pull, settle_quietly
from tidegate.driver.callbacks.outbox import Outbox, Term
from tidegate.driver.callbacks.payload import callback_from_flat
from tidegate.driver.callbacks.transport import Transports
from tidegate.driver.fence import DeliveredFence
from tidegate.driver.notify_lanes import Held, Lanes, LeaseLost
from tidegate.driver.notify_rules import LatestStates, wants_callback
from tidegate.metrics import DriverMetrics, count_dead_letter
from tidegate.store.flatten import FlatEvent, flatten
from tidegate.store.rows import TaskRow, row_from_flat
from tidegate.store.store import Store
from tidegate.supervise import until_done
from tidegate.wire import AnyEvent, ClientRecord, decode_event, peek_state

log = logging.getLogger(__name__)

RENEW_S = LEASE_TTL_S / 5  # renewed several times per TTL: one slow renewal is not a loss
# Sending stops this long after the start of the last successful renewal: inside the TTL, so
# the lease cannot have passed to another driver while this one still sends.
_SEND_WITHIN_S = LEASE_TTL_S * 0.8
# The outbox's client list at lead start; unanswered, assume the worst and learn it in the
# background. Well inside the lease's life: the lease is renewed only once this returns.
_OUTBOX_READ_S = RENEW_S
_PULL_WAIT_S = 1.0
_KEEPALIVE_PART = 3  # held callbacks stay ours behind a slow endpoint: ack wait / this


class Rebalance(LeaseLost):
    """This driver holds more than its share of partitions: hand this one over."""


@dataclass
class Holdings:
    """What this driver holds, and its fair share: partitions / live drivers, rounded up.
    A driver at its share takes no free partition, so another one can; one above it hands
    over the partition it took last (a takeover goes back once its driver returns)."""

    partitions: int
    members: int = 1  # live drivers, counted from their member keys
    held: dict[int, float] = field(default_factory=dict)  # partition → when taken (loop time)

    def share(self) -> int:
        return -(-self.partitions // max(1, self.members))

    def may_take(self) -> bool:
        return len(self.held) < self.share()

    def must_hand_over(self, partition: int) -> bool:
        if len(self.held) <= self.share():
            return False
        return partition == max(self.held, key=lambda p: (self.held[p], p))


@dataclass(frozen=True)
class Shared:
    """What every partition of one driver's notifier uses."""

    js: JetStreamContext
    store: Store
    outbox: Outbox
    transports: Transports
    clients: Callable[[str], ClientRecord | None]
    leases: Leases
    metrics: DriverMetrics
    delivered: DeliveredFence  # survives this holder (KV)
    latest: LatestStates
    holdings: Holdings
    concurrency: int  # callback requests in flight per client (each in order per task)
    ack_wait_s: float  # the partition consumers' ack wait (`Limits.notify_ack_wait_s`)


class Partition:
    def __init__(self, index: int, shared: Shared) -> None:
        self.index = index
        self._s = shared
        self._lease = names.notifier_lease(index)
        self._consumer = names.notify_consumer(index)
        self.leading = False
        self._revision = 0
        self._send_until = 0.0  # loop time after which this holder sends nothing more
        self._lanes: Lanes | None = None

    async def run(self) -> None:
        s = self._s
        loop = asyncio.get_running_loop()
        while True:
            revision = None
            if s.holdings.may_take():
                revision = await s.leases.acquire(self._lease)
            if revision is None:
                await asyncio.sleep(RENEW_S)
                continue
            log.info(
                "this driver now sends the callbacks of partition %d (%s)",
                self.index,
                s.leases.owner,
            )
            s.holdings.held[self.index] = loop.time()
            self.leading = True
            self._revision = revision
            self._send_until = loop.time() + _SEND_WITHIN_S
            # Events an earlier holder took and never settled (it was killed or frozen) come
            # back within an ack wait: until then every state sent is fenced, not only the ones
            # whose older state is unacked here (mesh/driver/fence.py). Not otherwise: a fence
            # write per callback would slow every driver's first minute.
            fence_all_until = 0.0
            if await self._earlier_holder_may_hold():
                fence_all_until = loop.time() + s.ack_wait_s + LEASE_TTL_S
            self._lanes = Lanes(
                s.store,
                s.outbox,
                s.transports,
                s.clients,
                s.metrics,
                s.delivered,
                check_lease=self._check_lease,
                term=self._term,
                name=str(self.index),
                concurrency=s.concurrency,
                fence_all_until=fence_all_until,
            )
            try:
                await self._lead(self._lanes)
            except Rebalance:
                log.info("handing partition %d over: more than this driver's share", self.index)
            except LeaseLost:
                log.warning(
                    "notifier lease of partition %d lost; another driver sends its callbacks",
                    self.index,
                )
            finally:
                self.leading = False
                s.holdings.held.pop(self.index, None)
                await self._hand_back(await self._lanes.stop())
                await s.leases.release(self._lease, self._revision)
            await asyncio.sleep(RENEW_S)  # let another driver take it first

    async def _lead(self, lanes: Lanes) -> None:
        # The term is recorded before anything is sent: from then on the database refuses an
        # earlier holder's outbox writes, and the outbox read after it sees those already in.
        # Bounded: a database outage must not keep the non-sensitive callbacks from flowing.
        try:
            async with asyncio.timeout(_OUTBOX_READ_S):
                pending = await self._s.outbox.begin_term(self._term(), self._s.leases.owner)
        except Exception as exc:
            log.warning(
                "cannot read the callback outbox nor record this term in the database (%s): "
                "every client waits behind it",
                exc,
            )
            lanes.outbox_unknown = True
            learn: asyncio.Task[None] | None = asyncio.create_task(
                self._learn_outbox(lanes), name=f"notify:{self.index}:outbox-state"
            )
        else:
            learn = None
            for client in pending:
                lanes.mark_outboxed(client)
        consume = asyncio.create_task(self._consume(lanes), name=f"notify:{self.index}:consume")
        loop = asyncio.get_running_loop()
        kept_alive = loop.time()
        touching: tuple[list[int], float] | None = None  # keep-alives sent, not yet confirmed
        try:
            while not consume.done():
                await asyncio.wait({consume}, timeout=RENEW_S)
                if consume.done():
                    break
                asked_at = loop.time()
                if lanes.lease_doubt:
                    raise LeaseLost
                if self._s.holdings.must_hand_over(self.index):
                    raise Rebalance
                renewed = await self._s.leases.renew(self._lease, self._revision)
                if renewed is None:
                    raise LeaseLost
                self._revision = renewed  # released with this one when leading ends
                self._send_until = asked_at + _SEND_WITHIN_S
                if touching is not None:
                    # The renewal went out on the same connection after the keep-alives and
                    # was answered: the server has them, and their ack waits restarted.
                    lanes.touched(*touching)
                    touching = None
                if loop.time() - kept_alive > self._s.ack_wait_s / _KEEPALIVE_PART:
                    # A lane stuck behind a slow endpoint or a database outage must not
                    # have its events redelivered (and sent twice, out of order).
                    kept_alive = loop.time()
                    touching = (list(lanes.held), kept_alive)
                    await settle_quietly(list(lanes.held.values()), "in_progress")
            consume.result()
        finally:
            consume.cancel()
            if learn is not None:
                learn.cancel()
            await asyncio.gather(consume, *([learn] if learn else []), return_exceptions=True)

    async def _learn_outbox(self, lanes: Lanes) -> None:
        """Once the database answers, lanes made meanwhile recheck their own outbox (they
        started behind it) and new ones start from what it holds."""
        outbox, owner = self._s.outbox, self._s.leases.owner
        pending = await until_done(
            lambda: outbox.begin_term(self._term(), owner), what="begin the notifier term"
        )
        for client in pending:
            lanes.mark_outboxed(client)
        lanes.outbox_unknown = False
        log.info("callback outbox read: %d clients have callbacks waiting", len(pending))

    async def _consume(self, lanes: Lanes) -> None:
        js = self._s.js
        sub = await js.pull_subscribe_bind(self._consumer, stream=names.EVENTS_STREAM)
        try:
            while True:
                # A holder past its deadline takes nothing more (what it took now would wait out
                # the ack wait before the next holder could send it), and no pull outlives the
                # deadline: a next holder finds whatever this one took already unacked.
                self._check_lease()
                asked = asyncio.get_running_loop().time()  # no delivery of this pull before it
                wait = min(_PULL_WAIT_S, self._send_until - asked)
                msgs = await pull(sub, 500, wait=max(wait, 0.001))
                if msgs:
                    await self._handle(lanes, msgs, asked)
        finally:
            await sub.unsubscribe()

    async def _handle(self, lanes: Lanes, msgs: list[Msg], asked: float) -> None:
        s = self._s
        # To call back, in order, each with its sensitive transition (written by its lane
        # before the callback goes out, so one client's wait for the database is its own).
        events: list[tuple[FlatEvent, Msg, TaskRow | None]] = []
        done: list[Msg] = []
        decoded: list[tuple[AnyEvent, FlatEvent | None, Msg, TaskRow | None]] = []
        for msg in msgs:
            if peek_state(msg.data) == "queued":
                # Never called back (its PubAck was the acceptance): half of a flood's events,
                # not worth decoding. A bad one is the projector's to set aside.
                done.append(msg)
                continue
            try:
                event = decode_event(msg.data)
                names.check_event_subject(msg.subject, event.client)
                wanted = wants_callback(event, s.clients(event.client))
                flat = flatten(event) if wanted else None
                # Sensitive rows are built here, where a bad one can still be refused.
                row = row_from_flat(flat) if flat is not None and event.sensitive else None
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                # Set aside once with its reason (the projector may have done so already:
                # same origin, stored once), so it cannot stop the callbacks behind it.
                log.warning("undecodable event on %s: %s", msg.subject, exc)
                await set_aside(
                    s.js,
                    msg,
                    stage="notify",
                    reason=f"undecodable event: {exc}",
                    client=names.client_of_event_subject(msg.subject),
                    count=count_dead_letter(s.metrics),
                )
                continue
            decoded.append((event, flat, msg, row))
        # A redelivered event may have been called back by an earlier holder, after which a
        # newer state of its task went out too: the shared fence says.
        sent = await s.delivered.already_sent(
            [e for e, f, m, _ in decoded if f is not None and delivery.delivered(m) > 1]
        )
        for event, flat, msg, row in decoded:
            if flat is not None and event.event_id not in sent and not s.latest.stale(event):
                events.append((flat, msg, row))
            else:
                done.append(msg)  # a stale sensitive row is the projector's to write
        for flat, msg, row in events:
            lanes.put(flat.client, (callback_from_flat(flat), msg, row), asked)
        await ack_all(done)

    async def _earlier_holder_may_hold(self) -> bool:
        """Whether events of this partition are delivered and not acked (an earlier holder
        took them, or handed them back and they wait to be delivered again). Unknown: yes."""
        try:
            async with asyncio.timeout(RENEW_S / 2):
                info = await self._s.js.consumer_info(names.EVENTS_STREAM, self._consumer)
        except Exception as exc:
            log.warning("partition %d: cannot read its consumer (%s)", self.index, exc)
            return True
        return (info.num_ack_pending or 0) > 0

    async def _hand_back(self, unsent: list[Held]) -> None:
        """What this term held and did not hand off: back to JetStream at once (nak) if the
        lease is still ours; else only what is surely still ours (see the module's docstring),
        the rest left to the ack wait."""
        if not unsent:
            return
        if await self._still_ours():
            try:
                self._check_lease()
            except LeaseLost:
                pass
            else:
                await settle_quietly([m for m, _ in unsent], "nak")
                return
        # Its ack wait started no later than `since` (the pull was asked for then, or a
        # keep-alive the server confirmed): before that wait ends, the server has not
        # delivered it again. The margin covers the nak's own way to the server.
        now = asyncio.get_running_loop().time()
        margin = max(1.0, 0.1 * self._s.ack_wait_s)
        ours = [m for m, since in unsent if since + self._s.ack_wait_s - margin > now]
        if ours:
            await settle_quietly(ours, "nak")
            self._s.metrics.callbacks.labels(result="handed_back").inc(len(ours))
        left = len(unsent) - len(ours)
        self._s.metrics.callbacks.labels(result="left_to_ack_wait").inc(left)
        log.warning(
            "partition %d: this driver's lease passed while it held %d events not called back: "
            "%d handed back at once (their ack wait still ran), %d left to the ack wait (%gs): "
            "the next holder may have them already",
            self.index,
            len(unsent),
            len(ours),
            left,
            self._s.ack_wait_s,
        )

    async def _still_ours(self) -> bool:
        """Whether the lease is still this holder's: renewed now, within a bounded wait."""
        asked_at = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(RENEW_S):
                renewed = await self._s.leases.renew(self._lease, self._revision)
        except Exception as exc:  # unanswered: cannot tell, so it is not ours to hand back
            log.warning("partition %d: cannot renew its lease to hand back (%s)", self.index, exc)
            return False
        if renewed is None:
            return False
        self._revision = renewed  # released with this one
        self._send_until = asked_at + _SEND_WITHIN_S
        return True

    def _term(self) -> Term:
        return Term(self.index, self._revision)

    def _check_lease(self) -> None:
        """Before every request: a holder that may have lost its lease (frozen, starved past
        the deadline) sends nothing more; what it holds goes back to JetStream."""
        if asyncio.get_running_loop().time() > self._send_until:
            raise LeaseLost(f"the lease of notifier partition {self.index} may have passed")
