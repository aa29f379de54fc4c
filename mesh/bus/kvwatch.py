"""Mirror a KV bucket into memory: the one way drivers and executors follow a bucket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

T = TypeVar("T")

# Told of an entry that does not decode: (key, raw value, revision, the error).
OnUndecodable = Callable[[str, bytes, int, Exception], Awaitable[None]]

_DELETE_OPS = {"DEL", "PURGE"}


class KvMirror(Generic[T]):
    """The latest decoded value of every key; `ready` is set once the initial values are in.

    Values that fail to decode are logged and skipped: a bad entry written by hand must not
    stop a component.
    """

    def __init__(
        self,
        kv: KeyValue,
        decode: Callable[[bytes], T],
        *,
        name: str,
        on_change: Callable[[str, T | None], None] | None = None,
        on_undecodable: OnUndecodable | None = None,
    ) -> None:
        self._kv = kv
        self._decode = decode
        self.name = name
        self._on_change = on_change
        self._on_undecodable = on_undecodable
        self.values: dict[str, T] = {}
        self.ready = asyncio.Event()
        self.updated_at: dict[str, float] = {}

    def get(self, key: str) -> T | None:
        return self.values.get(key)

    async def run(self) -> None:
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    self.ready.set()
                    continue
                if entry.operation in _DELETE_OPS or not entry.value:
                    self.values.pop(entry.key, None)
                    self.updated_at.pop(entry.key, None)
                    if self._on_change:
                        self._on_change(entry.key, None)
                    continue
                try:
                    value = self._decode(entry.value)
                except Exception as exc:
                    log.warning("%s: skipping undecodable entry %r: %s", self.name, entry.key, exc)
                    await self._undecodable(entry.key, entry.value, entry.revision or 0, exc)
                    continue
                self.values[entry.key] = value
                self.updated_at[entry.key] = asyncio.get_running_loop().time()
                if self._on_change:
                    self._on_change(entry.key, value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def _undecodable(self, key: str, value: bytes, revision: int, exc: Exception) -> None:
        if self._on_undecodable is None:
            return
        try:
            await self._on_undecodable(key, value, revision, exc)
        except Exception as hook_exc:  # never stop the watch for it
            log.warning("%s: reporting undecodable %r failed: %s", self.name, key, hook_exc)
