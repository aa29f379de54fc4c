"""Wire messages: the one schema shared by the client SDK, drivers and executors.

Every message is a frozen msgspec struct encoded as JSON. The same `TaskSpec` validates a task
in the SDK before publishing and again in the driver, so both sides reject the same inputs with
the same reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from tidegate.errors import InvalidTask

# A name that is also a single NATS subject token and a KV key (clients, pools).
NAME_RE: Final = r"\A[A-Za-z0-9_-]{1,64}\Z"  # \Z: `$` would let a trailing newline in
Name = Annotated[str, Meta(pattern=NAME_RE)]
# The client's own idempotency key: printable, no whitespace, bounded.
KEY_PATTERN: Final = r"\A[!-~]{1,200}\Z"
Key = Annotated[str, Meta(pattern=KEY_PATTERN)]

MAX_ATTEMPTS_LIMIT: Final = 20
MAX_TIMEOUT_S: Final = 7 * 24 * 3600


def now() -> datetime:
    return datetime.now(UTC)


class TaskSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a client submits (the JSON body published to `tg.submit.<client>`)."""

    key: Key
    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 3600
    pool: Name | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    labels: dict[str, str] = {}
    max_attempts: Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_LIMIT)] = 3


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_spec(spec: TaskSpec) -> TaskSpec:
    """Cross-field rules that msgspec's per-field constraints cannot express."""
    if (spec.argv is None) == (spec.shell is None):
        raise InvalidTask("give exactly one of `argv` (a list) or `shell` (a string)")
    if spec.argv is not None:
        if not spec.argv:
            raise InvalidTask("`argv` is empty: give at least the program to run")
        if not spec.argv[0]:
            raise InvalidTask("`argv[0]` is empty: it must name the program to run")
        if any("\x00" in a for a in spec.argv):
            raise InvalidTask("`argv` contains a NUL byte")
    if spec.shell is not None and not spec.shell.strip():
        raise InvalidTask("`shell` is blank: give the command line to run")
    if spec.shell is not None and "\x00" in spec.shell:
        raise InvalidTask("`shell` contains a NUL byte")
    if spec.cwd is not None and "\x00" in spec.cwd:
        raise InvalidTask("`cwd` contains a NUL byte")
    for name, value in spec.labels.items():
        if "\x00" in name or "\x00" in value:
            raise InvalidTask(f"label {name!r} contains a NUL byte")
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name):
            raise InvalidTask(f"`env` name {name!r} is not a valid environment variable name")
        if "\x00" in value:
            raise InvalidTask(f"`env[{name}]` contains a NUL byte")
    if spec.cwd is not None and not spec.cwd.startswith("/"):
        raise InvalidTask("`cwd` must be an absolute path")
    return spec


def decode_spec(data: bytes) -> TaskSpec:
    """Parse and validate a task body; raises `InvalidTask` with a reason fit for the client."""
    try:
        spec = msgspec.json.decode(data, type=TaskSpec)
    except msgspec.ValidationError as exc:
        raise InvalidTask(f"invalid task: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidTask(f"malformed JSON: {exc}") from None
    return check_spec(spec)


def task_id(client: str, key: str) -> str:
    return f"{client}:{key}"


TaskClass = Literal["short", "long"]


class WorkItem(Struct, frozen=True, kw_only=True):
    """A routed task on `tg.work.<pool>.<class>`, everything an executor needs to run it."""

    task_id: str
    client: str
    spec: TaskSpec
    pool: str
    task_class: TaskClass
    submitted_at: datetime
    sensitive: bool = False


# --- state events ----------------------------------------------------------------------------

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

    @property
    def state(self) -> str:
        return str(self.__struct_config__.tag)

    @property
    def event_id(self) -> str:
        # Stable across redeliveries and republishing: the dedup id and the callback's event_id.
        return f"{self.task_id}/{self.attempt}/{self.state}"

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

_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def decode_event(data: bytes) -> AnyEvent:
    return _event_decoder.decode(data)


# --- heartbeats ------------------------------------------------------------------------------


class RunningTask(Struct, frozen=True, kw_only=True):
    task_id: str
    client: str
    key: str
    attempt: int
    pool: str
    started_at: datetime
    submitted_at: datetime


class Heartbeat(Struct, frozen=True, kw_only=True):
    """An executor's snapshot, written to the executors KV bucket every interval."""

    executor: str
    host: str
    pid: int
    pools: list[str]
    slots: int
    running: list[RunningTask]
    load: float
    at: datetime
    draining: bool = False
    # Takes no new work (an operator's cordon, or a drain). Defaults keep older heartbeats
    # decodable.
    cordoned: bool = False


_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)


class ExecutorControl(Struct, frozen=True, kw_only=True):
    """An operator's instruction to one executor, the value of its key in the control bucket.

    `cordoned`: take no new work (running tasks go on) until a value without it arrives.
    `drain`: cordon, let the running tasks finish (up to the drain timeout, then hand back the
    rest) and exit; the executor then rewrites its key as cordoned only, so that it comes back
    cordoned when restarted.
    """

    cordoned: bool
    drain: bool = False
    by: str
    at: datetime


_control_decoder = msgspec.json.Decoder(ExecutorControl)


def decode_executor_control(data: bytes) -> ExecutorControl:
    return _control_decoder.decode(data)


def encode(msg: Struct) -> bytes:
    return msgspec.json.encode(msg)


# --- client registry ---------------------------------------------------------------------------


class ClientRecord(Struct, frozen=True, kw_only=True):
    """A row of `clients`, also the JSON mirrored into the clients KV bucket.

    The database's CHECK constraints are the authority; the annotations repeat them so that a
    KV watcher decoding this JSON rejects the same values.
    """

    name: Name
    sensitive: bool = False
    callback_url: Annotated[str, Meta(pattern=r"^https?://")] | None = None
    callback_nats: bool = False
    callback_secret: str | None = None
    max_running: Annotated[int, Meta(ge=0)] | None = None
    max_submit_per_s: Annotated[float, Meta(gt=0)] | None = None
    default_pool: Name = "default"
    paused: bool = False
    callback_batch_max: Annotated[int, Meta(ge=1, le=1000)] = 1  # >1: callbacks as JSON arrays
    created_at: datetime | None = None  # set by the database
    updated_at: datetime | None = None


# --- driver statistics -------------------------------------------------------------------------


class DriverStats(Struct, frozen=True, kw_only=True):
    """One driver's cumulative counters since it started, published on `tg.stats.<driver>`.

    Counters, not rates: a lost or late sample costs resolution, never a count, and any
    reader can take differences over whatever span it likes. A driver that restarts starts
    from zero with a new `started_at`; readers treat a drop as a reset, never as negative.
    """

    driver: str
    started_at: datetime
    at: datetime
    seq: int  # samples stored before this one since start: 0 = counts begin at `started_at`
    every_s: float  # the sampling period, so a reader can tell a gap from the normal pace
    accepted: int  # submissions routed or rejected
    finished: int  # terminal events projected
    commits: int  # database commits of the projection (and of sensitive group commits)
    rows: int  # task rows those commits wrote
    callbacks_delivered: int  # at once or by an outbox retry
    callbacks_outboxed: int  # failed at once, written to the outbox


_driver_stats_decoder = msgspec.json.Decoder(DriverStats)


def decode_driver_stats(data: bytes) -> DriverStats:
    return _driver_stats_decoder.decode(data)


# --- task log files ------------------------------------------------------------------------------

# Bytes of log in one reply: with JSON escaping (a control byte takes six) a reply stays
# under NATS's default 1 MiB payload, and a console page stays light.
LOG_CHUNK_MAX: Final = 256 * 1024


class LogRequest(Struct, frozen=True, kw_only=True):
    """A request for part of one attempt's log file, sent to the executor that ran it
    (`names.executor_log_subject`); the reply is a `LogChunk`."""

    task_id: Annotated[str, Meta(min_length=1, max_length=512)]
    attempt: Annotated[int, Meta(ge=1)]
    offset: Annotated[int, Meta(ge=0)] = 0
    limit: Annotated[int, Meta(ge=1, le=LOG_CHUNK_MAX)] = LOG_CHUNK_MAX
    # The attempt's start names the hour directory of its file; without it the executor
    # searches every hour it keeps, newest first (a task id resubmitted after the duplicate
    # window starts again at attempt 1, so only the start tells such runs apart).
    started_at: datetime | None = None


class LogChunk(Struct, frozen=True, kw_only=True):
    """An executor's answer to a `LogRequest`: `found` false with the `reason`, or bytes
    `offset` to `next_offset` of the file (cut after a line end when the part holds one)."""

    found: bool
    data: str = ""  # UTF-8; undecodable bytes are U+FFFD
    offset: int = 0
    next_offset: int = 0
    size: int = 0  # the file's size now: a running attempt's log still grows
    truncated_at_max: bool = False  # the output went past `log_max_bytes`; the rest is gone
    reason: str | None = None


_log_request_decoder = msgspec.json.Decoder(LogRequest)
_log_chunk_decoder = msgspec.json.Decoder(LogChunk)


def decode_log_request(data: bytes) -> LogRequest:
    return _log_request_decoder.decode(data)


def decode_log_chunk(data: bytes) -> LogChunk:
    return _log_chunk_decoder.decode(data)
