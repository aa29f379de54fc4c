"""The gauges the alert rules watch, sampled from JetStream and the heartbeats.

Every driver samples them (no lease: a few small requests every `EVERY_S`, and a driver that is
the only one left must still be watched); the alert rules take the max over the drivers.
A backlog waiting for its client (paused, capped, unserved) shows as the age of that client's
oldest task not yet dispatched; a pool whose queue fills while no executor serves it, as
waiting tasks beside no live executor; the projector falling behind, as the age of the oldest
event it has not written. Counting per subject costs one request per stream, and the age of a
client's oldest task one more per client that has any waiting: idle clients cost nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.stored import get_stored
from tidegate.metrics import DriverMetrics
from tidegate.wire import Heartbeat

log = logging.getLogger(__name__)

EVERY_S = 15.0  # a scrape every 15-60 s is usual: fresher samples would only cost requests
STREAMS = (
    names.TASKS_STREAM,
    names.READY_STREAM,
    names.WORK_STREAM,
    names.EVENTS_STREAM,
    names.DEAD_STREAM,
    names.STATS_STREAM,
)


class Gauges:
    def __init__(
        self,
        js: JetStreamContext,
        heartbeats: Callable[[], list[Heartbeat]],
        metrics: DriverMetrics,
        *,
        every_s: float = EVERY_S,
    ) -> None:
        self._js = js
        self._heartbeats = heartbeats
        self._m = metrics
        self._every_s = every_s
        self._clients: set[str] = set()  # labelled once: shown as 0 when nothing waits
        self._pools: set[str] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("alert gauges not sampled: %s", exc)
            await asyncio.sleep(self._every_s)

    async def sample(self) -> None:
        await self._streams()
        await self._projection()
        ready_by_pool = await self._waiting()
        await self._pools_served(ready_by_pool)

    async def _streams(self) -> None:
        for stream in STREAMS:
            try:
                info = await self._js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                continue
            self._m.stream_bytes.labels(stream=stream).set(info.state.bytes)
            self._m.stream_messages.labels(stream=stream).set(info.state.messages)
            max_bytes = info.config.max_bytes
            self._m.stream_max_bytes.labels(stream=stream).set(
                -1 if max_bytes is None else max_bytes
            )

    async def _projection(self) -> None:
        info = await self._js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
        self._m.projection_pending.set(pending)
        lag = 0.0
        if pending and info.ack_floor is not None:
            # Everything up to the ack floor is projected: the next event is the oldest not.
            oldest = await self._oldest(
                names.EVENTS_STREAM, names.EVENT_ALL, after=info.ack_floor.stream_seq
            )
            lag = _age(oldest)
        self._m.projection_lag.set(lag)

    async def _waiting(self) -> Counter[str]:
        """The age of each client's oldest task not yet dispatched; ready tasks per pool."""
        oldest: dict[str, datetime] = {}
        ready_by_pool: Counter[str] = Counter()
        submitted = await self._subjects(names.TASKS_STREAM, names.SUBMIT_ALL)
        for subject in submitted:
            client = names.client_of_submit_subject(subject)
            at = await self._oldest(names.TASKS_STREAM, subject)
            if at is not None:
                oldest[client] = min(at, oldest.get(client, at))
        ready = await self._subjects(names.READY_STREAM, names.READY_ALL)
        for subject, count in ready.items():
            parsed = names.parse_ready_subject(subject)
            if parsed is None:
                continue
            client, pool = parsed
            ready_by_pool[pool] += count
            at = await self._oldest(names.READY_STREAM, subject)
            if at is not None:
                oldest[client] = min(at, oldest.get(client, at))
        self._clients |= oldest.keys()
        for client in self._clients:
            self._m.oldest_waiting.labels(client=client).set(_age(oldest.get(client)))
        return ready_by_pool

    async def _pools_served(self, ready_by_pool: Counter[str]) -> None:
        waiting = Counter(ready_by_pool)
        for info in await self._js.consumers_info(names.WORK_STREAM):
            parsed = names.parse_work_subject(info.config.filter_subject or "")
            if parsed is not None:
                waiting[parsed[0]] += info.num_pending or 0
        live: Counter[str] = Counter()
        for beat in self._heartbeats():
            if not (beat.cordoned or beat.draining):
                for pool in beat.pools:
                    live[pool] += 1
        self._pools |= waiting.keys() | live.keys()
        for pool in self._pools:
            self._m.pool_waiting.labels(pool=pool).set(waiting[pool])
            self._m.pool_live_executors.labels(pool=pool).set(live[pool])

    async def _subjects(self, stream: str, pattern: str) -> dict[str, int]:
        info = await self._js.stream_info(stream, subjects_filter=pattern)
        return dict(info.state.subjects or {})

    async def _oldest(self, stream: str, subject: str, *, after: int = 0) -> datetime | None:
        try:
            msg = await get_stored(self._js, stream, seq=after + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None  # taken meanwhile
        return msg.time


def _age(at: datetime | None) -> float:
    if at is None:
        return 0.0
    return max(0.0, (datetime.now(UTC) - at).total_seconds())
