"""Short leases in a JetStream KV bucket: "only one driver does this right now".

A lease is a key created only if absent (optimistic concurrency on the key's revision); its
holder renews it, and the bucket's TTL frees it if the holder dies. This is the only
coordination drivers have, and it lives in JetStream, not between the drivers.
"""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, kv: KeyValue, owner: str) -> None:
        self._kv = kv
        self.owner = owner

    async def acquire(self, key: str) -> int | None:
        """The lease's revision if we now hold it, else None (someone else does)."""
        try:
            return int(await self._kv.create(key, self.owner.encode()))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def renew(self, key: str, revision: int) -> int | None:
        """The new revision, or None if the lease expired or another holder took it."""
        try:
            return int(await self._kv.update(key, self.owner.encode(), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def announce(self, key: str) -> None:
        """Keep a key of this owner's alive (no exclusivity: "I am here" for the TTL)."""
        await self._kv.put(key, self.owner.encode())

    async def count(self, pattern: str) -> int:
        """How many live keys match `pattern` (a key with wildcards): who else is around."""
        watcher = await self._kv.watch(pattern, ignore_deletes=True, meta_only=True)
        live = 0
        try:
            async for entry in watcher:
                if entry is None:  # the current values are all seen
                    break
                live += 1
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return live

    async def release(self, key: str, revision: int) -> None:
        try:
            await self._kv.delete(key, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # already expired and possibly taken: nothing of ours to release
        except Exception as exc:
            # The TTL frees it anyway; releasing early is only a courtesy.
            log.debug("release of lease %s failed: %s", key, exc)
