"""Row writes per task (issue 9, point 3): a task that finishes within the projector's linger is
one row write (its insert and terminal state together); one that finishes after it, two.

Real driver, executor, nats-server and PostgreSQL. Row writes are counted by the database
itself: a row trigger on `tasks` (cloned onto every partition) records each row it inserts or
updates, exactly and at once; an upsert that changes nothing (its WHERE is false) fires no
update trigger, just as it adds nothing to `n_tup_upd`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.js.errors
import psycopg
from harness import Cluster, wait_for

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.client import TidegateClient
from tidegate.store.pace import CALLBACKS, CommitPace
from tidegate.store.store import Store
from tidegate.wire import TaskSpec

Conn = psycopg.AsyncConnection[Any]

COUNT_ROW_WRITES = """
CREATE TABLE test_row_writes (task_id text, run bigint, op text, state text, seq bigserial);
CREATE FUNCTION test_count_row_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_row_writes (task_id, run, op, state)
    VALUES (NEW.task_id, NEW.run, TG_OP, NEW.state);
    RETURN NULL;
END $$;
CREATE TRIGGER test_count_row_write AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION test_count_row_write();
"""


async def count_row_writes(db: Conn) -> None:
    await db.execute(COUNT_ROW_WRITES.encode())  # no parameters: one simple query


async def writes_by_task(db: Conn) -> dict[str, list[tuple[str, str]]]:
    cur = await db.execute("SELECT task_id, op, state FROM test_row_writes ORDER BY seq")
    out: dict[str, list[tuple[str, str]]] = {}
    for task_id, op, state in await cur.fetchall():
        out.setdefault(str(task_id), []).append((str(op), str(state)))
    return out


async def succeeded(db: Conn, want: int) -> bool:
    cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
    row = await cur.fetchone()
    return bool(row and row[0] >= want)


async def executor_ready(cluster: Cluster) -> None:
    """Submit only once the executor beats: the quick tasks should run at once."""

    async def beating() -> bool:
        nc = await connect(cluster.nats_url, "test-row-writes")
        try:
            kv = await nc.jetstream().key_value(names.EXECUTORS_BUCKET)
            try:
                entry = await kv.get("exec-0")
            except nats.js.errors.KeyNotFoundError:
                return False
            return bool(entry.value)
        finally:
            await nc.close()

    await wait_for(beating, timeout=60, what="the executor's first heartbeat")


async def test_tasks_finishing_within_the_linger_are_one_row_write_each(
    cluster: Cluster, db: Conn
) -> None:
    await count_row_writes(db)
    # A linger generous enough for an idle executor to run `/bin/true` on a loaded machine.
    cluster.driver(TIDEGATE_PROJECTOR_MAX_LINGER_S="3")
    cluster.executor(slots=8)
    await executor_ready(cluster)
    # Submitted a little apart (a workload's pace, not a synchronisation): each task gets a
    # linger of its own, counted from its own `queued`, not from the first row of a batch,
    # so the last ones submitted are no more likely to be split than the first.
    specs = [TaskSpec(key=f"quick-{i}", argv=["/bin/true"]) for i in range(10)]
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        for spec in specs:
            await tg.submit(spec)
            await asyncio.sleep(0.7)
    await wait_for(lambda: succeeded(db, len(specs)), timeout=60, what="every task succeeded")
    writes = await writes_by_task(db)
    assert sorted(writes) == sorted(f"alpha:{s.key}" for s in specs), cluster.logs()
    # One write each: the insert already carries the terminal state.
    assert {t: w for t, w in writes.items() if w != [("INSERT", "succeeded")]} == {}, writes
    # And it is the whole row: the spec side of `queued` folded in with the terminal state.
    cur = await db.execute("SELECT count(*) FROM tasks WHERE spec IS NULL OR pool IS NULL")
    assert await cur.fetchone() == (0,)


async def test_a_task_finishing_after_the_linger_is_two_row_writes(
    cluster: Cluster, db: Conn
) -> None:
    await count_row_writes(db)
    cluster.driver(TIDEGATE_PROJECTOR_MAX_LINGER_S="2")
    cluster.executor(slots=2)
    await executor_ready(cluster)
    spec = TaskSpec(key="slow", argv=["/bin/sleep", "5"])
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        await tg.submit(spec)

    async def inserted() -> bool:
        return bool((await writes_by_task(db)).get("beta:slow"))

    # Written while it still runs: the linger passed without a terminal state.
    await wait_for(inserted, timeout=30, what="the slow task's first row write")
    cur = await db.execute("SELECT state FROM tasks WHERE task_id = 'beta:slow'")
    assert await cur.fetchone() in (("queued",), ("running",))
    await wait_for(lambda: succeeded(db, 1), timeout=60, what="the slow task succeeded")
    writes = (await writes_by_task(db))["beta:slow"]
    # The insert (with `running` folded in when the executor's heartbeat showed it within the
    # linger), then the terminal state: two.
    assert [op for op, _ in writes] == ["INSERT", "UPDATE"], writes
    assert writes[-1] == ("UPDATE", "succeeded")


async def test_every_store_transaction_holds_a_turn_from_its_start_to_its_end(
    database_url: str,
) -> None:
    """A paced Store: a statement is a turn, and so is a whole transaction, taken before its
    connection and held until it ends, committed or rolled back: whoever waits for a turn
    holds no connection and no lock (see `Store.transaction`)."""
    pace = CommitPace(1.0)  # one commit per second: every turn after the first waits
    lane = pace.lane(CALLBACKS)
    async with Store(database_url, max_size=2, pace=lane) as store:
        loop = asyncio.get_running_loop()
        async with store.transaction() as tx:
            await tx.fetch_one("SELECT 1 AS one")
            assert pace.in_flight == 1 and lane.turns == 1  # held while open
            began = loop.time()
        # The next one waits for the window to move on past the transaction's end.
        await store.fetch_one("SELECT 1 AS one")
        assert lane.turns == 2 and loop.time() - began >= 0.9
        with contextlib.suppress(RuntimeError):
            async with store.transaction() as tx:
                await tx.fetch_one("SELECT 1 AS one")
                raise RuntimeError("rolled back")
        assert lane.turns == 3 and pace.in_flight == 0
