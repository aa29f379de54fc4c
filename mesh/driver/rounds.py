"""What the route and dispatch steps share: serving many per-client consumers in turns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js import JetStreamContext

T = TypeVar("T")


def rotate(items: list[T], turn: int) -> list[T]:
    """`items` starting at a different place each turn, so no one is always served first."""
    if not items:
        return items
    start = turn % len(items)
    return items[start:] + items[:start]


class BoundSubscriptions:
    """Pull subscriptions to durable consumers that are created on first use and kept."""

    def __init__(self, js: JetStreamContext, stream: str) -> None:
        self._js = js
        self._stream = stream
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}

    async def get(
        self, key: str, ensure: Callable[[], Awaitable[str]]
    ) -> JetStreamContext.PullSubscription:
        sub = self._subs.get(key)
        if sub is None:
            durable = await ensure()
            sub = await self._js.pull_subscribe_bind(durable, stream=self._stream)
            self._subs[key] = sub
        return sub

    async def close(self) -> None:
        for sub in self._subs.values():
            await sub.unsubscribe()
        self._subs.clear()
