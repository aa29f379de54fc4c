"""State events (`tg.event.<client>`): the states, their order, and the lenient decoder."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

import msgspec
from msgspec import Struct

from tidegate.wire.spec import SpecOnWire, TaskClass, TaskSpec, event_id_of, plain_spec
from tidegate.wire.times import check_time

State = Literal[
    "queued",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "rejected",
]
TERMINAL_STATES: Final[frozenset[str]] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "lost", "rejected"}
)
# A row only moves forward in (attempt, rank); every terminal state shares the top rank, so
# whichever terminal state of an attempt is written first stays.
STATE_RANK: Final[dict[str, int]] = {
    "queued": 0,
    "dispatched": 1,
    "running": 2,
    **{s: 3 for s in TERMINAL_STATES},
}


class Event(Struct, frozen=True, kw_only=True, tag_field="state"):
    """Base of every state event published on `tg.event.<client>`."""

    task_id: str
    client: str
    key: str
    attempt: int
    at: datetime
    submitted_at: datetime
    # Stamped by whoever publishes the event, from the client registry at that moment, so
    # that every consumer (projector, notifier) treats this event the same way.
    sensitive: bool = False
    # The run's id: the stream sequence of the submission that started it; later runs have
    # larger ids. 0: from a component that predates runs (their messages still decode).
    run: int = 0

    def __post_init__(self) -> None:
        for name in ("at", "submitted_at", "started_at", "finished_at"):
            check_time(name, getattr(self, name, None))

    @property
    def state(self) -> str:
        return str(self.__struct_config__.tag)

    @property
    def event_id(self) -> str:
        # Stable across redeliveries and republishing: the dedup id and the callback's event_id.
        # A later run of the same task id gets ids of its own (run 0: the form before runs).
        return event_id_of(self.task_id, self.run, self.attempt, self.state)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class Queued(Event, frozen=True, kw_only=True, tag="queued"):
    spec: TaskSpec
    pool: str
    task_class: TaskClass


class Dispatched(Event, frozen=True, kw_only=True, tag="dispatched"):
    """Handed to its pool's work queue (the client's turn, cap and rate allowed it)."""

    pool: str
    executor: str | None = None


class Running(Event, frozen=True, kw_only=True, tag="running"):
    executor: str
    started_at: datetime


class Finished(Event, frozen=True, kw_only=True):
    """Fields shared by the terminal states an executor reports."""

    executor: str | None = None
    exit_code: int | None = None
    reason: str = ""
    log_tail: str = ""
    started_at: datetime | None = None
    finished_at: datetime


class Succeeded(Finished, frozen=True, kw_only=True, tag="succeeded"):
    pass


class Failed(Finished, frozen=True, kw_only=True, tag="failed"):
    pass


class TimedOut(Finished, frozen=True, kw_only=True, tag="timed_out"):
    pass


class Cancelled(Finished, frozen=True, kw_only=True, tag="cancelled"):
    pass


class Lost(Finished, frozen=True, kw_only=True, tag="lost"):
    pass


class Rejected(Finished, frozen=True, kw_only=True, tag="rejected"):
    """The driver refused the task; `reason` says why. Carries no spec when it did not parse."""


AnyEvent = (
    Queued | Dispatched | Running | Succeeded | Failed | TimedOut | Cancelled | Lost | Rejected
)
FINISHED_BY_STATE: Final[dict[str, type[Finished]]] = {
    "succeeded": Succeeded,
    "failed": Failed,
    "timed_out": TimedOut,
    "cancelled": Cancelled,
    "lost": Lost,
    "rejected": Rejected,
}


class _QueuedOnWire(Queued, frozen=True, kw_only=True, tag="queued"):
    spec: SpecOnWire  # a newer driver's spec fields are skipped (see `SpecOnWire`)


class UnknownEventState(msgspec.ValidationError):
    """An event whose state this version does not know (a newer version published it)."""


class _StateOnly(Struct):
    state: object = None


_WireEvent = (
    _QueuedOnWire
    | Dispatched
    | Running
    | Succeeded
    | Failed
    | TimedOut
    | Cancelled
    | Lost
    | Rejected
)
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_lenient_event_decoder: msgspec.json.Decoder[_WireEvent] = msgspec.json.Decoder(_WireEvent)
_state_decoder = msgspec.json.Decoder(_StateOnly)


def peek_state(data: bytes) -> object:
    """An event's `state` field alone, unchecked (None when it has none or is not JSON): for
    a consumer that drops whole kinds of event and need not decode the rest (2 µs a
    `queued` event with its spec, against 0.4 µs for the state alone)."""
    try:
        return _state_decoder.decode(data).state
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def decode_event(data: bytes) -> AnyEvent:
    """A state event, whichever version published it: fields this version does not know are
    skipped. A state it does not know cannot be ranked or projected: `UnknownEventState` (a
    `msgspec.ValidationError`) says so, for the consumer to set the event aside as a dead
    letter, to re-drive once every driver runs the newer version."""
    try:
        return _event_decoder.decode(data)  # the common case, at full speed
    except msgspec.ValidationError:
        pass
    try:
        event = _lenient_event_decoder.decode(data)  # a newer writer's spec, or invalid
    except msgspec.ValidationError:
        # Valid JSON (else a DecodeError): read the state alone to tell why.
        state = _state_decoder.decode(data).state
        if isinstance(state, str) and state not in STATE_RANK:
            raise UnknownEventState(
                f"unknown event state {state!r}: published by a newer version of Tidegate? "
                "re-drive it once every driver is upgraded"
            ) from None
        raise
    if isinstance(event, _QueuedOnWire):
        fields = msgspec.structs.asdict(event)
        fields["spec"] = plain_spec(event.spec)
        return Queued(**fields)
    return event
