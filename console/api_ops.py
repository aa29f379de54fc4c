"""The JSON API's operations pages: overview figures, executors, callbacks, the audit log, and
who the caller is.

Each route calls the page module's own logic (`collect`, `change`, `retry_one`, `load_page`,
…) and answers its result as JSON; what a page shows as a notice on the page (a server that
did not answer, a bad filter) is an error status here, with the same words.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_409_CONFLICT
from litestar.types import ControllerRouterHandler

from tidegate.console import audit, callbacks, executors
from tidegate.console.api_auth import by_token, staff_only
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.auth import ClientCaller, Operator, operator_only
from tidegate.console.figures import Overview, collect
from tidegate.console.overview import history_of
from tidegate.store import callbacks as cb
from tidegate.store.operators import AuditEntry
from tidegate.wire import ExecutorControl, Heartbeat

Ask = Annotated[str, QueryParameter(name="id", description="the executor's id")]


def _strings(**values: object) -> dict[str, str]:
    """Typed parameters back into the query mapping a page's parser reads."""
    return {k: str(v) for k, v in values.items() if v is not None}


def _said(error: str, detail: str) -> str:
    return f"{error} ({detail})" if detail else error


# --- who is asking -------------------------------------------------------------------------------


class Me(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the operator's username, or token:NAME
    role: Literal["operator", "viewer", "client"]
    client: str | None  # a client token's client
    via: Literal["token", "session"]


@get(
    "/me",
    summary="Who this token (or session) is, and what it may do",
    responses=errors(401),
)
async def me(request: Request[Any, Any, Any]) -> Me:
    user = request.user
    via: Literal["token", "session"] = "token" if by_token(request.scope) else "session"
    if isinstance(user, ClientCaller):
        return Me(name=user.username, role="client", client=user.client, via=via)
    assert isinstance(user, Operator)
    return Me(name=user.username, role=user.role, client=None, via=via)


# --- overview ------------------------------------------------------------------------------------


@get(
    "/overview",
    guards=[staff_only],
    summary="The overview's figures, rates and charts",
    responses=errors(401, 403),
)
async def overview(request: Request[Any, Any, Any]) -> Overview:
    state = request.app.state
    return await collect(state.store, state.link.js, history_of(state))


# --- executors -----------------------------------------------------------------------------------


class ExecutorOut(msgspec.Struct, frozen=True, kw_only=True):
    executor_id: str
    state: str  # active | cordoned | draining | drained ("" when not running, not cordoned)
    pending: str  # what was asked and is not in effect yet, in words
    cordoned: bool  # as the operator asked (the control key wins over the heartbeat)
    late: bool  # the heartbeat is older than two intervals
    heartbeat_age: str
    heartbeat: Heartbeat | None  # null: not running (listed for its cordon)
    control: ExecutorControl | None


class ExecutorList(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    executors: list[ExecutorOut]
    slots_used: int
    slots_total: int
    problems: list[str]


class Done(msgspec.Struct, frozen=True):
    message: str


@get(
    "/executors",
    guards=[staff_only],
    summary="Every executor, live from its heartbeat",
    responses=errors(401, 403),
)
async def list_executors(request: Request[Any, Any, Any]) -> ExecutorList:
    state = request.app.state
    page = await executors.collect(state.link.js, interval_s=executors.interval_of(state))
    rows = [
        ExecutorOut(
            executor_id=e.executor_id,
            state=e.state,
            pending=e.pending,
            cordoned=e.cordoned,
            late=e.late,
            heartbeat_age=e.age,
            heartbeat=e.heartbeat,
            control=e.control,
        )
        for e in page.rows
    ]
    return ExecutorList(
        at=page.at,
        executors=rows,
        slots_used=page.used,
        slots_total=page.total,
        problems=page.problems,
    )


_EXECUTOR_ERRORS = errors(400, 401, 403, 404, 409, 503)


@post(
    "/executors/cordon",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Cordon an executor (?id=): it takes no new work",
    responses=_EXECUTOR_ERRORS,
)
async def cordon(request: Request[Any, Any, Any], executor_id: Ask) -> Done:
    return Done(await executors.change(request, executor_id, "cordon"))


@post(
    "/executors/uncordon",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Uncordon an executor (?id=)",
    responses=_EXECUTOR_ERRORS,
)
async def uncordon(request: Request[Any, Any, Any], executor_id: Ask) -> Done:
    return Done(await executors.change(request, executor_id, "uncordon"))


@post(
    "/executors/drain",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Drain an executor (?id=): cordon, let running tasks finish, exit",
    responses=_EXECUTOR_ERRORS,
)
async def drain(request: Request[Any, Any, Any], executor_id: Ask) -> Done:
    return Done(await executors.change(request, executor_id, "drain"))


# --- callbacks -----------------------------------------------------------------------------------


class CallbackList(msgspec.Struct, frozen=True, kw_only=True):
    summary: list[cb.ClientCallbacks]
    outbox: list[cb.OutboxEntry]  # oldest first
    dead: list[cb.DeadLetterEntry]  # newest first
    next_after: int | None  # `after` for the outbox's next page
    next_dead_before: int | None  # `dead_before` for the dead letters' next page


class Bulk(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A bulk change: without `confirm`, the answer counts what it would touch; send again
    with that `confirm` and `upto` to make it."""

    client: str | None = None
    confirm: int | None = None
    upto: int | None = None


class CallbackAnswer(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    confirm: int | None = None  # to confirm a bulk change: send these two back
    upto: int | None = None


async def _answer(request: Request[Any, Any, Any], answer: callbacks.Answer) -> CallbackAnswer:
    await callbacks.audit_answer(request, answer)
    if answer.template == "callbacks_confirm.html":
        scope: cb.Scope = answer.context["scope"]
        if answer.context["changed"]:
            raise ApiError(
                HTTP_409_CONFLICT,
                f"the callbacks changed since they were counted; nothing was changed: now "
                f"{scope.count} (confirm {scope.count}, upto {scope.upto})",
            )
        return CallbackAnswer(
            message=f"{scope.count} callbacks match; nothing was changed yet: send again with "
            "these confirm and upto",
            confirm=scope.count,
            upto=scope.upto,
        )
    text = str(answer.context["text"])
    if answer.status >= 400:
        raise ApiError(answer.status, text)
    return CallbackAnswer(message=text)


def _bulk_form(data: JSONBody[Bulk]) -> dict[str, str]:
    return _strings(client=data.client, confirm=data.confirm, upto=data.upto)


@get(
    "/callbacks",
    guards=[staff_only],
    summary="The callback outbox and dead letters, paged",
    responses=errors(400, 401, 403, 422, 503),
)
async def list_callbacks(
    request: Request[Any, Any, Any],
    client: FromQuery[str | None] = None,
    after: FromQuery[int | None] = None,
    dead_before: FromQuery[int | None] = None,
) -> CallbackList:
    raw = _strings(client=client, after=after, dead_before=dead_before)
    page, status = await callbacks.page_for(request.app.state.store, raw)
    if page.error:
        raise ApiError(status if status >= 400 else 503, _said(page.error, page.detail))
    return CallbackList(
        summary=page.summary,
        outbox=page.outbox,
        dead=page.dead,
        next_after=page.next_after,
        next_dead_before=page.next_dead_before,
    )


_CHANGE_ERRORS = errors(400, 401, 403, 404, 409, 422, 503)


@post(
    "/callbacks/outbox/{row_id:int}/retry",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Retry one outbox callback now (with the earlier ones of its client)",
    responses=_CHANGE_ERRORS,
)
async def retry_row(request: Request[Any, Any, Any], row_id: FromPath[int]) -> CallbackAnswer:
    return await _answer(request, await callbacks.retry_one(request.app.state.store, row_id))


@post(
    "/callbacks/outbox/retry",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Retry a client's (or every) outbox callback now",
    responses=_CHANGE_ERRORS,
)
async def retry_rows(request: Request[Any, Any, Any], data: JSONBody[Bulk]) -> CallbackAnswer:
    store = request.app.state.store
    return await _answer(request, await callbacks.retry_bulk(store, _bulk_form(data)))


@post(
    "/callbacks/dead/{dead_id:int}/redrive",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Re-drive one callback dead letter into the outbox",
    responses=_CHANGE_ERRORS,
)
async def redrive_row(request: Request[Any, Any, Any], dead_id: FromPath[int]) -> CallbackAnswer:
    return await _answer(request, await callbacks.redrive_one(request.app.state.store, dead_id))


@post(
    "/callbacks/dead/redrive",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Re-drive a client's callback dead letters (`client` required)",
    responses=_CHANGE_ERRORS,
)
async def redrive_rows(request: Request[Any, Any, Any], data: JSONBody[Bulk]) -> CallbackAnswer:
    store = request.app.state.store
    return await _answer(request, await callbacks.redrive_bulk(store, _bulk_form(data)))


# --- audit ---------------------------------------------------------------------------------------


class AuditList(msgspec.Struct, frozen=True, kw_only=True):
    entries: list[AuditEntry]  # newest first
    next_before: int | None  # `before` for the next page
    scanned: int  # lines read for this page
    window_ended: bool  # a filtered page stopped at the scan window: go on with next_before


@get(
    "/audit",
    guards=[staff_only],
    summary="Who did what, newest first; filter by actor, action prefix, target",
    responses=errors(400, 401, 403, 422, 503),
)
async def list_audit(
    request: Request[Any, Any, Any],
    actor: FromQuery[str | None] = None,
    action: FromQuery[str | None] = None,
    target: FromQuery[str | None] = None,
    before: FromQuery[int | None] = None,
) -> AuditList:
    raw = _strings(actor=actor, action=action, target=target, before=before)
    page, status = await audit.load_page(request.app.state.store, raw)
    if page.error:
        raise ApiError(status if status >= 400 else 503, _said(page.error, page.detail))
    return AuditList(
        entries=page.entries,
        next_before=page.next_before,
        scanned=page.scanned,
        window_ended=page.window_ended,
    )


ROUTES: list[ControllerRouterHandler] = [
    me,
    overview,
    list_executors,
    cordon,
    uncordon,
    drain,
    list_callbacks,
    retry_row,
    retry_rows,
    redrive_row,
    redrive_rows,
    list_audit,
]
