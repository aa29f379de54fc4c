"""One flattening of a state event into the fields its consumers read.

A state event is a tagged union whose variants carry different fields. The projection's row
(`rows.row_from_flat`) and the client's callback (`driver.callbacks.payload`) are both flat
records of one transition; both are built from `flatten`, so they cannot disagree on which
state carries what, and a field added to an event is picked up in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict, assert_never

from tidegate.wire import AnyEvent, Dispatched, Finished, Queued, Running, TaskSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class FlatEvent:
    """A state event as flat fields; `None` means "this state does not carry it"."""

    event_id: str
    task_id: str
    client: str
    key: str
    state: str
    attempt: int
    at: datetime
    submitted_at: datetime
    executor: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The spec side comes from `queued` alone, as a unit: the projection fills it in once,
    # whichever event of the task it sees first, so a partial spec side is never written.
    spec: TaskSpec | None = None
    pool: str | None = None
    task_class: str | None = None
    run: int = 0  # the run's id (wire.Event.run)


class _Common(TypedDict):
    event_id: str
    task_id: str
    client: str
    key: str
    state: str
    attempt: int
    at: datetime
    submitted_at: datetime
    run: int


def flatten(event: AnyEvent | Finished) -> FlatEvent:
    """`Finished` too, not only the tagged variants: `FINISHED_BY_STATE[state](...)` builds one."""
    base = _Common(
        event_id=event.event_id,
        task_id=event.task_id,
        client=event.client,
        key=event.key,
        state=event.state,
        attempt=event.attempt,
        at=event.at,
        submitted_at=event.submitted_at,
        run=event.run,
    )
    match event:
        case Queued():
            return FlatEvent(**base, spec=event.spec, pool=event.pool, task_class=event.task_class)
        case Dispatched():
            return FlatEvent(**base, executor=event.executor)
        case Running():
            return FlatEvent(**base, executor=event.executor, started_at=event.started_at)
        case Finished():
            return FlatEvent(
                **base,
                executor=event.executor,
                exit_code=event.exit_code,
                reason=event.reason,
                log_tail=event.log_tail,
                started_at=event.started_at,
                finished_at=event.finished_at,
            )
        case _:
            assert_never(event)
