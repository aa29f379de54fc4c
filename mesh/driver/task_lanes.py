"""Lanes by task: one client's callbacks, several requests at once, in order per task.

Pure bookkeeping, no I/O (the notifier drives it: mesh/driver/notify_lanes.py). Items wait
per task; a task whose earlier items are in a request ("busy") gives nothing more until that
request is settled (`done`), so a task's states go out one request after another, in the order
they arrived, and never in two requests at once. Different tasks go concurrently, up to
`limit` requests in flight. A request (`take`) is filled with whatever waits, oldest first, up
to its size: a task's waiting items go together, in order, into one request. With a limit of
one, items go in arrival order, as a single lane would send them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class TaskLanes(Generic[T]):
    def __init__(self, key: Callable[[T], str], *, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a client needs at least one request in flight, not {limit}")
        self._key = key
        self.limit = limit
        self._seq = 0  # arrival order, across tasks
        # Tasks with waiting items and nothing in flight, by the arrival of their oldest
        # waiting item: what `take` serves, oldest first (with a limit of 1, arrival order).
        self._ready: dict[str, deque[tuple[int, T]]] = {}
        self._order: list[tuple[int, str]] = []  # heap of (oldest waiting, task) of `_ready`
        # Tasks with something in flight, and what of theirs waits behind it.
        self._busy: dict[str, deque[tuple[int, T]]] = {}
        self.waiting = 0  # items not taken yet
        self.taken = 0  # items taken and not settled yet
        self.in_flight = 0  # requests taken and not settled yet (at most `limit`)

    @property
    def held(self) -> int:
        """Every item not settled: what the client's held budget counts."""
        return self.waiting + self.taken

    def put(self, item: T) -> None:
        key = self._key(item)
        self._seq += 1
        entry = (self._seq, item)
        parked = self._busy.get(key)
        if parked is not None:
            parked.append(entry)
        elif (ready := self._ready.get(key)) is not None:
            ready.append(entry)
        else:
            self._make_ready(key, deque([entry]))
        self.waiting += 1

    def _make_ready(self, key: str, items: deque[tuple[int, T]]) -> None:
        self._ready[key] = items
        heapq.heappush(self._order, (items[0][0], key))

    def can_take(self) -> bool:
        return bool(self._ready) and self.in_flight < self.limit

    def take(self, size: int) -> list[T]:
        """One request's items: up to `size`, oldest waiting first; [] when at the limit or
        nothing is ready. Every task in it is busy until `done`."""
        if not self.can_take():
            return []
        got = self._take(max(1, size))
        self.in_flight += 1
        return got

    def take_idle(self) -> list[T]:
        """Everything waiting of the tasks with nothing in flight, in arrival order per task
        (the held budget's spill). Not a request: the limit neither stops nor counts it, but
        its tasks are busy until `done(…, request=False)`."""
        return self._take(self.waiting) if self._ready else []

    def _take(self, size: int) -> list[T]:
        got: list[T] = []
        while self._order and len(got) < size:
            _, key = heapq.heappop(self._order)
            items = self._ready.pop(key)
            while items and len(got) < size:
                got.append(items.popleft()[1])
            self._busy[key] = items  # the rest (if any) waits behind what is in flight
        self.waiting -= len(got)
        self.taken += len(got)
        return got

    def done(self, items: Iterable[T], *, request: bool = True) -> None:
        """`items` (one `take`, or one `take_idle`) settled: their tasks may go on."""
        keys: set[str] = set()
        for item in items:
            keys.add(self._key(item))
            self.taken -= 1
        if request:
            self.in_flight -= 1
        for key in keys:
            parked = self._busy.pop(key, None)
            if parked:
                self._make_ready(key, parked)  # in its place: by its oldest waiting item

    def drain(self) -> list[T]:
        """Every waiting item (in flight ones are not), for handing back at once."""
        got = [i for items in self._ready.values() for _, i in items]
        got += [i for items in self._busy.values() for _, i in items]
        self._ready.clear()
        self._order.clear()
        for items in self._busy.values():
            items.clear()
        self.waiting = 0
        return got
