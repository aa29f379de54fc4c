"""The notifier's fence that survives its holder: per task, the newest state called back while
an older state of the same task may still be unacked somewhere.

Why only those: a state whose message was acked is never delivered again, so it can never come
back after a newer one. The dangers are unacked older states:

- a holder called back a task's `succeeded` while its `running` was still unacked (both in one
  batch), then stopped (killed, frozen past its lease): both messages go to the next holder,
  which would call back `running` after `succeeded`;
- a holder took `running` and was frozen; the next holder got `succeeded` (never delivered
  before), called it back and acked it; `running` comes back at the ack wait, perhaps to a
  third holder (or the first, thawed, once it has the partition again) that never saw
  `succeeded`. So in the first ack wait of a term that began with events unacked (an earlier
  holder's, which can still come back) every state handed off is recorded, not only the first
  kind.

The outbox's retry job (mesh/driver/callbacks/retry.py) is the other way a state can go out
again: it records every callback it delivers, under keys of its own (`OUTBOX_SCOPE`: the
notifier's marks count what it queued in the outbox as handed off, not delivered), and drops a
row whose state is not newer than what it delivered before.

The holder records such a task here *before* acking; the next holder checks redelivered messages
against it and drops what is not newer. A mark only ever rises (compare and set on the key's
revision): a holder that was frozen and wakes up to record what it sent before must not lower
what its successor recorded since. A KV bucket (NATS, not the database), so the check
works while PostgreSQL is down; keys age out after a day (`NOTIFY_FENCE_TTL_S`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.wire import STATE_RANK

log = logging.getLogger(__name__)

Mark = tuple[int, int, int]  # (run, attempt, state rank): greater is newer


class State(Protocol):
    """What the fence reads of an event or a callback."""

    @property
    def event_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def run(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def state(self) -> str: ...


def newest_marks(states: Iterable[State]) -> dict[str, Mark]:
    """Task id → the newest mark among `states`."""
    marks: dict[str, Mark] = {}
    for s in states:
        mark = mark_of(s.run, s.attempt, s.state)
        marks[s.task_id] = max(marks.get(s.task_id, mark), mark)
    return marks


_CAS_TRIES = 5  # two holders at most race on one task's key
OUTBOX_SCOPE = "outbox."  # the retry job's deliveries (mesh/driver/callbacks/retry.py)


def mark_of(run: int, attempt: int, state: str) -> Mark:
    return (run, attempt, STATE_RANK[state])


def _encode(mark: Mark) -> bytes:
    return " ".join(str(n) for n in mark).encode()


def _decode(data: bytes | None) -> Mark | None:
    try:
        run, attempt, rank = (int(p) for p in (data or b"").split())
    except ValueError:
        return None
    return (run, attempt, rank)


class DeliveredFence:
    def __init__(self, kv: KeyValue | None, *, scope: str = "") -> None:
        self._kv = kv  # None: no shared fence (tests of the notifier alone)
        # Keys of another meaning in the same bucket: `OUTBOX_SCOPE`, what the retry job
        # delivered (the notifier's own marks also count what it queued in the outbox).
        self._scope = scope

    async def already_sent(self, events: Sequence[State]) -> set[str]:
        """Event ids of `events` (redelivered ones) that are not newer than what was called
        back for their task. Unreadable: nothing is dropped (a duplicate beats a loss)."""
        if self._kv is None or not events:
            return set()
        marks = await asyncio.gather(*(self._get(e.task_id) for e in events))
        return {
            e.event_id
            for e, fenced in zip(events, marks, strict=True)
            if fenced is not None and mark_of(e.run, e.attempt, e.state) <= fenced
        }

    async def record(self, marks: dict[str, Mark]) -> None:
        """Before the messages are acked: task id → the newest mark called back."""
        if self._kv is None or not marks:
            return
        results = await asyncio.gather(
            *(self._raise_to(task, mark) for task, mark in marks.items()),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("could not record %d callback fences: %s", len(failed), failed[0])

    async def _raise_to(self, task_id: str, mark: Mark) -> None:
        """The task's mark raised to `mark`, never lowered."""
        assert self._kv is not None
        key = self._scope + names.kv_key(task_id)
        for _ in range(_CAS_TRIES):
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                try:
                    await self._kv.create(key, _encode(mark))
                    return
                except KeyWrongLastSequenceError:
                    continue  # another holder recorded it first: compare with theirs
            fenced = _decode(entry.value)
            if fenced is not None and fenced >= mark:
                return
            try:
                await self._kv.update(key, _encode(mark), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise TimeoutError(f"the callback fence of {task_id} kept changing")

    async def _get(self, task_id: str) -> Mark | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._scope + names.kv_key(task_id))
        except KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("cannot read the callback fence of %s: %s", task_id, exc)
            return None
        return _decode(entry.value)
