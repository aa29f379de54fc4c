"""Rows that wait a little before they are written, so that a task that finishes soon costs one
row write (its insert and terminal state together) instead of two.

Pure logic, used by the projector in batch mode. Every row the projector is given goes in, keyed
as `coalesce` keys them (task id, run, day), folded with what is already waiting for that key
(`rows.merge`: the same monotone rule the database applies). A key is due, written with the next
batch, once it holds a terminal state, or once its first row has waited the linger; until then
it waits, with the messages it came from (`M`: acked only after the write that holds them).

Why this bounds row writes: a task's `queued` row waits for its terminal state for at least one
linger; if it comes, one write; otherwise the `queued` insert now and the terminal update later.
Intermediate states (heartbeats' `running`) fold into whatever waits, never written alone
while something of the task waits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Generic, TypeVar

from tidegate.store.rows import TaskRow, merge
from tidegate.wire import TERMINAL_STATES

M = TypeVar("M")
RowKey = tuple[str, int, date]


def row_key(row: TaskRow) -> RowKey:
    """What `coalesce` merges rows by."""
    return (row.task_id, row.run, row.submitted_on)


@dataclass(slots=True)
class Waiting(Generic[M]):
    """One key's rows folded into one, and the messages they came from."""

    row: TaskRow
    first_at: float  # when its first row came in (the caller's clock)
    msgs: list[M] = field(default_factory=list)
    folded: int = 0  # rows merged into `row` after the first

    @property
    def terminal(self) -> bool:
        return self.row.state in TERMINAL_STATES


class Lingering(Generic[M]):
    def __init__(self) -> None:
        self._waiting: dict[RowKey, Waiting[M]] = {}  # in order of first arrival

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, row: TaskRow, msg: M | None, now: float) -> None:
        key = row_key(row)
        entry = self._waiting.get(key)
        if entry is None:
            entry = self._waiting[key] = Waiting(row=row, first_at=now)
        else:
            entry.row = merge(entry.row, row)
            entry.folded += 1
        if msg is not None:
            entry.msgs.append(msg)

    def oldest_at(self) -> float | None:
        """When the longest-waiting key came in (dicts keep insertion order)."""
        for entry in self._waiting.values():
            return entry.first_at
        return None

    def msgs(self) -> Iterator[M]:
        for entry in self._waiting.values():
            yield from entry.msgs

    def take_due(
        self, now: float, linger_s: float, *, everything: bool = False
    ) -> list[Waiting[M]]:
        """Remove and return what is due at `now` (with `everything`: all of it)."""
        if everything:
            due = list(self._waiting.values())
            self._waiting.clear()
            return due
        # `first_at + linger_s`, the very sum a caller's deadline is made of: `now - linger_s`
        # could round the other way, and the key would not be due at its own deadline.
        keys = [k for k, e in self._waiting.items() if e.terminal or e.first_at + linger_s <= now]
        return [self._waiting.pop(k) for k in keys]
