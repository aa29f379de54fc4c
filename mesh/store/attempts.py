"""A run's attempts history: what each attempt of a task's run reached, kept in the run's row.

A row of `tasks` holds the latest attempt's state; the earlier attempts of the run (attempt 1
lost on an executor that died, attempt 2 succeeding elsewhere) are kept beside it in the jsonb
column `attempts` (migration 0009), keyed by attempt number. It is merged inside the projection's
one upsert statement by `tg_merge_attempts`, so the history costs no statement and no commit of
its own. `merge_attempt` here is the same rule in Python (for `rows.coalesce`): keep them in step.

The rule is monotone per attempt: an attempt's entry only moves to a greater state rank; on a tie
the first written stays (as for the row). The executor and start time are kept from whichever
report of that attempt had them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import msgspec
from msgspec import Struct

from tidegate.wire import STATE_RANK


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """What one attempt of a run reached, as far as the reports seen so far tell."""

    number: int
    state: str
    executor: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None

    @property
    def rank(self) -> int:
        return STATE_RANK[self.state]


def merge_attempt(old: Attempt, new: Attempt) -> Attempt:
    """`new` written over `old` (one attempt): what `tg_merge_attempts` does for its key."""
    winner, loser = (new, old) if new.rank > old.rank else (old, new)
    return replace(
        winner,
        executor=winner.executor if winner.executor is not None else loser.executor,
        started_at=winner.started_at if winner.started_at is not None else loser.started_at,
    )


def merge_attempts(old: Iterable[Attempt], new: Iterable[Attempt]) -> tuple[Attempt, ...]:
    """Two histories of one run folded into one, in attempt order."""
    out = {a.number: a for a in old}
    for a in new:
        known = out.get(a.number)
        out[a.number] = a if known is None else merge_attempt(known, a)
    return tuple(out[n] for n in sorted(out))


def encode_attempts(attempts: Iterable[Attempt]) -> str:
    """The jsonb the upsert merges: `{"<n>": {state, rank, …}}`, unknown fields left out (an
    absent key is what lets a later report of the attempt fill it in)."""
    entries: dict[str, dict[str, Any]] = {}
    for a in attempts:
        entry: dict[str, Any] = {"state": a.state, "rank": a.rank}
        for name in ("executor", "started_at", "finished_at", "exit_code", "reason"):
            value = getattr(a, name)
            if value is not None:
                entry[name] = value
        entries[str(a.number)] = entry
    return msgspec.json.encode(entries).decode()


# --- read side -------------------------------------------------------------------------------


class AttemptRecord(Struct, frozen=True, kw_only=True):
    """One attempt of a run, as the task page, the API and `task show --json` list them.

    An attempt that is not the run's latest and shows no terminal state was never reported
    finished: its executor died or was cut off, and the task was delivered again.
    """

    attempt: int
    state: str  # the furthest state reported for this attempt
    executor: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None  # null unless both started_at and finished_at are known
    exit_code: int | None = None
    reason: str | None = None


class _Stored(Struct, frozen=True, kw_only=True):
    state: str
    executor: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None


def attempt_records(
    stored: Mapping[str, Any] | None, row: Mapping[str, Any]
) -> list[AttemptRecord]:
    """The run's attempts, newest first, from the stored history and the row's own columns.

    A row written before the history existed (or whose latest attempt's entry is missing)
    still shows its latest attempt, taken from the row's columns.
    """
    by_number: dict[int, _Stored] = {
        int(n): msgspec.convert(entry, _Stored) for n, entry in (stored or {}).items()
    }
    latest = int(row.get("attempt") or 0)
    if latest >= 1 and latest not in by_number:
        by_number[latest] = _Stored(
            state=row["state"],
            executor=row.get("executor"),
            started_at=row.get("started_at"),
            finished_at=row.get("finished_at"),
            exit_code=row.get("exit_code"),
            reason=row.get("reason"),
        )
    out: list[AttemptRecord] = []
    for n in sorted(by_number, reverse=True):
        s = by_number[n]
        duration = (
            (s.finished_at - s.started_at).total_seconds()
            if s.started_at is not None and s.finished_at is not None
            else None
        )
        out.append(
            AttemptRecord(
                attempt=n,
                state=s.state,
                executor=s.executor,
                started_at=s.started_at,
                finished_at=s.finished_at,
                duration_s=duration,
                exit_code=s.exit_code,
                reason=s.reason,
            )
        )
    return out
