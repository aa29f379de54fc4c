"""Retrying a task: an operator's retry starts the task's next run.

The spec of the task's latest run is submitted again on the client's subject, under a
`Nats-Msg-Id` that no earlier publish used (`names.retry_msg_id`), so the submission dedup
lets it through; the route step takes it as the same task (the id is the key's) and gives it
the next run, whose id is the new submission's sequence, the PubAck's `seq`. From there it is
a submission like any other: a paused client's retry waits, a cap or rate holds it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Final

import msgspec
from litestar.datastructures import State
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from tidegate import names
from tidegate.bus.publish import Outgoing, PubAck
from tidegate.errors import StoreError, TidegateError
from tidegate.store.operators import record_action
from tidegate.store.rows import TaskRecord, TaskSearch
from tidegate.wire import TERMINAL_STATES, encode

log = logging.getLogger(__name__)

READ_TIMEOUT_S: Final = 3.0
RETRY_BULK_MAX: Final = 1000  # tasks one bulk retry may touch (each is two reads and a publish)
PUBLISH_TIMEOUT_S: Final = 5.0


class RetryRefused(TidegateError):
    """A retry that was not started; the message says why, and `status` how the API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RetryOut(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    run: int  # the new run's id (its submission's sequence in TG_TASKS)
    previous_run: int  # the run it follows
    message: str


async def start_next_run(state: State, task_id: str, *, actor: str, audit: bool = True) -> RetryOut:
    """Submit the task's spec again as its next run; raises `RetryRefused`."""
    try:
        runs = await asyncio.wait_for(state.store.task_runs(task_id), READ_TIMEOUT_S)
        spec = await asyncio.wait_for(state.store.task_spec(task_id), READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        raise RetryRefused(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"the database did not answer ({exc or 'timeout'}): nothing was retried",
        ) from None
    if not runs:
        raise RetryRefused(
            HTTP_404_NOT_FOUND,
            f"no task {task_id!r} in the database (the projection lags a few seconds; "
            "check the id, CLIENT:KEY)",
        )
    latest = runs[0]
    if latest.state not in TERMINAL_STATES:
        raise RetryRefused(
            HTTP_409_CONFLICT,
            f"{task_id} is still {latest.state} (run {latest.run}): cancel it first, or wait "
            "until it ends; nothing was retried",
        )
    if spec is None:
        raise RetryRefused(
            HTTP_409_CONFLICT,
            f"{task_id} has no known spec (it was rejected before its body could be read): "
            "its client must submit it again; nothing was retried",
        )
    out = Outgoing(
        subject=names.submit_subject(latest.client),
        payload=encode(spec),
        msg_id=names.retry_msg_id(latest.client, spec.key, uuid.uuid4().hex),
    )
    ack = await _publish(state, out)
    if audit:
        await _audit(state, actor, task_id, {"previous_run": latest.run, "run": ack.seq})
    return RetryOut(
        task_id=task_id,
        run=ack.seq,
        previous_run=latest.run,
        message=f"{task_id}: retry submitted as its next run ({ack.seq})",
    )


async def _publish(state: State, out: Outgoing) -> PubAck:
    nc = state.link.nc
    if nc is None or not nc.is_connected:
        raise RetryRefused(
            HTTP_503_SERVICE_UNAVAILABLE, "NATS is unreachable: nothing was retried; try again"
        )
    try:
        ack: PubAck = await asyncio.wait_for(
            state.submitter.publisher(nc).publish(out), PUBLISH_TIMEOUT_S
        )
    except Exception as exc:
        # A retry sent again gets a new id, so it may start one run more: say so.
        raise RetryRefused(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"NATS did not confirm the retry ({exc or 'timeout'}): it may have been stored; "
            "look at the task before retrying again",
        ) from None
    return ack


async def _audit(state: State, actor: str, target: str, details: dict[str, Any]) -> None:
    try:
        await record_action(
            state.store, actor=actor, action="task.retry", target=target, details=details
        )
    except Exception as exc:  # the retry went out: a lost audit line is logged, not hidden
        log.warning("audit of task.retry on %s not recorded: %s", target, exc)


# --- in bulk, by filter ----------------------------------------------------------------------


class BulkRetryOut(msgspec.Struct, frozen=True, kw_only=True):
    matched: int  # finished tasks the filter covers
    retried: int  # next runs started (0 until confirmed)
    skipped: int  # whose latest run had not ended, or had no spec, by the time of the retry
    message: str


async def finished_task_ids(state: State, search: TaskSearch) -> list[str]:
    """The task ids of the filter's finished runs, each once, newest first (at most one more
    than `RETRY_BULK_MAX`, enough to refuse a larger set)."""
    found: dict[str, None] = {}
    page = msgspec.structs.replace(search, limit=1000, after=None)
    while len(found) <= RETRY_BULK_MAX:
        batch: list[TaskRecord] = await asyncio.wait_for(
            state.store.search_tasks(page), READ_TIMEOUT_S
        )
        found.update((t.task_id, None) for t in batch if t.state in TERMINAL_STATES)
        if len(batch) < page.limit:
            break
        page = msgspec.structs.replace(page, after=(batch[-1].submitted_at, batch[-1].task_id))
    return list(found)


async def retry_many(state: State, task_ids: list[str], *, actor: str, what: str) -> BulkRetryOut:
    """Start the next run of each task; one whose latest run has not ended is skipped. A
    database or NATS that stops answering ends the batch (the answer says how far it got)."""
    retried: list[str] = []
    skipped = 0
    try:
        for task_id in task_ids:
            try:
                await start_next_run(state, task_id, actor=actor, audit=False)
            except RetryRefused as exc:
                if exc.status == HTTP_503_SERVICE_UNAVAILABLE:
                    raise RetryRefused(
                        exc.status, f"{exc} (after retrying {len(retried)} of {len(task_ids)})"
                    ) from None
                skipped += 1
            else:
                retried.append(task_id)
    finally:
        if retried:
            await _audit(state, actor, what, {"tasks": len(retried), "first": retried[:20]})
    return BulkRetryOut(
        matched=len(task_ids),
        retried=len(retried),
        skipped=skipped,
        message=f"retry submitted for {len(retried)} tasks, as their next run"
        + (f"; {skipped} skipped (not ended, or no spec)" if skipped else ""),
    )
