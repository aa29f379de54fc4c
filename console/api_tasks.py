"""The JSON API's tasks: HTTP submission for client systems that cannot speak NATS, and the
Tasks pages' reads and cancels.

Submission is the bus's, not a second way in: the body is the wire's task spec, decoded and
checked by `tidegate.wire` exactly as the driver will, and published by the SDK's publisher
with `Nats-Msg-Id: <client>:<key>`, so the stream's dedup window makes a repeated key run
once. The answer is the receipt (`task_id`, `seq`, `duplicate`): 201 for a new task, 200 with
`duplicate: true` for a key JetStream already holds. As on the bus, a paused client's tasks
are accepted and wait; an unregistered client's are refused. Its parts are in submitter.py.

A client's token sees only its own client: its task filters are held to it, and another
client's task id is refused (403) before anything is read.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromQuery, JSONBody, QueryParameter
from litestar.response import Response
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_404_NOT_FOUND,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler

from tidegate.console import tasks
from tidegate.console.api_auth import cancellers, check_own_task, clients_only, own_client
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.submitter import (
    Receipt,
    SubmitOperation,
    Submitter,
    decode_task,
    read_limited,
)
from tidegate.errors import StoreError, TidegateError
from tidegate.store.rows import TaskRecord

PAGE_MAX: Final = 500


# --- submitting ----------------------------------------------------------------------------------


@post(
    "/tasks",
    guards=[clients_only],
    status_code=HTTP_201_CREATED,
    operation_class=SubmitOperation,
    summary="Submit a task (a client's token)",
    description=(
        "The body is the wire's task spec (the JSON published to `tg.submit.<client>`); the "
        "client is the token's. 201: accepted; 200 with `duplicate: true`: this key was "
        "accepted already and runs once."
    ),
    responses=errors(400, 401, 403, 404, 413, 422, 503),
)
async def submit(request: Request[Any, Any, Any], state: State) -> Response[Receipt]:
    client: str = request.user.client  # clients_only: a ClientCaller
    limit = int(state.settings.limits.max_task_bytes)
    spec = decode_task(await read_limited(request, limit))
    submitter: Submitter = state.submitter
    receipt = await submitter.submit(client, spec, max_task_bytes=limit)
    return Response(receipt, status_code=HTTP_200_OK if receipt.duplicate else HTTP_201_CREATED)


# --- reading -------------------------------------------------------------------------------------


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    tasks: list[TaskRecord]  # newest first; secret-looking environment values masked
    next: str | None  # `after` for the next page; null on the last page


class TaskDetail(msgspec.Struct, frozen=True, kw_only=True):
    task: TaskRecord  # the latest run; each run lists its attempts (`attempts`), newest first
    runs: list[TaskRecord]  # the earlier runs, newest first


def _masked(task: TaskRecord) -> TaskRecord:
    return msgspec.structs.replace(task, env=tasks.masked_env(task.env) if task.env else task.env)


def _unreachable(exc: BaseException) -> ApiError:
    return ApiError(
        HTTP_503_SERVICE_UNAVAILABLE, f"the database did not answer ({exc or 'timeout'})"
    )


@get(
    "/tasks",
    summary="List tasks, newest first, paged by keyset",
    responses=errors(400, 401, 403, 422, 503),
)
async def list_tasks(
    request: Request[Any, Any, Any],
    client: FromQuery[str | None] = None,
    state_filter: Annotated[str | None, QueryParameter(name="state")] = None,
    pool: FromQuery[str | None] = None,
    key: Annotated[str | None, QueryParameter(description="a prefix of the key")] = None,
    since: Annotated[
        str | None, QueryParameter(description="ISO time, submitted at or after")
    ] = None,
    until: Annotated[str | None, QueryParameter(description="ISO time, submitted before")] = None,
    after: Annotated[
        str | None, QueryParameter(description="the `next` of the previous page")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=PAGE_MAX)] = tasks.PAGE_SIZE,
) -> TaskList:
    query = {
        "client": own_client(request.user, client),
        "state": state_filter,
        "pool": pool,
        "key": key,
        "since": since,
        "until": until,
        "after": after,
    }
    search = tasks.parse_filters({k: v for k, v in query.items() if v is not None})
    search = msgspec.structs.replace(search, limit=limit)
    try:
        found = await tasks.search_tasks(request.app.state, search)
    except (TimeoutError, StoreError, OSError) as exc:
        raise _unreachable(exc) from None
    more = len(found) == limit
    return TaskList(
        tasks=[_masked(t) for t in found], next=tasks.cursor_of(found[-1]) if more else None
    )


@get(
    "/task",
    summary="One task: its latest run and the earlier ones (?id=CLIENT:KEY)",
    description="The id travels in the query: keys may hold `/`, `?` and other characters.",
    responses=errors(400, 401, 403, 404, 503),
)
async def show_task(
    request: Request[Any, Any, Any],
    task: Annotated[str, QueryParameter(name="id", description="the task id, CLIENT:KEY")],
) -> TaskDetail:
    check_own_task(request.user, task)
    try:
        runs = await asyncio.wait_for(request.app.state.store.task_runs(task), tasks.READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        raise _unreachable(exc) from None
    if not runs:
        raise ApiError(HTTP_404_NOT_FOUND, tasks.missing(task))
    return TaskDetail(task=_masked(runs[0]), runs=[_masked(r) for r in runs[1:]])


# --- cancelling ----------------------------------------------------------------------------------


class CancelOut(msgspec.Struct, frozen=True, kw_only=True):
    matched: int  # unfinished tasks the request covers
    requested: int  # cancel requests sent (0 until confirmed, for a filter)
    message: str


class CancelMatching(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every unfinished task of a filter. Without `confirm` nothing is cancelled: the answer
    says how many match; send again with `confirm` set to that count to cancel them."""

    client: str | None = None
    state: str | None = None
    pool: str | None = None
    key: str | None = None
    since: str | None = None
    until: str | None = None
    confirm: int | None = None


async def _send(
    request: Request[Any, Any, Any], targets: list[tasks.CancelTarget], what: str
) -> int:
    try:
        return await tasks.send_cancels(request, targets, what)
    except TidegateError:
        raise
    except Exception as exc:  # NATS went away between the check and the writes
        raise ApiError(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"NATS did not answer ({exc or 'timeout'}): some cancel requests may not have been "
            "sent; sending them again is safe",
        ) from None


@post(
    "/tasks/cancel",
    guards=[cancellers],
    status_code=HTTP_200_OK,
    summary="Cancel one queued or running task (?id=CLIENT:KEY)",
    responses=errors(400, 401, 403, 503),
)
async def cancel_task(
    request: Request[Any, Any, Any],
    task: Annotated[str, QueryParameter(name="id", description="the task id, CLIENT:KEY")],
) -> CancelOut:
    check_own_task(request.user, task)
    # The latest run: a request for it does not cancel a later run of the same task id.
    run = await tasks.latest_run(request.app.state, task)
    await _send(request, [(task, run)], task)
    return CancelOut(
        matched=1, requested=1, message=f"cancel requested for {task}: its process group is killed"
    )


@post(
    "/tasks/cancel-matching",
    guards=[cancellers],
    status_code=HTTP_200_OK,
    summary="Cancel every unfinished task of a filter, after a confirmation with the count",
    responses=errors(400, 401, 403, 422, 503),
)
async def cancel_matching(
    request: Request[Any, Any, Any], data: JSONBody[CancelMatching]
) -> CancelOut:
    filters = msgspec.structs.asdict(data)
    confirm = filters.pop("confirm")
    filters["client"] = own_client(request.user, data.client)
    search = tasks.parse_filters({k: v for k, v in filters.items() if v is not None})
    try:
        unfinished = await tasks.unfinished_tasks(request.app.state, search)
    except (TimeoutError, StoreError, OSError) as exc:
        raise _unreachable(exc) from None
    n = len(unfinished)
    if n > tasks.BULK_MAX:
        raise ApiError(422, f"more than {tasks.BULK_MAX} unfinished tasks match: narrow the filter")
    if confirm != n:
        # The count confirmed must still be the count: a changed set is asked about again.
        return CancelOut(
            matched=n,
            requested=0,
            message=f"{n} unfinished tasks match; nothing was cancelled: send again with "
            f'"confirm": {n} to cancel them',
        )
    targets: list[tasks.CancelTarget] = [(t.task_id, t.run) for t in unfinished]
    sent = await _send(request, targets, tasks.describe_search(search))
    return CancelOut(matched=n, requested=sent, message=f"cancel requested for {sent} tasks")


ROUTES: list[ControllerRouterHandler] = [
    submit,
    list_tasks,
    show_task,
    cancel_task,
    cancel_matching,
]
