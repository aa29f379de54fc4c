"""The store's rows: what is written to `tasks` and how a batch is coalesced, and the records
read back (`TaskRecord`).

Pure logic. `merge` is the monotone upsert of `queries.sql` (`upsert_tasks`) in Python, so
`coalesce` can fold many transitions of a task into the one row the database would end up with
had they been written one by one, in any order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypedDict

import msgspec
from msgspec import Struct

from tidegate.store.attempts import (
    Attempt,
    AttemptRecord,
    attempt_records,
    encode_attempts,
    merge_attempts,
)
from tidegate.store.flatten import FlatEvent, flatten
from tidegate.wire import STATE_RANK, AnyEvent, Finished, Heartbeat, TaskSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRow:
    """One write to the projection. `None` means "this report does not know", never "clear"."""

    task_id: str
    client: str
    key: str
    submitted_at: datetime
    state: str
    attempt: int
    pool: str | None = None
    task_class: str | None = None
    spec: TaskSpec | None = None
    executor: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    run: int = 0  # the run (wire.Event.run): each run of a task id is a row of its own
    # The run's attempts seen so far (store/attempts.py), in attempt order; left empty, this
    # report's own attempt (from 1: queued and dispatched are attempt 0, no attempt yet).
    attempts: tuple[Attempt, ...] = ()
    # The partition key: the UTC day of submission, the same for every event of a task.
    submitted_on: date = field(init=False)

    def __post_init__(self) -> None:
        if self.submitted_at.tzinfo is None:
            # A naive time would land in a partition chosen by this host's local zone.
            raise ValueError(f"{self.task_id}: submitted_at must be timezone-aware")
        if self.state not in STATE_RANK:
            raise ValueError(f"{self.task_id}: unknown state {self.state!r}")
        object.__setattr__(self, "submitted_on", self.submitted_at.astimezone(UTC).date())
        # PostgreSQL text refuses NUL; one such byte in a reason or log tail (from any
        # publisher, not only our executors) would otherwise stop every projection batch.
        for name in ("reason", "log_tail", "executor"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:
                object.__setattr__(self, name, value.replace("\x00", "\ufffd"))
        if not self.attempts and self.attempt >= 1:
            own = Attempt(
                number=self.attempt,
                state=self.state,
                executor=self.executor,
                started_at=self.started_at,
                finished_at=self.finished_at,
                exit_code=self.exit_code,
                reason=self.reason,
            )
            object.__setattr__(self, "attempts", (own,))

    @property
    def state_rank(self) -> int:
        return STATE_RANK[self.state]

    @property
    def order(self) -> tuple[int, int]:
        return (self.attempt, STATE_RANK[self.state])


def row_from_event(event: AnyEvent | Finished) -> TaskRow:
    """The row an event writes."""
    return row_from_flat(flatten(event))


def row_from_flat(flat: FlatEvent) -> TaskRow:
    return TaskRow(
        task_id=flat.task_id,
        client=flat.client,
        key=flat.key,
        submitted_at=flat.submitted_at,
        state=flat.state,
        attempt=flat.attempt,
        pool=flat.pool,
        task_class=flat.task_class,
        spec=flat.spec,
        executor=flat.executor,
        exit_code=flat.exit_code,
        reason=flat.reason,
        log_tail=flat.log_tail,
        started_at=flat.started_at,
        finished_at=flat.finished_at,
        run=flat.run,
    )


def rows_from_heartbeat(hb: Heartbeat) -> list[TaskRow]:
    """Non-sensitive clients' `running` states travel only here, not as events."""
    return [
        TaskRow(
            task_id=t.task_id,
            client=t.client,
            key=t.key,
            submitted_at=t.submitted_at,
            state="running",
            attempt=t.attempt,
            pool=t.pool,
            executor=hb.executor,
            started_at=t.started_at,
            run=t.run,
        )
        for t in hb.running
    ]


def _greatest(a: datetime | None, b: datetime | None) -> datetime | None:
    # SQL greatest() ignores nulls.
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def merge(old: TaskRow, new: TaskRow) -> TaskRow:
    """`new` written over `old`: exactly what `upsert_tasks` does on conflict."""
    advance = new.order > old.order
    winner = new if advance else old
    if new.attempt != old.attempt:
        executor = winner.executor
    elif advance:
        executor = new.executor if new.executor is not None else old.executor
    else:
        executor = old.executor if old.executor is not None else new.executor
    return dataclasses.replace(
        old,
        state=winner.state,
        attempt=winner.attempt,
        exit_code=winner.exit_code,
        reason=winner.reason,
        log_tail=winner.log_tail,
        finished_at=winner.finished_at,
        executor=executor,
        pool=old.pool if old.pool is not None else new.pool,
        task_class=old.task_class if old.task_class is not None else new.task_class,
        spec=old.spec if old.spec is not None else new.spec,
        started_at=_greatest(old.started_at, new.started_at),
        attempts=merge_attempts(old.attempts, new.attempts),
    )


def coalesce(rows: Iterable[TaskRow]) -> list[TaskRow]:
    """One row per (task_id, run, submitted_on), in order of first appearance: two runs of a
    task id never merge.

    The state fields come from the greatest (attempt, state rank), the first seen on a tie;
    the spec side from whichever row carries it; started_at is the latest seen.
    """
    out: dict[tuple[str, int, date], TaskRow] = {}
    for row in rows:
        k = (row.task_id, row.run, row.submitted_on)
        old = out.get(k)
        out[k] = row if old is None else merge(old, row)
    return list(out.values())


def columns(rows: Sequence[TaskRow]) -> dict[str, list[Any]]:
    """The batch as one array per column, the parameters of `upsert_tasks`."""
    enc = msgspec.json.encode
    specs = [r.spec for r in rows]
    return {
        "task_id": [r.task_id for r in rows],
        "run": [r.run for r in rows],
        "client": [r.client for r in rows],
        "key": [r.key for r in rows],
        "submitted_on": [r.submitted_on for r in rows],
        "submitted_at": [r.submitted_at for r in rows],
        "pool": [r.pool for r in rows],
        "task_class": [r.task_class for r in rows],
        # JSON is encoded here by msgspec and cast in SQL: psycopg cannot dump a TaskSpec.
        "spec": [None if s is None else enc(s).decode() for s in specs],
        "priority": [None if s is None else s.priority for s in specs],
        "labels": [None if s is None else enc(s.labels).decode() for s in specs],
        "max_attempts": [None if s is None else s.max_attempts for s in specs],
        "state": [r.state for r in rows],
        "state_rank": [r.state_rank for r in rows],
        "attempt": [r.attempt for r in rows],
        "executor": [r.executor for r in rows],
        "exit_code": [r.exit_code for r in rows],
        "reason": [r.reason for r in rows],
        "log_tail": [r.log_tail for r in rows],
        "started_at": [r.started_at for r in rows],
        "finished_at": [r.finished_at for r in rows],
        "attempts": [encode_attempts(r.attempts) for r in rows],
    }


# --- read side -------------------------------------------------------------------------------


class TaskRecord(Struct, frozen=True, kw_only=True):
    """A task as `tidegate task show --json` prints it; the field names are a stable contract.

    The spec's fields (argv … max_attempts) are null while the `queued` event is not projected
    yet; `duration_s` is null unless both `started_at` and `finished_at` are known.
    """

    task_id: str
    client: str
    key: str
    state: str
    attempt: int
    pool: str | None
    task_class: str | None
    executor: str | None
    exit_code: int | None
    reason: str | None
    log_tail: str | None
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    updated_at: datetime
    argv: list[str] | None
    shell: str | None
    env: dict[str, str] | None
    cwd: str | None
    timeout_s: float | None
    labels: dict[str, str] | None
    priority: int | None
    max_attempts: int | None
    # The run shown: the latest (a key submitted again after the dedup window, or retried,
    # starts the task's next run); 0 for a task from before runs.
    run: int = 0
    # The run's attempts, newest first (store/attempts.py); filled by `task_record`.
    attempts: list[AttemptRecord] = []


def task_record(row: Mapping[str, Any]) -> TaskRecord:
    """A `task_records` row as a record, its attempts history (`attempt_history`) decoded."""
    record = msgspec.convert(row, TaskRecord)
    history = attempt_records(row.get("attempt_history"), row)
    return msgspec.structs.replace(record, attempts=history)


class RunSummary(Struct, frozen=True, kw_only=True):
    """One run of a task, as `task show` and the task page list the runs."""

    run: int
    submitted_at: datetime
    state: str
    attempt: int
    finished_at: datetime | None
    reason: str | None
    attempts: list[AttemptRecord] = []  # newest first


def run_summary(record: TaskRecord) -> RunSummary:
    return RunSummary(
        run=record.run,
        submitted_at=record.submitted_at,
        state=record.state,
        attempt=record.attempt,
        finished_at=record.finished_at,
        reason=record.reason,
        attempts=record.attempts,
    )


class ClientChanges(TypedDict, total=False):
    """The columns `Store.update_client` may change; a key given as None clears that column."""

    sensitive: bool
    callback_url: str | None
    callback_nats: bool
    callback_secret: str | None
    max_running: int | None
    max_submit_per_s: float | None
    default_pool: str
    paused: bool
    callback_batch_max: int
    callback_held_max: int
    buffer_max: int | None
    allowed_executables: tuple[str, ...] | None
    allowed_cwds: tuple[str, ...] | None
    allow_shell: bool


class ClientHealth(Struct, frozen=True, kw_only=True):
    """What the console shows of a client's recent trouble."""

    client: str
    failed_1h: int  # terminal failures (failed, timed out, lost, rejected) in the last hour
    outbox: int  # callbacks waiting for a retry
    dead: int  # callbacks that exhausted their retries


class TaskSearch(Struct, frozen=True, kw_only=True):
    """A filtered, keyset-paginated list of tasks (the console's Tasks page)."""

    client: str | None = None
    state: str | None = None
    pool: str | None = None
    key: str | None = None  # a prefix of the client's key
    since: datetime | None = None  # submitted at or after
    until: datetime | None = None  # submitted before
    after: tuple[datetime, str] | None = None  # (submitted_at, task_id) of the previous page's last
    limit: int = 50
