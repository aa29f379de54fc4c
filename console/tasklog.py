"""An attempt's full log on the task page, asked for from the executor that ran it.

Only a tail of the output reaches the database; the whole of it (the first `log_max_bytes`)
stays on the executor's host until retention removes it, and the executor answers for it on
its own NATS subject (executor/logserver.py). So this route reads no file and, when the link
names the executor, not even the database: it asks once per part (`LOG_CHUNK_MAX` bytes at
most, bounded in time) and shows why not when it cannot, never a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

import msgspec
from litestar import Request, get
from litestar.datastructures import State
from litestar.response import Template
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_502_BAD_GATEWAY,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_504_GATEWAY_TIMEOUT,
)
from litestar.types import ControllerRouterHandler
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from tidegate import names
from tidegate.console.executors import EXECUTOR_ID
from tidegate.console.link import BusLink
from tidegate.console.tasks import READ_TIMEOUT_S, missing
from tidegate.errors import StoreError, TidegateError
from tidegate.wire import LogChunk, LogRequest, decode_log_chunk, encode

ASK_TIMEOUT_S: Final = 2.0  # an executor answers from its page cache in milliseconds
MAX_TASK_ID: Final = 512


class LogUnavailable(TidegateError):
    """The log part cannot be shown; the message says why, `status` is the HTTP answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, kw_only=True)
class LogQuery:
    task_id: str
    attempt: int | None
    offset: int
    executor: str | None
    started_at: datetime | None

    def url(self, offset: int) -> str:
        params = {
            "id": self.task_id,
            "attempt": str(self.attempt or ""),
            "executor": self.executor or "",
            "at": self.started_at.isoformat() if self.started_at else "",
            "offset": str(offset),
        }
        return "/task/log?" + urlencode({k: v for k, v in params.items() if v})


def parse_query(query: Mapping[str, str]) -> LogQuery:
    """The query string as a `LogQuery`; a bad value is a clear 422, not Litestar's 400."""
    task_id = query.get("id", "").strip()
    if not task_id or len(task_id) > MAX_TASK_ID:
        raise LogUnavailable("id: give the task id, CLIENT:KEY", HTTP_422_UNPROCESSABLE_ENTITY)
    executor = query.get("executor", "").strip() or None
    if executor is not None and not EXECUTOR_ID.match(executor):
        raise LogUnavailable(f"executor: {executor!r} is not an executor id", 422)
    at_text = query.get("at", "").strip()
    try:
        started_at = datetime.fromisoformat(at_text) if at_text else None
    except ValueError:
        raise LogUnavailable(f"at: {at_text!r} is not a time", 422) from None
    if started_at is not None and started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=UTC)
    return LogQuery(
        task_id=task_id,
        attempt=_number(query, "attempt", minimum=1),
        offset=_number(query, "offset", minimum=0) or 0,
        executor=executor,
        started_at=started_at,
    )


def _number(query: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    text = query.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 18 or int(text) < minimum:
        raise LogUnavailable(
            f"{name}: {text!r} is not a whole number of at least {minimum}",
            HTTP_422_UNPROCESSABLE_ENTITY,
        )
    return int(text)


async def locate(state: State, ask: LogQuery) -> LogQuery:
    """Fill in the executor (and start) of the attempt from the task's row when the link
    did not name them; the database keeps them for the latest attempt only."""
    if ask.executor is not None and ask.attempt is not None:
        return ask
    try:
        runs = await asyncio.wait_for(state.store.task_runs(ask.task_id), READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        raise LogUnavailable(
            f"the database did not answer ({exc or 'timeout'}): the executor of the attempt "
            "is unknown; open the log from the task page's link, which names it",
            HTTP_503_SERVICE_UNAVAILABLE,
        ) from None
    if not runs:
        raise LogUnavailable(missing(ask.task_id), HTTP_404_NOT_FOUND)
    task = runs[0]
    attempt = ask.attempt or task.attempt
    if attempt > task.attempt:
        raise LogUnavailable(
            f"{ask.task_id} has no attempt {attempt}: its latest is attempt {task.attempt}",
            HTTP_404_NOT_FOUND,
        )
    if attempt < task.attempt and ask.executor is None:
        raise LogUnavailable(
            f"the database names the executor of attempt {task.attempt} only, not of "
            f"attempt {attempt}: add executor=ID to ask the executor that ran it",
            HTTP_404_NOT_FOUND,
        )
    if ask.executor is None and task.executor is None:
        raise LogUnavailable(
            f"attempt {attempt} of {ask.task_id} has not started on an executor "
            f"(it is {task.state}): there is no log yet",
            HTTP_404_NOT_FOUND,
        )
    return replace(
        ask,
        attempt=attempt,
        executor=ask.executor or task.executor,
        started_at=ask.started_at or (task.started_at if attempt == task.attempt else None),
    )


async def ask_executor(link: BusLink, ask: LogQuery) -> LogChunk:
    assert ask.executor is not None and ask.attempt is not None  # `locate` filled them in
    nc = link.nc
    if nc is None or not nc.is_connected:
        raise LogUnavailable(
            f"NATS is unreachable: the console cannot ask {ask.executor} for the log now; "
            "try again later",
            HTTP_503_SERVICE_UNAVAILABLE,
        )
    req = LogRequest(
        task_id=ask.task_id, attempt=ask.attempt, offset=ask.offset, started_at=ask.started_at
    )
    subject = names.executor_log_subject(ask.executor)
    try:
        # The outer bound also covers a request stuck behind a reconnecting connection.
        reply = await asyncio.wait_for(
            nc.request(subject, encode(req), timeout=ASK_TIMEOUT_S), ASK_TIMEOUT_S + 1
        )
    except NoRespondersError:
        raise LogUnavailable(
            f"the executor {ask.executor} does not answer: it is gone or stopped; "
            "its log is no longer reachable",
            HTTP_503_SERVICE_UNAVAILABLE,
        ) from None
    except TimeoutError:
        raise LogUnavailable(
            f"the executor {ask.executor} did not answer within {ASK_TIMEOUT_S:g} s: it may "
            "be overloaded or cut off from NATS; try again",
            HTTP_504_GATEWAY_TIMEOUT,
        ) from None
    except (NatsError, OSError) as exc:
        raise LogUnavailable(
            f"NATS is unreachable ({exc}): the console cannot ask {ask.executor} for the log",
            HTTP_503_SERVICE_UNAVAILABLE,
        ) from None
    try:
        chunk = decode_log_chunk(reply.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LogUnavailable(
            f"the answer of {ask.executor} could not be read ({exc})", HTTP_502_BAD_GATEWAY
        ) from None
    if not chunk.found:
        raise LogUnavailable(chunk.reason or "the executor has no such log", HTTP_404_NOT_FOUND)
    return chunk


@get("/task/log", name="task-log")
async def task_log(request: Request[Any, Any, Any], state: State) -> Template:
    """One part of an attempt's log: the fragment htmx appends to the task page, or a page."""
    query = dict(request.query_params)
    ask: LogQuery | None = None
    chunk: LogChunk | None = None
    error, status = "", 200
    try:
        ask = parse_query(query)
        ask = await locate(state, ask)
        chunk = await ask_executor(request.app.state.link, ask)
    except LogUnavailable as exc:
        error, status = str(exc), exc.status
    fragment = request.headers.get("hx-request") == "true"
    return Template(
        template_name="task_log.html" if fragment else "task_log_page.html",
        context={
            "nav": "tasks",
            "task_id": ask.task_id if ask else query.get("id", ""),
            "ask": ask,
            "chunk": chunk,
            "error": error,
            # Where a retry, or the next part, comes from.
            "again_url": ask.url(ask.offset) if ask else "",
            "more_url": ask.url(chunk.next_offset) if ask and chunk else "",
        },
        # htmx drops an answer of 400 or more (console.js moves its text to the flash box at
        # the top of the page, far from the log): the fragment says what went wrong in place.
        status_code=200 if fragment else status,
    )


ROUTES: list[ControllerRouterHandler] = [task_log]
