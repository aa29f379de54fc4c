"""The client API on NATS: what a client system asks the drivers, and what they answer.

A request goes to `tg.api.<client>.<op>` (names.api_subject) and is answered by one driver.
The client is the subject's token, never the body's: per-client NATS permissions (publish
only to one's own subjects) then limit a client to its own tasks by subject alone. A body may
name a task by its `key` (the subject's client's) or by its full `task_id`; a `task_id` of
another client is refused, never looked up.

Every answer is one of the tagged replies below (`kind`), an `ErrorReply` when the request
could not be served, with a code a program can branch on and a message a person can act on.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from tidegate.wire.events import TERMINAL_STATES, State
from tidegate.wire.spec import Key, Name

API_OPS: Final = ("get", "list", "cancel")
ApiOp = Literal["get", "list", "cancel"]
PAGE_SIZE: Final = 50
PAGE_MAX: Final = 500  # as the console's JSON API: a page is one bounded database read

ErrorCode = Literal[
    "bad_request",  # the body or the operation is not one this API takes: fix the call
    "unknown_client",  # the subject's client is not registered
    "not_yours",  # a task id of another client
    "database_unavailable",  # reads need PostgreSQL, which did not answer in time
    "nats_unavailable",  # a cancel could not be written to the cancel bucket
    "internal",  # anything else; the driver logged it
]


# --- requests ------------------------------------------------------------------------------------


class GetTask(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The latest run of one task: by `key`, or by `task_id` (which must be the client's)."""

    key: Key | None = None
    task_id: str | None = None


class ListTasks(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One page of the client's tasks, newest first; `after` is the previous page's `next`."""

    state: State | None = None
    pool: Name | None = None
    key_prefix: Annotated[str, Meta(max_length=200)] | None = None
    since: datetime | None = None  # submitted at or after
    until: datetime | None = None  # submitted before
    after: str | None = None
    limit: Annotated[int, Meta(ge=1, le=PAGE_MAX)] = PAGE_SIZE


class CancelTask(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Cancel one task (queued or running): its latest run, or the `run` named."""

    key: Key | None = None
    task_id: str | None = None
    run: int | None = None


ApiRequest = GetTask | ListTasks | CancelTask
_REQUESTS: Final[dict[str, type[ApiRequest]]] = {
    "get": GetTask,
    "list": ListTasks,
    "cancel": CancelTask,
}
_request_decoders = {op: msgspec.json.Decoder(t) for op, t in _REQUESTS.items()}


def decode_request(op: str, data: bytes) -> ApiRequest:
    """The request of operation `op`; raises ValueError (msgspec's DecodeError is one) with
    the reason for an unknown operation or a body that is not the operation's schema. An
    empty body is `{}`."""
    decoder = _request_decoders.get(op)
    if decoder is None:
        raise ValueError(f"unknown operation {op!r}: one of {', '.join(API_OPS)}")
    return decoder.decode(data or b"{}")


class NotYours(ValueError):
    """A task id of another client than the subject's."""


def target_task(client: str, request: GetTask | CancelTask) -> str:
    """The task id a request names, held to `client`; ValueError if it names none, both, or
    another client's task (`NotYours`, a ValueError too, for that last one)."""
    if (request.key is None) == (request.task_id is None):
        raise ValueError("name the task by `key` or by `task_id` (one of them)")
    if request.key is not None:
        return f"{client}:{request.key}"
    assert request.task_id is not None
    owner, sep, _ = request.task_id.partition(":")
    if not sep or owner != client:
        raise NotYours(f"{request.task_id!r} is not a task of client {client}")
    return request.task_id


# --- replies -------------------------------------------------------------------------------------


class TaskState(Struct, frozen=True, kw_only=True):
    """The latest run of a task as the database holds it (it lags the executors by at most a
    few seconds; for a sensitive client, never behind a callback already sent)."""

    task_id: str
    client: str
    key: str
    run: int
    state: str
    attempt: int
    pool: str | None = None
    executor: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None
    labels: dict[str, str] | None = None
    submitted_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


class TaskReply(Struct, frozen=True, kw_only=True, tag="task", tag_field="kind"):
    task: TaskState | None  # None: no such task in the database (yet)


class PageReply(Struct, frozen=True, kw_only=True, tag="page", tag_field="kind"):
    tasks: list[TaskState]  # newest first
    next: str | None  # `after` for the next page; None on the last page


class CancelReply(Struct, frozen=True, kw_only=True, tag="cancel", tag_field="kind"):
    task_id: str
    run: int | None  # the run the request names; None: every run submitted until now
    state: str | None  # the latest run's state when the database answered; None: unknown
    message: str


class ErrorReply(Struct, frozen=True, kw_only=True, tag="error", tag_field="kind"):
    code: ErrorCode
    message: str


ApiReply = TaskReply | PageReply | CancelReply | ErrorReply
_reply_decoder = msgspec.json.Decoder(ApiReply)


def decode_reply(data: bytes) -> ApiReply:
    return _reply_decoder.decode(data)


# --- page cursors --------------------------------------------------------------------------------
# Keyset pagination: a cursor is the last row's (submitted_at, task_id), opaque to callers. The
# console's JSON API and the NATS API hand out the same cursors.


def encode_cursor(submitted_at: datetime, task_id: str) -> str:
    raw = msgspec.json.encode([submitted_at.isoformat(), task_id])
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(text: str) -> tuple[datetime, str]:
    """A cursor's (submitted_at, task_id); ValueError for anything that is not a cursor."""
    try:
        at, task_id = msgspec.json.decode(base64.urlsafe_b64decode(text.encode()))
        return datetime.fromisoformat(at), str(task_id)
    except (ValueError, TypeError, msgspec.DecodeError):
        raise ValueError("not a page cursor of this list; start from the first page") from None
