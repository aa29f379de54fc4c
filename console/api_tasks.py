"""The JSON API's tasks: HTTP submission for client systems that cannot speak NATS, and the
Tasks pages' reads and cancels.

Submission is the bus's, not a second way in: the body is the wire's task spec, decoded and
checked by `tidegate.wire` exactly as the driver will, and published by the SDK's publisher
with `Nats-Msg-Id: <client>:<key>`, so the stream's dedup window makes a repeated key run
once. The answer is the receipt (`task_id`, `seq`, `duplicate`): 201 for a new task, 200 with
`duplicate: true` for a key JetStream already holds. As on the bus, a paused client's tasks
are accepted and wait; an unregistered client's are refused.

A client's token sees only its own client: its task filters are held to it, and another
client's task id is refused (403) before anything is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromQuery, JSONBody, QueryParameter
from litestar.response import Response
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler
from nats.aio.client import Client as NATS

from tidegate.bus.publish import Publisher
from tidegate.bus.submit import check_registered, task_message
from tidegate.console import tasks
from tidegate.console.api_auth import cancellers, check_own_task, clients_only, own_client
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.link import BusLink
from tidegate.errors import StoreError, TidegateError
from tidegate.store.rows import TaskRecord
from tidegate.wire import TaskSpec, decode_spec, task_id

PAGE_MAX: Final = 500
PUBLISH_TIMEOUT_S: Final = 2.0
PUBLISH_RETRIES: Final = 2
REGISTERED_FOR_S: Final = 5.0  # how long a client found in the mirror is not looked up again
NATS_DOWN: Final = (
    "NATS is unreachable: the task was not accepted; submit it again later (the same key is safe)"
)


# --- submitting ----------------------------------------------------------------------------------


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """The acceptance of a task: JetStream stored it (or already held its key)."""

    task_id: str
    seq: int  # the submission's sequence in TG_TASKS
    duplicate: bool  # JetStream already held this key: it runs once, not twice


class Submitter:
    """Publishes HTTP submissions as the SDK does, on the console's own NATS connection: one
    pipelined publisher (one inbox) for every client."""

    def __init__(self, link: BusLink) -> None:
        self._link = link
        self._publisher: Publisher | None = None
        self._registered: dict[str, float] = {}  # client -> when the mirror last had it

    def _publisher_of(self, nc: NATS) -> Publisher:
        # The link's connection is made once and reconnects in place, so one publisher (and
        # its inbox subscription, which nats-py restores on reconnect) serves for good.
        if self._publisher is None:
            self._publisher = Publisher(nc, timeout=PUBLISH_TIMEOUT_S, retries=PUBLISH_RETRIES)
        return self._publisher

    async def _check_registered(self, client: str) -> None:
        js = self._link.js
        if js is None:
            raise ApiError(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
        seen = self._registered.get(client)
        if seen is not None and time.monotonic() - seen < REGISTERED_FOR_S:
            return
        try:
            await asyncio.wait_for(check_registered(js, client), PUBLISH_TIMEOUT_S)
        except TidegateError:
            raise
        except Exception as exc:
            raise ApiError(
                HTTP_503_SERVICE_UNAVAILABLE, f"{NATS_DOWN} ({exc or 'timeout'})"
            ) from None
        self._registered[client] = time.monotonic()

    async def submit(self, client: str, spec: TaskSpec, *, max_task_bytes: int) -> Receipt:
        """Raises `UnknownClient`, `InvalidTask`, or `SubmitError` (no PubAck: it may be stored;
        the same key again is safe)."""
        await self._check_registered(client)
        out = task_message(client, spec, max_task_bytes=max_task_bytes)
        nc = self._link.nc
        if nc is None or not nc.is_connected:
            raise ApiError(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
        ack = await self._publisher_of(nc).publish(out)
        return Receipt(task_id=task_id(client, spec.key), seq=ack.seq, duplicate=ack.duplicate)

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()


async def read_limited(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: never read whole."""
    too_large = ApiError(
        HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        f"the task is larger than {limit} bytes, the limit (TIDEGATE_MAX_TASK_BYTES); "
        "nothing was accepted",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_SCHEMA_KEYS: Final = {
    "title": "title",
    "description": "description",
    "pattern": "pattern",
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "default": "default",
    "required": "required",
}


def openapi_schema(json_schema: Mapping[str, Any]) -> Schema:
    """msgspec's JSON Schema of a flat struct as an OpenAPI schema object."""
    kwargs: dict[str, Any] = {
        _SCHEMA_KEYS[k]: v for k, v in json_schema.items() if k in _SCHEMA_KEYS
    }
    if "type" in json_schema:
        kwargs["type"] = OpenAPIType(json_schema["type"])
    if "properties" in json_schema:
        kwargs["properties"] = {k: openapi_schema(v) for k, v in json_schema["properties"].items()}
    if "items" in json_schema:
        kwargs["items"] = openapi_schema(json_schema["items"])
    if "anyOf" in json_schema:
        kwargs["any_of"] = [openapi_schema(v) for v in json_schema["anyOf"]]
    extra = json_schema.get("additionalProperties")
    if extra is not None:
        kwargs["additional_properties"] = (
            extra if isinstance(extra, bool) else openapi_schema(extra)
        )
    return Schema(**kwargs)


@dataclass
class SubmitOperation(Operation):
    """The submit route reads its body itself (the bus's decoding, within the size limit), so
    Litestar cannot see it: its OpenAPI operation names the wire's `TaskSpec` as the body."""

    def __post_init__(self) -> None:
        schema = msgspec.json.schema(TaskSpec)["$defs"]["TaskSpec"]
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=openapi_schema(schema))},
            description="the wire's task spec, as published to `tg.submit.<client>`",
            required=True,
        )


def decode_task(body: bytes) -> TaskSpec:
    """The bus's decoding (`InvalidTask`, 422, with the driver's reason), after telling a body
    that is not JSON at all (400) from a task that breaks a rule."""
    if not body.strip():
        raise ApiError(HTTP_400_BAD_REQUEST, "the body is empty: send the task spec as JSON")
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(HTTP_400_BAD_REQUEST, f"malformed JSON: {exc}") from None
    return decode_spec(body)


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
    task: TaskRecord  # the latest run
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


async def _send(request: Request[Any, Any, Any], task_ids: list[str], what: str) -> int:
    try:
        return await tasks.send_cancels(request, task_ids, what)
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
    await _send(request, [task], task)
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
    sent = await _send(request, [t.task_id for t in unfinished], tasks.describe_search(search))
    return CancelOut(matched=n, requested=sent, message=f"cancel requested for {sent} tasks")


ROUTES: list[ControllerRouterHandler] = [
    submit,
    list_tasks,
    show_task,
    cancel_task,
    cancel_matching,
]
