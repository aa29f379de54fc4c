"""The Tasks pages: a filtered list paged by keyset, one task's page, and cancelling.

Tasks are read from the projection, so a task can lag the executors by a few seconds (the
page says so). Cancelling writes a request into the cancel bucket that every executor
watches: it needs NATS, not the database.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from typing import Annotated, Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body, QueryParameter
from litestar.response import Response, Template
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ControllerRouterHandler

from tidegate import names
from tidegate.bus.cancel import request_cancel
from tidegate.console.auth import actor_of, operator_only
from tidegate.console.retry import (
    RETRY_BULK_MAX,
    RetryRefused,
    finished_task_ids,
    retry_many,
    start_next_run,
)
from tidegate.errors import StoreError, TidegateError
from tidegate.store.operators import record_action
from tidegate.store.rows import TaskRecord, TaskSearch
from tidegate.wire import STATE_RANK, TERMINAL_STATES, decode_cursor, encode_cursor

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 3.0
PAGE_SIZE = 50
BULK_MAX = 10_000  # tasks one bulk cancel may touch; a larger one is refused with the count
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
# Environment variables whose value is shown as •••: a task's spec may carry credentials.
SECRET_NAME = re.compile(r"secret|token|passw|pwd|key|credential|auth|cookie|session", re.I)


class FilterError(TidegateError):
    """A filter the page cannot use; the message names it."""

    exit_code = 2


def parse_filters(query: Mapping[str, str]) -> TaskSearch:
    """The query string as a search; a bad value is a clear message, not a 500."""
    values = {k: v.strip() for k, v in query.items() if v and v.strip()}
    state = values.get("state")
    if state and state not in STATE_RANK:
        raise FilterError(f"state: {state!r} is not one of {', '.join(STATE_RANK)}")
    since, until = _when(values, "since"), _when(values, "until")
    if since and until and since >= until:
        raise FilterError("since must be before until")
    return TaskSearch(
        client=values.get("client"),
        state=state,
        pool=values.get("pool"),
        key=values.get("key"),
        since=since,
        until=until,
        after=_cursor(values["after"]) if "after" in values else None,
        limit=PAGE_SIZE,
    )


def _when(values: Mapping[str, str], name: str) -> datetime | None:
    text = values.get(name)
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{name}: {text!r} is not a time such as 2026-12-02T00:00") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # the browser's field has no zone


def cursor_of(task: TaskRecord) -> str:
    # The wire's cursors: the NATS client API pages with the same ones.
    return encode_cursor(task.submitted_at, task.task_id)


def _cursor(text: str) -> tuple[datetime, str]:
    try:
        return decode_cursor(text)
    except ValueError as exc:
        raise FilterError(f"after: {exc}") from None


def masked_env(env: Mapping[str, str] | None) -> dict[str, str]:
    return {k: ("•••" if SECRET_NAME.search(k) else v) for k, v in (env or {}).items()}


def _query_without(query: Mapping[str, str], *drop: str) -> str:
    return urlencode({k: v for k, v in query.items() if v and k not in drop})


def missing(task_id: str) -> str:
    return (
        f"no task {task_id!r} in the database (the projection lags a few seconds; "
        "check the id, CLIENT:KEY)"
    )


async def search_tasks(state: State, search: TaskSearch) -> list[TaskRecord]:
    result: list[TaskRecord] = await asyncio.wait_for(
        state.store.search_tasks(search), READ_TIMEOUT_S
    )
    return result


@get("/tasks", name="tasks")
async def tasks_page(request: Request[Any, Any, Any], state: State) -> Template:
    query = dict(request.query_params)
    error, tasks, search = "", [], None
    try:
        search = parse_filters(query)
        tasks = await search_tasks(state, search)
    except FilterError as exc:
        error = str(exc)
    except (TimeoutError, StoreError, OSError) as exc:
        error = f"the database did not answer ({exc or 'timeout'}): tasks cannot be listed now"
    status = HTTP_422_UNPROCESSABLE_ENTITY if error and search is None else 200
    more = len(tasks) == PAGE_SIZE
    return Template(
        template_name="tasks.html",
        context={
            "nav": "tasks",
            "tasks": tasks,
            "filters": query,
            "error": error,
            "states": list(STATE_RANK),
            "next_query": _query_without(query, "after") + f"&after={cursor_of(tasks[-1])}"
            if more
            else "",
            "first_query": _query_without(query, "after"),
            "paged": "after" in query,
        },
        status_code=status,
    )


# Keys may hold any printable character, `/` and `?` included: the id travels in the query.
@get("/task", name="task")
async def task_page(state: State, task_id: Annotated[str, QueryParameter(name="id")]) -> Template:
    runs: list[TaskRecord] = []
    error = ""
    try:
        runs = await asyncio.wait_for(state.store.task_runs(task_id), READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        error = f"the database did not answer ({exc or 'timeout'})"
    if not runs and not error:
        error = missing(task_id)
    task = runs[0] if runs else None
    return Template(
        template_name="task.html",
        context={
            "nav": "tasks",
            "task_id": task_id,
            "task": task,
            "runs": runs[1:],
            # Latest first, in order of run ids (a later submission of the key, or a retry,
            # has a larger one): the latest is run N of N.
            "run_count": len(runs),
            "env": masked_env(task.env if task else None),
            "error": error,
            "terminal": task is not None and task.state in TERMINAL_STATES,
            "terminal_states": TERMINAL_STATES,  # an earlier attempt short of them was redelivered
        },
        status_code=404 if task is None and not error.startswith("the database") else 200,
    )


def _message(text: str, status: int = 200, kind: str = "notice") -> Response[str]:
    return Response(
        f'<p class="{kind}" role="status">{escape(text)}</p>',
        status_code=status,
        media_type="text/html",
    )


CancelTarget = tuple[str, int | None]  # a task id and the run to cancel (None: every run so far)


async def latest_run(state: State, task_id: str) -> int | None:
    """The run a cancel of `task_id` names: its latest known one, if unfinished. None when the
    database does not answer, has no row yet or shows that run ended (a later one may not be
    projected yet): the request then cancels every run submitted until now."""
    try:
        record = await asyncio.wait_for(state.store.get_task(task_id), READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        log.warning("latest run of %s unknown (%s): cancelling every run so far", task_id, exc)
        return None
    if record is None or record.state in TERMINAL_STATES:
        return None
    return int(record.run)


async def send_cancels(
    request: Request[Any, Any, Any], targets: list[CancelTarget], what: str
) -> int:
    js = request.app.state.link.js
    if js is None:
        raise CancelFailed("NATS is unreachable: no cancel request was sent; try again later")
    kv = await js.key_value(names.CANCEL_BUCKET)
    # Each request names its run: a later run of the same task id is not cancelled by it. One
    # key holds a task id's request, so several runs of one id are one request for all so far.
    runs: dict[str, int | None] = {}
    for task_id, run in targets:
        runs[task_id] = run if task_id not in runs or runs[task_id] == run else None
    task_ids = list(runs)
    for task_id, run in runs.items():
        await request_cancel(kv, task_id, run)
    try:
        await record_action(
            request.app.state.store,
            actor=actor_of(request),
            action="task.cancel",
            target=what,
            details={"tasks": len(task_ids), "first": task_ids[:20]},
        )
    except Exception as exc:  # the cancel went out: a lost audit line is logged, not hidden
        log.warning("audit of task.cancel on %s not recorded: %s", what, exc)
    return len(task_ids)


class CancelFailed(TidegateError):
    """The cancel request could not be sent; nothing was cancelled."""


@post("/task/cancel", guards=[operator_only])
async def cancel_task(
    request: Request[Any, Any, Any], task_id: Annotated[str, QueryParameter(name="id")]
) -> Response[str]:
    try:
        run = await latest_run(request.app.state, task_id)
        await send_cancels(request, [(task_id, run)], task_id)
    except TidegateError as exc:
        return _message(str(exc), HTTP_503_SERVICE_UNAVAILABLE, "error")
    return _message(f"cancel requested for {task_id}: its process group is killed at once")


@post("/tasks/cancel", guards=[operator_only])
async def cancel_matching(request: Request[Any, Any, Any], data: Form) -> Response[str]:
    """Bulk cancel by filter: without `confirm`, answer how many it would touch."""
    try:
        search = parse_filters({k: v for k, v in data.items() if k not in ("after", "confirm")})
        unfinished = await unfinished_tasks(request.app.state, search)
    except FilterError as exc:
        return _message(str(exc), HTTP_422_UNPROCESSABLE_ENTITY, "error")
    except (TimeoutError, StoreError, OSError) as exc:
        return _message(f"the database did not answer ({exc or 'timeout'})", 503, "error")
    if len(unfinished) > BULK_MAX:
        return _message(
            f"more than {BULK_MAX} unfinished tasks match: narrow the filter", 422, "error"
        )
    if data.get("confirm") != str(len(unfinished)):
        # The count the operator confirms must still be the count: a changed set asks again.
        return Response(
            content=_confirm_form(data, len(unfinished)), media_type="text/html", status_code=200
        )
    try:
        targets: list[CancelTarget] = [(t.task_id, t.run) for t in unfinished]
        n = await send_cancels(request, targets, describe_search(search))
    except TidegateError as exc:
        return _message(str(exc), HTTP_503_SERVICE_UNAVAILABLE, "error")
    return _message(f"cancel requested for {n} tasks")


async def unfinished_tasks(state: State, search: TaskSearch) -> list[TaskRecord]:
    found: list[TaskRecord] = []
    page = msgspec.structs.replace(search, limit=1000, after=None)
    while len(found) <= BULK_MAX:
        batch = await search_tasks(state, page)
        found.extend(t for t in batch if t.state not in TERMINAL_STATES)
        if len(batch) < page.limit:
            break
        page = msgspec.structs.replace(page, after=(batch[-1].submitted_at, batch[-1].task_id))
    return found


def describe_search(search: TaskSearch) -> str:
    parts = [
        f"{k}={v}" for k, v in msgspec.structs.asdict(search).items() if v and k not in ("limit",)
    ]
    return "tasks where " + (", ".join(parts) or "any")


def _confirm_form(data: Mapping[str, str], count: int, action: str = "cancel") -> str:
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
        for k, v in data.items()
        if k not in ("confirm", "_csrf_token")
    )
    which = "unfinished" if action == "cancel" else "finished"
    if count == 0:
        return f'<p class="notice" role="status">No {which} task matches: nothing to {action}.</p>'
    return (
        f'<form hx-post="/tasks/{action}" hx-target="this" hx-swap="outerHTML" class="notice">'
        f'{hidden}<input type="hidden" name="confirm" value="{count}">'
        f"<strong>{action.capitalize()} {count} {which} task{'s' if count != 1 else ''}?</strong> "
        f'<button type="submit" name="confirm-{action}">Yes, {action} {count}</button></form>'
    )


@post("/task/retry", guards=[operator_only])
async def retry_task(
    request: Request[Any, Any, Any], task_id: Annotated[str, QueryParameter(name="id")]
) -> Response[str]:
    """Start the task's next run (see `console.retry`)."""
    try:
        done = await start_next_run(request.app.state, task_id, actor=actor_of(request))
    except RetryRefused as exc:
        return _message(str(exc), exc.status, "error")
    return _message(done.message)


@post("/tasks/retry", guards=[operator_only])
async def retry_matching(request: Request[Any, Any, Any], data: Form) -> Response[str]:
    """Bulk retry by filter (each finished task's next run): without `confirm`, the count."""
    try:
        search = parse_filters({k: v for k, v in data.items() if k not in ("after", "confirm")})
        task_ids = await finished_task_ids(request.app.state, search)
    except FilterError as exc:
        return _message(str(exc), HTTP_422_UNPROCESSABLE_ENTITY, "error")
    except (TimeoutError, StoreError, OSError) as exc:
        return _message(f"the database did not answer ({exc or 'timeout'})", 503, "error")
    if len(task_ids) > RETRY_BULK_MAX:
        return _message(
            f"more than {RETRY_BULK_MAX} finished tasks match: narrow the filter", 422, "error"
        )
    if data.get("confirm") != str(len(task_ids)):
        form = _confirm_form(data, len(task_ids), action="retry")
        return Response(content=form, media_type="text/html", status_code=200)
    try:
        done = await retry_many(
            request.app.state, task_ids, actor=actor_of(request), what=describe_search(search)
        )
    except RetryRefused as exc:
        return _message(str(exc), exc.status, "error")
    return _message(done.message)


ROUTES: list[ControllerRouterHandler] = [
    tasks_page,
    cancel_matching,
    retry_matching,
    task_page,
    cancel_task,
    retry_task,
]
