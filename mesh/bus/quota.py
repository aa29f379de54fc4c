"""A client's own buffer quota (`ClientRecord.buffer_max`), checked where tasks are published.

JetStream's per-subject limit (`TIDEGATE_CLIENT_BUFFER_MAX`) is one number per stream: the
hard ceiling of every client's buffers, enforced by the server on every publish. A lower quota
for one client is the registry's `buffer_max`, which JetStream cannot hold, so:

- publishers (the SDK, `tidegate submit`, the console's HTTP submit) refuse a client's tasks
  with `BufferFull` once its waiting tasks (submitted, plus routed and not dispatched) reach
  it. The backlog is read from the streams at most every `fresh_s` and what was published
  since counts against it: one submitter stays within the quota, several at once pass it by
  at most what they publish within that time;
- the router never fills a client's ready queue past it (`ready_room`): the backstop for
  tasks published without this check, which then wait in the submission stream (at most the
  ceiling of them) and run in turn. Nothing accepted is dropped.

When the quota cannot be read (no clients bucket yet, NATS slow) nothing is refused by it:
the ceiling still holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.clients import decode_client

log = logging.getLogger(__name__)

FRESH_S = 0.5  # a backlog read is used this long (plus what was published since)
READ_TIMEOUT_S = 2.0  # a read slower than this counts as unknown: nothing refused by it


def effective_quota(buffer_max: int | None, ceiling: int) -> int | None:
    """The quota a client's own setting gives (None: it has none, the ceiling alone holds).

    Never above the stream-wide ceiling (`ceiling` <= 0: the stream has none)."""
    if buffer_max is None:
        return None
    return min(buffer_max, ceiling) if ceiling > 0 else buffer_max


def ready_room(quota: int | None, ready: Iterable[int]) -> int | None:
    """How many more tasks the router may move into a client's ready queues (all pools)."""
    if quota is None:
        return None
    return max(0, quota - sum(ready))


def over_quota(client: str, *, quota: int, waiting: int) -> str:
    """`BufferFull`'s message for a client at its own quota: whose, why, and what to do."""
    return (
        f"buffer full: client {client!r} has {waiting} tasks waiting (submitted or routed, not "
        f"dispatched yet) and its quota is {quota} (buffer_max). Other clients are not "
        "affected. Resume or serve this client's backlog, or raise its quota with "
        f"`tidegate client set {client} --buffer-max N`; then resubmit the same keys"
    )


def above_ceiling(value: int, ceiling: int) -> str:
    return (
        f"buffer_max {value} is above the stream-wide ceiling of {ceiling} "
        "(TIDEGATE_CLIENT_BUFFER_MAX, the submission stream's max messages per subject): give "
        f"at most {ceiling}, or raise the ceiling first (`nats stream edit {names.TASKS_STREAM} "
        f"--max-msgs-per-subject N`, same for {names.READY_STREAM})"
    )


async def stream_ceiling(js: JetStreamContext, fallback: int) -> int:
    """The submission stream's per-subject limit as the server has it (an operator may have
    changed it there); `fallback` (the configured one) when the stream cannot be read."""
    try:
        info = await asyncio.wait_for(js.stream_info(names.TASKS_STREAM), READ_TIMEOUT_S)
    except Exception as exc:  # not created yet, or NATS slow: the configured value
        log.debug("cannot read %s's limits: %s", names.TASKS_STREAM, exc)
        return fallback
    return int(info.config.max_msgs_per_subject or 0)


async def client_backlog(js: JetStreamContext, client: str) -> tuple[int, int, int]:
    """(submitted, ready, ceiling): a client's waiting tasks in the submission stream and in
    its ready queues (all pools), and the submission stream's per-subject limit."""
    tasks, ready = await asyncio.gather(
        js.stream_info(names.TASKS_STREAM, subjects_filter=names.submit_subject(client)),
        js.stream_info(names.READY_STREAM, subjects_filter=names.client_ready_filter(client)),
    )
    submitted = sum((tasks.state.subjects or {}).values())
    routed = sum((ready.state.subjects or {}).values())
    return submitted, routed, int(tasks.config.max_msgs_per_subject or 0)


@dataclass(frozen=True, slots=True)
class Grant:
    """How many of the tasks asked for may be published (the first ones); `reason` is the
    `BufferFull` message for the rest."""

    allowed: int
    reason: str = ""
    generation: int = 0  # which backlog read it counted against (`QuotaGate.give_back`)


@dataclass(slots=True)
class _Seen:
    quota: int | None  # None: no quota of its own, or it could not be read
    waiting: int
    at: float
    generation: int
    used: int = 0  # granted since the read


class QuotaGate:
    """One per publishing process: each client's own quota against its backlog, read at most
    every `fresh_s` (one read at a time per client)."""

    def __init__(self, js: JetStreamContext, *, fresh_s: float = FRESH_S) -> None:
        self._js = js
        self._fresh_s = fresh_s
        self._kv: KeyValue | None = None
        self._seen: dict[str, _Seen] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation = 0

    async def take(self, client: str, wanted: int) -> Grant:
        """Grant up to `wanted` publishes for `client`; give back the ones that did not add a
        task (refused, unanswered, duplicates) with `give_back`."""
        seen = await self._current(client)
        if seen.quota is None:
            return Grant(allowed=wanted, generation=seen.generation)
        waiting = seen.waiting + seen.used
        allowed = max(0, min(wanted, seen.quota - waiting))
        seen.used += allowed
        reason = "" if allowed == wanted else over_quota(client, quota=seen.quota, waiting=waiting)
        return Grant(allowed=allowed, reason=reason, generation=seen.generation)

    def give_back(self, client: str, grant: Grant, count: int) -> None:
        """`count` granted publishes added no task. Ignored after a newer read (which counted
        only what was stored)."""
        seen = self._seen.get(client)
        if count > 0 and seen is not None and seen.generation == grant.generation:
            seen.used = max(0, seen.used - count)

    async def _current(self, client: str) -> _Seen:
        loop = asyncio.get_running_loop()
        seen = self._seen.get(client)
        if seen is not None and loop.time() - seen.at < self._fresh_s:
            return seen
        lock = self._locks.setdefault(client, asyncio.Lock())
        async with lock:
            seen = self._seen.get(client)
            if seen is not None and loop.time() - seen.at < self._fresh_s:
                return seen  # read by whoever held the lock
            self._generation += 1
            try:
                quota, waiting = await asyncio.wait_for(self._read(client), READ_TIMEOUT_S)
            except Exception as exc:  # unknown: refuse nothing (the ceiling still holds)
                log.warning("cannot read client %r's buffer quota (%s); not applied", client, exc)
                quota, waiting = None, 0
            seen = self._seen[client] = _Seen(quota, waiting, loop.time(), self._generation)
            return seen

    async def _read(self, client: str) -> tuple[int | None, int]:
        buffer_max = await self._buffer_max(client)
        if buffer_max is None:
            return None, 0  # the common case: one KV read, no stream reads
        submitted, routed, ceiling = await client_backlog(self._js, client)
        return effective_quota(buffer_max, ceiling), submitted + routed

    async def _buffer_max(self, client: str) -> int | None:
        try:
            if self._kv is None:
                self._kv = await self._js.key_value(names.CLIENTS_BUCKET)
            entry = await self._kv.get(client)
        except BucketNotFoundError:
            return None  # no registry yet: the router answers for the client
        except KeyNotFoundError:
            return None
        if entry.value is None:  # nats-py: an expired or deleted key
            return None
        return decode_client(entry.value).buffer_max
