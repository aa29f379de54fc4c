"""What the route and dispatch steps share: serving many per-client consumers in turns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate.bus.deadletters import Counter, set_aside_raw
from tidegate.bus.pull import pull
from tidegate.bus.stored import get_stored

T = TypeVar("T")

log = logging.getLogger(__name__)

# A pull on a consumer that no longer exists (deleted by its inactive threshold or by an
# operator) is answered "no responders" (503) at once, or "consumer not found" (404/10014).
CONSUMER_GONE = (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError)


def rotate(items: list[T], turn: int) -> list[T]:
    """`items` starting at a different place each turn, so no one is always served first."""
    if not items:
        return items
    start = turn % len(items)
    return items[start:] + items[:start]


class BoundSubscriptions:
    """Pull subscriptions to durable consumers that are created on first use and kept.

    A consumer the server deleted is made again and bound anew on the pull that finds it
    gone. With `max_idle_s`, a subscription unused that long is forgotten (and made again,
    idempotently, on its next use): set it under the consumer's inactive threshold, so that
    no cached subscription outlives its consumer.
    """

    def __init__(
        self, js: JetStreamContext, stream: str, *, max_idle_s: float | None = None
    ) -> None:
        self._js = js
        self._stream = stream
        self._max_idle_s = max_idle_s
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}
        self._used: dict[str, float] = {}

    async def get(
        self, key: str, ensure: Callable[[], Awaitable[str]]
    ) -> JetStreamContext.PullSubscription:
        now = asyncio.get_running_loop().time()
        await self._forget_idle(now)
        sub = self._subs.get(key)
        if sub is None:
            durable = await ensure()
            sub = await self._js.pull_subscribe_bind(durable, stream=self._stream)
            self._subs[key] = sub
        self._used[key] = now
        return sub

    async def pull(
        self, key: str, ensure: Callable[[], Awaitable[str]], batch: int, wait: float
    ) -> list[Msg]:
        """`pull` from the consumer of `key`; if it vanished, make it again and pull once more."""
        sub = await self.get(key, ensure)
        try:
            return await pull(sub, batch, wait)
        except CONSUMER_GONE as exc:
            log.warning(
                "consumer for %s on %s is gone (%r): making it again", key, self._stream, exc
            )
            await self.forget(key)
            sub = await self.get(key, ensure)
            return await pull(sub, batch, wait)

    async def forget(self, key: str) -> None:
        sub = self._subs.pop(key, None)
        self._used.pop(key, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to undo
                log.debug("unsubscribe of %s failed: %s", key, exc)

    async def _forget_idle(self, now: float) -> None:
        if self._max_idle_s is None:
            return
        idle = [k for k, at in self._used.items() if now - at > self._max_idle_s]
        for key in idle:
            await self.forget(key)

    async def close(self) -> None:
        for sub in self._subs.values():
            await sub.unsubscribe()
        self._subs.clear()
        self._used.clear()


class Strays:
    """Sets aside messages on subjects no consumer may hold: a stray publish to a subject
    this version does not write (`tg.submit.a.b`, a wildcard token, a token no name can be).
    They are read and deleted by sequence; a dead letter's id is its origin, so two drivers
    doing this at once store each message once."""

    def __init__(self, js: JetStreamContext, stream: str, *, count: Counter | None) -> None:
        self._js = js
        self._stream = stream
        self._count = count
        self._scan_from: dict[str, int] = {}  # subject → the next sequence to look at

    async def set_aside(
        self, subject: str, *, stage: str, reason: str, first_seq: int, limit: int
    ) -> int:
        """Set aside up to `limit` messages of `subject`; returns how many."""
        # A wildcard token is a filter too, matching other subjects' messages: the scan goes
        # on where it stopped last time, so a long backlog ahead cannot hide a stray message.
        seq = max(first_seq, self._scan_from.get(subject, 1), 1)
        done = 0
        for _ in range(limit):
            try:
                raw = await get_stored(self._js, self._stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                self._scan_from.pop(subject, None)  # none left after `seq`
                break
            if raw.seq is None:
                break
            seq = raw.seq + 1
            self._scan_from[subject] = seq
            if raw.subject != subject:
                continue
            await set_aside_raw(
                self._js,
                subject=subject,
                data=raw.data or b"",
                headers=raw.headers,
                stage=stage,
                reason=reason,
                client=None,
                origin_id=f"{self._stream}:{raw.seq}",
                stream_seq=raw.seq,
                count=self._count,
            )
            try:
                await self._js.delete_msg(self._stream, raw.seq)
            except nats.js.errors.NotFoundError:
                pass  # another driver deleted it first
            done += 1
        return done
