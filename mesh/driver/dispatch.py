"""The dispatcher: moves ready tasks into their pool's work queue, fairly and within limits.

Validated tasks wait in a ready queue per client and pool. In rounds, every driver looks at
the per-subject totals of the ready and work streams (one request each) and gives each
waiting client a share of its pool's room, within the client's cap on running tasks and its
rate. The backlog therefore waits in JetStream, per client: a client with 20,000 tasks queued
cannot push another client's tasks behind its own, and a paused client just keeps its tasks.

Caps and rates hold across all drivers: a client's tasks in flight are counted from the work
stream itself, and a short lease makes one driver at a time dispatch a limited client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.buckets import LEASE_TTL_S
from tidegate.bus.lease import Leases
from tidegate.bus.lost import lose_unreadable
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.bus.pull import ack_all, hand_back
from tidegate.bus.topology import drop_legacy_ready_consumers, ensure_ready_consumer
from tidegate.config import DriverSettings
from tidegate.driver.rounds import BoundSubscriptions, rotate
from tidegate.metrics import DriverMetrics, count_dead_letter
from tidegate.wire import ClientRecord, Dispatched, Heartbeat, decode_work_item, encode, now

log = logging.getLogger(__name__)

_IDLE_S = 0.05  # pause between rounds that moved nothing
READY_STAGE = "ready"  # the dead-letter stage of ready messages that cannot be read


class RateState(msgspec.Struct, frozen=True):
    """A client's token bucket, shared by all drivers through the dispatch KV bucket."""

    tokens: float
    at: float


def refill(state: RateState | None, rate: float, at: float) -> float:
    """Tokens available at `at` (burst: one second's worth, at least one task)."""
    burst = max(rate, 1.0)
    if state is None:
        return burst
    return min(burst, state.tokens + rate * max(0.0, at - state.at))


def room_per_pool(
    slots: dict[str, int], work_by_pool: dict[str, int], per_slot: int, minimum: int
) -> dict[str, int]:
    """How many more tasks each pool's work queue may take (queued + running there)."""
    pools = set(slots) | set(work_by_pool)
    return {p: max(slots.get(p, 0) * per_slot, minimum) - work_by_pool.get(p, 0) for p in pools}


class Dispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: Publisher,
        leases: Leases,
        rates: KeyValue,
        clients: Callable[[str], ClientRecord | None],
        heartbeats: Callable[[], list[Heartbeat]],
        settings: DriverSettings,
        metrics: DriverMetrics,
    ) -> None:
        self._js = js
        self._publisher = publisher
        self._leases = leases
        self._rates = rates
        self._clients = clients
        self._heartbeats = heartbeats
        self._settings = settings
        self._metrics = metrics
        self._count_dead_letter = count_dead_letter(metrics)
        self._subs = BoundSubscriptions(js, names.READY_STREAM)
        self._round = 0
        self._ignored: set[str] = set()
        self._exported: set[str] = set()  # clients with a gauge: reset to 0, never left stale

    async def run(self) -> None:
        try:
            await drop_legacy_ready_consumers(self._js)
        except Exception as exc:  # best effort: each is replaced at first use anyway
            log.warning("cannot look for ready consumers of the earlier naming: %s", exc)
        try:
            while True:
                moved = await self.round()
                if not moved:
                    await asyncio.sleep(_IDLE_S)
        finally:
            await self._subs.close()

    async def _subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        info = await self._js.stream_info(stream, subjects_filter=subjects)
        return dict(info.state.subjects or {})

    async def round(self) -> int:
        """One pass over every waiting (client, pool); returns the tasks moved."""
        counts = await self._subject_counts(names.READY_STREAM, names.READY_ALL)
        ready = {s: n for s, n in counts.items() if n > 0 and names.parse_ready_subject(s)}
        for subject in counts.keys() - ready.keys():
            if counts[subject] > 0:
                self._strange(subject)
        work = await self._subject_counts(names.WORK_STREAM, names.WORK_ALL)
        work_by_pool: dict[str, int] = defaultdict(int)
        in_flight: dict[str, int] = defaultdict(int)
        for subject, n in work.items():
            parsed = names.parse_work_subject(subject)
            if parsed is None:
                self._strange(subject)
                continue
            pool, _cls, client = parsed
            work_by_pool[pool] += n
            in_flight[client] += n
        self._export(counts, in_flight)
        if not ready:
            return 0
        slots: dict[str, int] = defaultdict(int)
        for hb in self._heartbeats():
            for pool in hb.pools:
                slots[pool] += hb.slots
        room = room_per_pool(
            slots,
            work_by_pool,
            self._settings.dispatch_backlog_per_slot,
            self._settings.dispatch_min_backlog,
        )
        waiting = [p for p in map(names.parse_ready_subject, ready) if p is not None]
        self._round += 1
        waiting = rotate(waiting, self._round)
        contenders: dict[str, int] = defaultdict(int)
        for _, pool in waiting:
            contenders[pool] += 1
        moved = 0
        for client, pool in waiting:
            share = math.ceil(
                room.get(pool, self._settings.dispatch_min_backlog) / max(contenders[pool], 1)
            )
            contenders[pool] -= 1
            if share <= 0:
                continue
            n = await self._dispatch_client(client, pool, share, in_flight[client])
            room[pool] = room.get(pool, 0) - n
            in_flight[client] += n
            moved += n
        return moved

    def _strange(self, subject: str) -> None:
        """A subject this version does not write (a stray publish, an older layout)."""
        if subject not in self._ignored:
            self._ignored.add(subject)
            log.error("ignoring messages on %r: not a subject this version writes", subject)

    def _export(self, ready: dict[str, int], in_flight: dict[str, int]) -> None:
        """Per-client depth, for operators: who is waiting, and how much runs."""
        backlog: dict[str, int] = defaultdict(int)
        for subject, n in ready.items():
            parsed = names.parse_ready_subject(subject)
            if parsed is not None:
                backlog[parsed[0]] += n
        for client in set(backlog) | self._exported:
            self._metrics.backlog.labels(client=client).set(backlog.get(client, 0))
        for client in set(in_flight) | self._exported:
            self._metrics.in_flight.labels(client=client).set(in_flight.get(client, 0))
        self._exported |= set(backlog) | set(in_flight)

    async def _dispatch_client(self, client: str, pool: str, share: int, in_flight: int) -> int:
        record = self._clients(client)
        if record is None or record.paused:
            return 0
        limited = record.max_running is not None or record.max_submit_per_s is not None
        if not limited:
            return await self._move(client, pool, min(share, self._settings.dispatch_quantum))
        lease_key = names.dispatch_lease(client)
        revision = await self._leases.acquire(lease_key)
        if revision is None:
            return 0  # another driver is dispatching this client right now
        try:
            allowed = min(share, self._settings.dispatch_quantum)
            if record.max_running is not None:
                # Count again under the lease: the round's totals may predate another
                # driver's dispatch of this client.
                fresh = await self._subject_counts(
                    names.WORK_STREAM, names.client_work_filter(client)
                )
                allowed = min(allowed, record.max_running - sum(fresh.values()))
            state: RateState | None = None
            at = time.time()
            if record.max_submit_per_s is not None:
                state = await self._rate_state(client)
                allowed = min(allowed, int(refill(state, record.max_submit_per_s, at)))
            if allowed <= 0:
                return 0
            # Finish well inside the lease: past its TTL another driver may take it, and two
            # drivers dispatching one client at once could exceed its cap.
            n = await self._move(client, pool, allowed, within_s=LEASE_TTL_S / 2)
            if record.max_submit_per_s is not None:
                tokens = refill(state, record.max_submit_per_s, at) - n
                await self._rates.put(client, msgspec.json.encode(RateState(tokens, at)))
            return n
        finally:
            await self._leases.release(lease_key, revision)

    async def _rate_state(self, client: str) -> RateState | None:
        try:
            entry = await self._rates.get(client)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return msgspec.json.decode(entry.value, type=RateState)
        except msgspec.DecodeError:
            return None

    async def _move(
        self, client: str, pool: str, count: int, *, within_s: float | None = None
    ) -> int:
        """Fetch up to `count` of the client's ready tasks and hand them to the pool."""
        try:
            msgs = await self._subs.pull(
                names.ready_consumer(client, pool),
                lambda: ensure_ready_consumer(self._js, client, pool),
                count,
                wait=0.05,
            )
        except (nats.errors.TimeoutError, TimeoutError):
            return 0  # another driver took them first
        record = self._clients(client)
        sensitive = bool(record and record.sensitive)
        batch: list[Outgoing] = []
        bad: list[Msg] = []
        for msg in msgs:
            try:
                batch.extend(self._outgoing(msg, sensitive))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # Only the route step writes here; a message it cannot read never runs: its
                # task (named by the message id) is lost, the message set aside.
                await lose_unreadable(
                    self._js,
                    self._publisher,
                    msg,
                    stage=READY_STAGE,
                    client=client,
                    reason=f"undecodable ready message on {msg.subject}: {exc}",
                    attempt=0,
                    sensitive=sensitive,
                    count=self._count_dead_letter,
                )
                bad.append(msg)
        if bad:
            msgs = [m for m in msgs if all(m is not b for b in bad)]
        try:
            results = await asyncio.wait_for(self._publisher.publish_many(batch), within_s)
        except TimeoutError:
            # Some may be in the work queue already: handed back, they are republished
            # later under the same ids, which the work stream drops as duplicates.
            results = [TimeoutError(f"dispatch took over {within_s}s")]
        failed = any(not isinstance(r, PubAck) for r in results)
        if failed:
            # Keep it simple and safe: hand the whole fetch back; dedup ids make the
            # republish of those that did get through harmless.
            await hand_back(msgs)
            self._metrics.handoff_failures.inc()
            return 0
        await ack_all(msgs)
        self._metrics.dispatched.labels(pool=pool).inc(len(msgs))
        return len(msgs)

    def _outgoing(self, msg: Msg, sensitive: bool) -> list[Outgoing]:
        item = decode_work_item(msg.data)
        if item.sensitive != sensitive:
            item = msgspec.structs.replace(item, sensitive=sensitive)
        work = Outgoing(
            subject=names.work_subject(item.pool, item.task_class, item.client),
            payload=encode(item),
            msg_id=names.run_msg_id(item.task_id, item.run),
        )
        if not sensitive:
            return [work]
        event = Dispatched(
            task_id=item.task_id,
            client=item.client,
            key=item.spec.key,
            attempt=0,
            at=now(),
            submitted_at=item.submitted_at,
            pool=item.pool,
            sensitive=True,
            run=item.run,
        )
        # The event first: sent after the work item, it could wait for the publisher's window
        # while an executor took the item and reported `running`, and the notifier would then
        # drop `dispatched` as stale (a sensitive client hears of every transition). Sent
        # first on the same connection, it reaches the server before the work item does.
        dispatched = Outgoing(
            subject=names.event_subject(item.client), payload=encode(event), msg_id=event.event_id
        )
        return [dispatched, work]
