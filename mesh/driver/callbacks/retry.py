"""The retry job: drain the callback outbox, per client in order, from any number of drivers.

Each pass takes the clients whose oldest row is due and works on them concurrently, each in its
own transaction under that client's advisory lock (a client another driver is working on is
skipped). Within a client, rows go out laned by task, like the notifier's callbacks: a task's
rows one after another in id order, different tasks' concurrently (up to `concurrency`
requests); the first failure starts nothing more for that client in this pass, so nothing of a
task overtakes its callback that is backing off, and the client waits behind that oldest
failure (its head) as before. A down endpoint therefore costs
at most one timeout per pass, and only its own client's.

Delivered rows are deleted when the pass's transaction commits. A pass that never commits (its
driver frozen or cut off after sending) leaves them to be sent again, a task's older states
after its newer ones: so each delivery is recorded in the notifier's shared fence bucket
(mesh/driver/fence.py, under the retry job's own keys) before the commit, and a row whose state
is not newer than one delivered before is dropped unsent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tidegate.driver.callbacks.outbox import Claim, Outbox, OutboxRow
from tidegate.driver.callbacks.transport import CallbackFailed, Transports, batch_max
from tidegate.driver.fence import DeliveredFence, newest_marks
from tidegate.driver.task_lanes import TaskLanes
from tidegate.wire import ClientRecord

log = logging.getLogger(__name__)

UNREGISTERED = "client no longer registered"
NO_TRANSPORT = "client has no callback transport any more (no URL, no NATS)"


@dataclass
class RetryStats:
    delivered: int = 0
    failed: int = 0  # attempts that failed and will be retried
    dead: int = 0  # callbacks moved to the dead letters
    superseded: int = 0  # dropped unsent: the fence says a state as new was called back


async def retry_pass(
    outbox: Outbox,
    transports: Transports,
    lookup: Callable[[str], ClientRecord | None],
    *,
    batch_limit: int = 500,
    budget_s: float = 10.0,
    concurrency: int = 1,
    fence: DeliveredFence | None = None,
) -> RetryStats:
    """One pass over every client with a due callback.

    `budget_s` bounds how long one client's transaction stays open: a slow but working
    endpoint is drained over several passes instead of pinning a connection for minutes.
    `concurrency`: requests in flight at once per client, in order per task (the notifier's
    `callback_concurrency`). `fence`: what the retry job delivered, in the notifier's fence
    bucket (see the module docstring; `OUTBOX_SCOPE`).
    """
    stats = RetryStats()
    clients = await outbox.due_clients()
    results = await asyncio.gather(
        *(
            _retry_client(
                outbox,
                transports,
                lookup,
                c,
                Pass(batch_limit, budget_s, concurrency, fence or DeliveredFence(None)),
                stats,
            )
            for c in clients
        ),
        return_exceptions=True,
    )
    for name, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancellation and the like are not ours to swallow
            log.warning("callback retry for client %s failed: %s", name, result)
    return stats


async def _retry_client(
    outbox: Outbox,
    transports: Transports,
    lookup: Callable[[str], ClientRecord | None],
    name: str,
    how: Pass,
    stats: RetryStats,
) -> None:
    deadline = time.monotonic() + how.budget_s
    async with outbox.claim(name, how.batch_limit) as claim:
        if claim is None or not claim.rows:
            return  # another driver has this client, or it has just drained it
        client = lookup(name)
        if client is None or (client.callback_url is None and not client.callback_nats):
            # Visible in the dead letters rather than dropped: the operator may replay them.
            for row in claim.rows:
                claim.bury(row, UNREGISTERED if client is None else NO_TRANSPORT)
            stats.dead += len(claim.rows)
            return
        sendable = [row for row in claim.rows if not _bury_if_spent(outbox, claim, row)]
        stats.dead += len(claim.rows) - len(sendable)
        if not sendable or not sendable[0].due:
            return  # the head is backing off: everything behind it waits
        passed = await how.fence.already_sent([row.callback for row in sendable])
        superseded = [row for row in sendable if row.callback.event_id in passed]
        if superseded:
            claim.deliver(superseded)  # deleted with the delivered ones: never to be sent
            stats.superseded += len(superseded)
            sendable = [row for row in sendable if row.callback.event_id not in passed]
            log.info("callbacks to %s: %d already passed, dropped unsent", name, len(superseded))
        failures = await _send_laned(transports, client, claim, sendable, deadline, how)
        stats.delivered += len(claim.delivered) - len(superseded)
        if failures:
            # One attempt counted, on the oldest failure: the head the next pass waits for.
            # The other failed rows stay as they were, tried again with it.
            row, error = min(failures, key=lambda f: f[0].id)
            _record_failure(outbox, claim, row, error, stats)


async def _send_laned(
    transports: Transports,
    client: ClientRecord,
    claim: Claim,
    rows: list[OutboxRow],
    deadline: float,
    how: Pass,
) -> list[tuple[OutboxRow, str]]:
    """`rows` sent laned by task (mesh/driver/task_lanes.py): a task's rows one request after
    another in id order, up to `concurrency` requests at once. The first failure starts
    nothing more (what is in flight, other tasks', finishes): nothing of a failed task goes
    after it, and a failing endpoint gets no more than the requests already under way."""
    lanes: TaskLanes[OutboxRow] = TaskLanes(lambda r: r.callback.task_id, limit=how.concurrency)
    for row in rows:
        lanes.put(row)
    failures: list[tuple[OutboxRow, str]] = []

    async def send(chunk: list[OutboxRow]) -> None:
        try:
            try:
                await transports.send(client, [r.callback for r in chunk])
            except CallbackFailed as exc:
                await delivered(chunk[: exc.delivered])
                failures.append((chunk[exc.delivered], str(exc)))
            else:
                await delivered(chunk)
        finally:
            lanes.done(chunk)

    async def delivered(chunk: list[OutboxRow]) -> None:
        await how.fence.record(newest_marks(r.callback for r in chunk))  # before the commit
        claim.deliver(chunk)

    step = batch_max(client)
    running: set[asyncio.Task[None]] = set()
    try:
        while True:
            while not failures and time.monotonic() < deadline and lanes.can_take():
                running.add(asyncio.create_task(send(lanes.take(step))))
            if not running:
                return failures
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # CallbackFailed is handled in `send`: anything else is a bug
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


@dataclass(frozen=True)
class Pass:
    """How one pass works on each client."""

    batch_limit: int
    budget_s: float
    concurrency: int
    fence: DeliveredFence


def _bury_if_spent(outbox: Outbox, claim: Claim, row: OutboxRow) -> bool:
    """Dead-letter a row out of attempts or time before trying it again."""
    policy = outbox.policy
    if row.attempts >= policy.max_attempts:
        claim.bury(row, f"gave up after {row.attempts} attempts; last error: {row.last_error}")
        return True
    if row.age_s > policy.max_age_s:
        claim.bury(row, f"gave up after {_age(row.age_s)}; last error: {row.last_error}")
        return True
    return False


def _record_failure(
    outbox: Outbox, claim: Claim, row: OutboxRow, error: str, stats: RetryStats
) -> None:
    policy = outbox.policy
    attempts = row.attempts + 1
    if attempts >= policy.max_attempts:
        claim.bury(row, f"gave up after {attempts} attempts; last error: {error}", attempted=True)
        stats.dead += 1
    elif row.age_s > policy.max_age_s:
        claim.bury(row, f"gave up after {_age(row.age_s)}; last error: {error}", attempted=True)
        stats.dead += 1
    else:
        claim.fail(row, error, policy.delay(attempts, outbox.rng))
        stats.failed += 1


def _age(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def schedule_retries(
    scheduler: AsyncIOScheduler, run: Callable[[], Awaitable[object]], every_s: float
) -> None:
    """Run `run` every `every_s` seconds in this driver, never two passes at once."""

    # A coroutine function, not `run` itself: APScheduler awaits only what it can see is
    # async, and would call a lambda returning a coroutine in a thread, never awaiting it.
    async def retry_callbacks() -> None:
        try:
            await run()
        except Exception as exc:  # a database outage: say so once per pass, briefly
            log.warning("callback retry pass failed: %s", exc)

    scheduler.add_job(
        retry_callbacks,
        "interval",
        seconds=every_s,
        id="callback-retry",
        coalesce=True,
        max_instances=1,
        next_run_time=datetime.now(UTC),
        replace_existing=True,
    )
