"""Fencing by lease revision, against a real PostgreSQL and a real JetStream KV (issue 8 point 6).

A notifier holder frozen in the middle of an outbox write (a spill of a slow client's backlog is
several statements) wakes up after its successor began: what it still writes must not land
behind its successor's rows, which the retry job would then send after newer states. And the
fence a frozen holder records when it wakes must not lower its successor's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
from harness import LOOPBACK, wait_for
from nats.aio.client import Client as NATS
from receiver import Receiver
from test_callbacks import Client, make_callbacks

from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy, Term, TermPassed
from tidegate.driver.callbacks.retry import RetryStats, retry_pass
from tidegate.driver.callbacks.transport import Transports
from tidegate.driver.fence import OUTBOX_SCOPE, DeliveredFence, mark_of, newest_marks
from tidegate.store.migrate import migrate
from tidegate.store.pace import CALLBACKS, CommitPace
from tidegate.store.queries import Q
from tidegate.store.store import Store
from tidegate.wire import Succeeded


@pytest.fixture
async def outbox(database_url: str) -> AsyncIterator[Outbox]:
    await migrate(database_url)
    async with Store(database_url, max_size=4) as store:
        yield Outbox(store, RetryPolicy(base_s=0.01, cap_s=0.05))


async def test_an_outbox_write_of_an_earlier_term_is_refused_once_a_later_one_began(
    outbox: Outbox,
) -> None:
    await outbox.begin_term(Term(0, 10), "driver-a")
    assert await outbox.enqueue(make_callbacks("a1", 2), "slow", term=Term(0, 12)) == []
    await outbox.begin_term(Term(0, 20), "driver-b")
    with pytest.raises(TermPassed, match="driver-b"):
        await outbox.enqueue(make_callbacks("a2", 3), "slow", term=Term(0, 12))
    assert await outbox.count() == 2  # nothing of the refused write is stored
    # The new holder writes (its renewals raise its revision above the term's start), and so
    # does another partition's holder: terms are per partition.
    assert await outbox.enqueue(make_callbacks("b1", 1), "slow", term=Term(0, 23)) == []
    assert await outbox.enqueue(make_callbacks("c1", 1), "slow", term=Term(1, 5)) == []
    assert await outbox.count() == 4


async def test_a_later_term_waits_for_a_write_in_flight_and_then_sees_its_rows(
    outbox: Outbox, database_url: str
) -> None:
    """The earlier holder's write began before the new term (it holds the term row in share
    mode, as `Outbox.enqueue` does) and commits only after: the new term's outbox read must
    see its rows, so that the new holder queues behind them rather than sending around them."""
    await outbox.begin_term(Term(3, 10), "driver-a")
    async with await psycopg.AsyncConnection.connect(database_url) as old:
        async with old.transaction():
            await old.execute(Q.notify_term_share, {"partition": 3})
            await old.execute(
                "INSERT INTO callback_outbox "
                "(event_id, task_id, client, state, payload, next_attempt_at) "
                "VALUES ('late@1/1/running', 'late:k', 'late', 'running', '{}', now())"
            )
            begin = asyncio.create_task(outbox.begin_term(Term(3, 20), "driver-b"))
            # Seen waiting on the row lock in pg_stat_activity, not guessed from a sleep.
            deadline = time.monotonic() + 10
            async with await psycopg.AsyncConnection.connect(database_url) as watch:
                while True:
                    cur = await watch.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                        ("%notify_terms%",),
                    )
                    row = await cur.fetchone()
                    if row and row[0]:
                        break
                    assert not begin.done(), "the new term did not wait for the write in flight"
                    assert time.monotonic() < deadline, "the new term never waited"
                    await asyncio.sleep(0.05)
            assert not begin.done()
        pending = await asyncio.wait_for(begin, 10)  # committed: the new term goes on
    assert "late" in pending


async def test_a_new_term_and_an_outbox_write_in_flight_both_finish_under_a_tight_cap(
    database_url: str,
) -> None:
    """The wedge a 300-task benchmark hit at a cap of 3/s: an outbox write holds the term row
    in share mode while a new term's statement waits for that lock. When the write took its
    turn only at its commit, the waiting statement held the lane's only turn in flight and the
    write waited for it, forever. A transaction now holds its turn from its start, so the
    statement waits for the turn, holding nothing, and both finish."""
    await migrate(database_url)
    pace = CommitPace(1.0)  # the callback lane may have one turn in flight
    lane = pace.lane(CALLBACKS)
    async with (
        Store(database_url, max_size=4, pace=lane) as store,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watch,
    ):
        paced = Outbox(store, RetryPolicy(base_s=0.01, cap_s=0.05))
        await paced.begin_term(Term(5, 10), "driver-a")
        holding = asyncio.Event()
        release = asyncio.Event()

        async def earlier_write() -> None:
            async with store.transaction() as tx:
                await tx.fetch_one(Q.notify_term_share, {"partition": 5})
                holding.set()
                await release.wait()

        write = asyncio.create_task(earlier_write())
        await asyncio.wait_for(holding.wait(), 10)
        begin = asyncio.create_task(paced.begin_term(Term(5, 20), "driver-b"))

        async def blocked() -> bool:
            """The new term waits: for a turn (as it should) or on the row lock (holding the
            turn: the wedge)."""
            cur = await watch.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                ("%notify_terms%",),
            )
            row = await cur.fetchone()
            return bool(lane.waiters) or bool(row and row[0])

        await wait_for(blocked, timeout=10, what="the new term to wait for the write")
        assert not begin.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(write, begin), 15)


async def test_a_fence_mark_only_rises(nats_url: str) -> None:
    nc = NATS()
    await nc.connect(nats_url)
    try:
        kv = await nc.jetstream().create_key_value(bucket="fence_test")
        fence = DeliveredFence(kv)
        succeeded = mark_of(5, 1, "succeeded")
        await fence.record({"c:t": succeeded})
        # A holder frozen after its send records its older mark when it wakes up.
        await fence.record({"c:t": mark_of(5, 1, "running"), "c:u": mark_of(5, 1, "running")})
        now = datetime.now(UTC)
        late = [
            Succeeded(
                task_id=t,
                client="c",
                key=t[2:],
                attempt=1,
                run=5,
                at=now,
                submitted_at=now,
                finished_at=now,
                exit_code=0,
            )
            for t in ("c:t", "c:u")
        ]
        # `succeeded` of t is not newer than the fence, so it counts as sent; u's is newer.
        assert await fence.already_sent(late) == {late[0].event_id}
        await fence.record({"c:u": mark_of(5, 1, "succeeded")})
        assert await fence.already_sent(late) == {e.event_id for e in late}
    finally:
        await nc.close()


async def test_a_retry_pass_that_never_committed_does_not_send_a_tasks_states_again(
    outbox: Outbox, nats_url: str
) -> None:
    """The retry job delivered a task's `running` then `succeeded` from the outbox, but its
    deletions were never committed (its driver frozen or cut off after sending): the rows are
    back. The next pass must not send them again, an older state after the newer one."""
    nc = NATS()
    await nc.connect(nats_url)
    transports = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        kv = await nc.jetstream().create_key_value(bucket="fence_retry")
        fence = DeliveredFence(kv, scope=OUTBOX_SCOPE)
        # The notifier recorded these rows' marks when it queued them (handed off, not
        # delivered): that must not make the retry job drop them.
        await DeliveredFence(kv).record(newest_marks(make_callbacks("c", 4)))
        async with Receiver() as rx:
            client = Client(name="c", callback_url=rx.url())
            rows = make_callbacks("c", 4)  # k0 running, k0 succeeded, k1 running, k1 succeeded

            async def one_pass() -> RetryStats:
                return await retry_pass(
                    outbox, transports, lambda _name: client, concurrency=4, fence=fence
                )

            await outbox.enqueue(rows, "HTTP 500 from the first try")

            async def drained() -> bool:
                await one_pass()
                return await outbox.count() == 0

            await wait_for(drained, timeout=20, what="the outbox drained")
            assert len(rx.delivered()) == 4
            await outbox.enqueue(rows, "as if the deletions had rolled back")
            totals = RetryStats()

            async def dropped() -> bool:  # passes until the rows' backoff lets them go
                stats = await one_pass()
                totals.superseded += stats.superseded
                totals.delivered += stats.delivered
                return await outbox.count() == 0

            await wait_for(dropped, timeout=20, what="the returned rows dealt with")
            assert (totals.superseded, totals.delivered) == (4, 0)
            assert len(rx.delivered()) == 4  # nothing went out twice
    finally:
        await transports.close()
        await nc.close()
