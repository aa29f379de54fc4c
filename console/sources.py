"""The console's reads of JetStream: stream and consumer figures, KV buckets, stats samples.

Each read is one bounded call for the page; `bounded` turns a failure or a timeout into a
line of "what is missing" instead of an exception, so a page renders while a server is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from tidegate import names
from tidegate.bus.topology import STATS_MAX_AGE_S
from tidegate.wire import DriverStats, decode_driver_stats

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_TIMEOUT_S = 2.0  # every read of a page; an outage shows as "unknown", not a hang
STATS_BATCH = 1000  # samples fetched per request when catching up with the stats stream
_DELETE_OPS = frozenset({"DEL", "PURGE"})


async def bounded(
    read: Awaitable[T], what: str, missing: list[str], timeout: float = READ_TIMEOUT_S
) -> T | None:
    """The read's result, or None with the reason added to `missing`."""
    try:
        return await asyncio.wait_for(read, timeout)
    except TimeoutError:
        missing.append(f"{what}: no answer within {timeout:g}s")
    except Exception as exc:
        missing.append(f"{what}: {str(exc) or type(exc).__name__}")
    return None


async def subject_totals(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    info = await js.stream_info(stream, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def kv_values(
    js: JetStreamContext, bucket: str, decode: Callable[[bytes], T]
) -> dict[str, T]:
    """The current value of every key of a bucket (undecodable ones skipped)."""
    kv = await js.key_value(bucket)
    # A short inactivity threshold: a page polled every few seconds must not leave a
    # consumer behind per poll for the default five minutes.
    watcher = await kv.watchall(inactive_threshold=5.0)
    values: dict[str, T] = {}
    try:
        while True:
            entry = await watcher.updates(READ_TIMEOUT_S)  # type: ignore[no-untyped-call]
            if entry is None:  # the initial values are all in
                break
            if entry.operation in _DELETE_OPS or not entry.value:
                values.pop(entry.key, None)
                continue
            try:
                values[entry.key] = decode(entry.value)
            except Exception as exc:
                log.debug("%s: skipping undecodable %r: %s", bucket, entry.key, exc)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return values


class StatsHistory:
    """The stats stream's samples, kept between polls: a poll reads only what was added.

    One per console process. The stream is the history (every console sees the same and a
    restarted one reads it again); this is only a cache of it.
    """

    def __init__(self, span_s: float = STATS_MAX_AGE_S) -> None:
        self.span_s = span_s
        self.samples: list[DriverStats] = []
        self.last_seq = 0
        self._lock = asyncio.Lock()  # two polls at once must not read the same range twice

    async def refresh(self, js: JetStreamContext, *, now: float) -> list[DriverStats]:
        async with self._lock:
            try:
                state = (await js.stream_info(names.STATS_STREAM)).state
            except NotFoundError:
                self.samples, self.last_seq = [], 0
                return []
            if state.last_seq < self.last_seq:  # the stream was made anew: start over
                self.samples, self.last_seq = [], 0
            start = max(self.last_seq + 1, state.first_seq)
            if state.messages and start <= state.last_seq:
                await self._read(js, start)
            cutoff = now - self.span_s
            self.samples = [s for s in self.samples if s.at.timestamp() >= cutoff]
            return list(self.samples)

    async def _read(self, js: JetStreamContext, start: int) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=5.0,  # the server drops it soon after the last fetch
        )
        sub = await js.pull_subscribe(names.STATS_ALL, stream=names.STATS_STREAM, config=config)
        try:
            while True:
                msgs = await sub.fetch(STATS_BATCH, timeout=READ_TIMEOUT_S)
                for msg in msgs:
                    # Recorded per message: a read cut short by the page's deadline resumes
                    # where it stopped on the next poll.
                    self.last_seq = max(self.last_seq, msg.metadata.sequence.stream)
                    try:
                        self.samples.append(decode_driver_stats(msg.data))
                    except Exception as exc:
                        log.debug("skipping undecodable stats sample: %s", exc)
                if msgs[-1].metadata.num_pending == 0:
                    return
        finally:
            await sub.unsubscribe()
