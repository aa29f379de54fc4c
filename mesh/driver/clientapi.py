"""The client API: a client system reads, lists and cancels its own tasks over NATS.

Every driver subscribes to `tg.api.*.*` in one queue group, so each request is answered by
one driver, whichever. The client is the subject's token (`tg.api.<client>.<op>`), never the
body's: with per-client publish permissions a client can only ever ask about its own tasks,
and a body naming another client's task id is refused before anything is read.

Nothing a request holds can stop this loop: an unknown client, a body that is not the
operation's schema, a database that does not answer within `READ_TIMEOUT_S` each get an
`ErrorReply` saying so (and a count in `tidegate_client_api_requests`); anything unforeseen
is logged and answered as `internal`. Reads go to PostgreSQL on a small pool of their own, so
a burst of client reads never takes the projector's or the notifier's connections; cancels
are written to the cancel bucket, as `tidegate task cancel` does, and need NATS only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.cancel import request_cancel
from tidegate.errors import StoreError
from tidegate.metrics import DriverMetrics
from tidegate.store.operators import record_action
from tidegate.store.rows import TaskRecord, TaskSearch
from tidegate.store.store import Store
from tidegate.wire import (
    API_OPS,
    TERMINAL_STATES,
    ApiReply,
    CancelReply,
    CancelTask,
    ClientRecord,
    ErrorCode,
    ErrorReply,
    GetTask,
    ListTasks,
    NotYours,
    PageReply,
    TaskReply,
    TaskState,
    decode_cursor,
    decode_request,
    encode,
    encode_cursor,
    target_task,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_TIMEOUT_S: Final = 3.0  # a read the database has not answered by then: "unavailable"
CONCURRENCY: Final = 32  # requests served at once by one driver; more wait in the subscription
# What reads that fail mean: the database is away, slow or refusing (not the request's fault).
_DATABASE_DOWN = (TimeoutError, StoreError, OSError)


def task_state(record: TaskRecord) -> TaskState:
    """What a client is told of its task: state and outcome, not the spec it sent."""
    return TaskState(
        task_id=record.task_id,
        client=record.client,
        key=record.key,
        run=record.run,
        state=record.state,
        attempt=record.attempt,
        pool=record.pool,
        executor=record.executor,
        exit_code=record.exit_code,
        reason=record.reason,
        log_tail=record.log_tail,
        labels=record.labels,
        submitted_at=record.submitted_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        updated_at=record.updated_at,
    )


def _error(code: ErrorCode, message: str) -> ErrorReply:
    return ErrorReply(code=code, message=message)


def _utc(at: datetime | None) -> datetime | None:
    return at if at is None or at.tzinfo else at.replace(tzinfo=UTC)


class ClientApi:
    def __init__(
        self,
        nc: NATS,
        store: Store,
        cancel_kv: KeyValue,
        clients: Callable[[str], ClientRecord | None],
        metrics: DriverMetrics,
        *,
        read_timeout_s: float = READ_TIMEOUT_S,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._nc = nc
        self._store = store
        self._cancel_kv = cancel_kv
        self._clients = clients
        self._metrics = metrics
        self._read_timeout_s = read_timeout_s
        self._concurrency = concurrency

    async def run(self) -> None:
        """Serve until cancelled; each request in a task of its own, at most `concurrency`."""
        sub = await self._nc.subscribe(names.API_ALL, queue=names.API_QUEUE)
        room = asyncio.Semaphore(self._concurrency)
        serving: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            serving.discard(task)
            room.release()

        try:
            async for msg in sub.messages:
                await room.acquire()
                task = asyncio.create_task(self._serve(msg), name="client-api request")
                serving.add(task)
                task.add_done_callback(done)
        finally:
            for task in list(serving):
                task.cancel()
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is closing with us
                log.debug("client API: unsubscribing failed (%r)", exc)

    async def _serve(self, msg: Msg) -> None:
        try:
            reply = await self.answer(msg.subject, msg.data)
        except Exception:
            log.exception("client API: request on %s failed", msg.subject)
            reply = _error("internal", "the driver failed to answer; it logged why: try again")
        parsed = names.parse_api_subject(msg.subject)
        op = parsed[1] if parsed is not None and parsed[1] in API_OPS else "other"
        result = reply.code if isinstance(reply, ErrorReply) else "ok"
        self._metrics.client_api.labels(op=op, result=result).inc()
        if not msg.reply:
            return  # published, not requested: nobody waits for an answer
        try:
            await msg.respond(encode(reply))
        except Exception as exc:  # the requester is gone, or our connection is
            log.warning("client API: answer on %s not sent (%r)", msg.subject, exc)

    async def answer(self, subject: str, data: bytes) -> ApiReply:
        """The reply to one request; raises only for what nobody foresaw."""
        parsed = names.parse_api_subject(subject)
        if parsed is None:
            return _error("bad_request", f"{subject!r} is not tg.api.<client>.<operation>")
        client, op = parsed
        if self._clients(client) is None:
            return _error(
                "unknown_client",
                f"client {client!r} is not registered: an operator registers it with "
                f"`tidegate client add {client}`",
            )
        try:
            request = decode_request(op, data)
            if isinstance(request, GetTask):
                return await self._get(client, request)
            if isinstance(request, ListTasks):
                return await self._list(client, request)
            return await self._cancel(client, request)
        except NotYours as exc:
            return _error("not_yours", f"{exc}: a client reads and cancels only its own tasks")
        except ValueError as exc:  # msgspec's DecodeError and ValidationError are ValueErrors
            return _error("bad_request", f"{op}: {exc}")
        except _DATABASE_DOWN as exc:
            return _error(
                "database_unavailable",
                f"the database did not answer ({exc or 'timeout'}): reads need PostgreSQL; "
                "try again later",
            )

    async def _read(self, read: Awaitable[T]) -> T:
        return await asyncio.wait_for(read, self._read_timeout_s)

    async def _get(self, client: str, request: GetTask) -> TaskReply:
        record = await self._read(self._store.get_task(target_task(client, request)))
        return TaskReply(task=None if record is None else task_state(record))

    async def _list(self, client: str, request: ListTasks) -> PageReply:
        since, until = _utc(request.since), _utc(request.until)
        if since and until and since >= until:
            raise ValueError("since must be before until")
        search = TaskSearch(
            client=client,  # the subject's: a client lists only its own tasks
            state=request.state,
            pool=request.pool,
            key=request.key_prefix,
            since=since,
            until=until,
            after=decode_cursor(request.after) if request.after else None,
            limit=request.limit,
        )
        found = await self._read(self._store.search_tasks(search))
        last = found[-1] if len(found) == request.limit else None
        return PageReply(
            tasks=[task_state(t) for t in found],
            next=None if last is None else encode_cursor(last.submitted_at, last.task_id),
        )

    async def _cancel(self, client: str, request: CancelTask) -> ApiReply:
        task_id = target_task(client, request)
        run, state, known = request.run, None, True
        try:
            record = await self._read(self._store.get_task(task_id))
        except _DATABASE_DOWN as exc:
            # Cancelling needs NATS only: without the latest run the request names none,
            # and cancels every run submitted until now (never a later one).
            log.warning("client API: latest run of %s unknown (%s)", task_id, exc)
            record, known = None, False
        if record is not None:
            state = record.state
            if run is None and record.state not in TERMINAL_STATES:
                run = record.run  # a later run of the same key is not cancelled by this one
        try:
            await request_cancel(self._cancel_kv, task_id, run)
        except Exception as exc:
            return _error(
                "nats_unavailable",
                f"the cancel request for {task_id} was not stored ({exc!r}): try again "
                "(sending it twice is safe)",
            )
        if known:  # the database answered a moment ago: the audit line goes in too
            await self._audit(client, task_id, run)
        which = "every run submitted until now" if run is None else f"run {run}"
        return CancelReply(
            task_id=task_id,
            run=run,
            state=state,
            message=f"cancel requested for {task_id} ({which}): a running process group is "
            "killed, a queued task is cancelled when an executor takes it",
        )

    async def _audit(self, client: str, task_id: str, run: int | None) -> None:
        try:
            await record_action(
                self._store,
                actor=f"client:{client}",
                action="task.cancel",
                target=task_id,
                details={"run": run, "via": "nats"},
            )
        except Exception as exc:  # the cancel went out: a lost audit line is logged, not hidden
            log.warning("audit of task.cancel on %s not recorded: %s", task_id, exc)
