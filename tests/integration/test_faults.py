"""Failure modes provoked for real: kill -9 of executors and drivers, a stopped PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import CLIENTS, Cluster, register, wait_for
from test_engine_outcomes import final, task_row

from tidegate.client import TidegateClient
from tidegate.embedded.servers import EmbeddedPostgres, free_port
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord, TaskSpec

Conn = psycopg.AsyncConnection[Any]

pytestmark = pytest.mark.slow


async def test_killed_executor_task_finishes_elsewhere_as_attempt_2(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    cluster.driver()
    doomed = cluster.executor(slots=2)
    flag = tmp_path / "started-once"
    # The first attempt hangs (its executor is killed under it); the second one succeeds.
    spec = TaskSpec(key="survivor", shell=f"test -e {flag} && exit 0; touch {flag}; sleep 60")
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(spec)
    running = await final(db, "alpha:survivor", "running")
    assert running["executor"] == "exec-0" and running["attempt"] == 1
    doomed.kill9()
    cluster.executor(slots=2)
    done = await final(db, "alpha:survivor", "succeeded", timeout=60)
    assert done["attempt"] == 2 and done["executor"] == "exec-1"


async def test_late_report_of_stale_attempt_does_not_overwrite(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    cluster.driver()
    frozen = cluster.executor(slots=2)
    flag = tmp_path / "first-attempt"
    # Attempt 1 fails after 4 s; any later attempt succeeds at once.
    spec = TaskSpec(key="stale", shell=f"test -e {flag} && exit 0; touch {flag}; sleep 4; exit 7")
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        await tg.submit(spec)
    await final(db, "beta:stale", "running")
    os.kill(frozen.pid, signal.SIGSTOP)  # alive but silent: its work message is redelivered
    try:
        cluster.executor(slots=2)
        done = await final(db, "beta:stale", "succeeded", timeout=60)
        assert done["attempt"] == 2
    finally:
        os.kill(frozen.pid, signal.SIGCONT)

    async def stale_let_go() -> bool:
        return "task beta:stale attempt 1: no longer this executor's task" in frozen.log()

    await wait_for(stale_let_go, timeout=30, what="the frozen executor to let its task go")
    # ... and reported nothing for it: no event, and no ack, which would have deleted
    # attempt 2's work message.
    assert "task beta:stale attempt 1: failed" not in frozen.log()
    projected = cluster.components[0]

    async def projector_caught_up() -> bool:
        return "projection write failed" not in projected.log() and await _events_drained(cluster)

    await wait_for(projector_caught_up, timeout=30, what="the projector to consume the late event")
    row = await task_row(db, "beta:stale")
    assert row is not None
    assert (row["state"], row["attempt"], row["exit_code"]) == ("succeeded", 2, 0)


async def _events_drained(cluster: Cluster) -> bool:
    import nats

    from tidegate import names

    nc = await nats.connect(cluster.nats_url)
    try:
        info = await nc.jetstream().consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nc.close()


async def test_killed_driver_loses_and_duplicates_nothing(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    victim = cluster.driver()
    cluster.driver()
    cluster.executor(slots=16)
    cluster.executor(slots=16)
    ran = tmp_path / "ran.txt"
    per_client = 1000

    async def flood(client: str) -> None:
        async with await TidegateClient.connect(cluster.nats_url, client) as tg:
            await tg.submit_many(
                TaskSpec(key=f"k{i}", shell=f"echo {client}:k{i} >> {ran}")
                for i in range(per_client)
            )

    await asyncio.gather(*(flood(c) for c in CLIENTS))
    total = per_client * len(CLIENTS)

    async def some_progress() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks")
        row = await cur.fetchone()
        return row is not None and row[0] >= 500

    await wait_for(some_progress, timeout=60, what="500 tasks projected")
    victim.kill9()

    async def all_succeeded() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        row = await cur.fetchone()
        return row is not None and row[0] == total

    await wait_for(all_succeeded, timeout=240, interval=1, what=f"{total} succeeded tasks")
    runs = Counter(ran.read_text().split())
    assert len(runs) == total, "a task was lost"
    assert max(runs.values()) == 1, [k for k, n in runs.items() if n > 1][:5]
    cur = await db.execute("SELECT count(*), max(attempt) FROM tasks")
    assert await cur.fetchone() == (total, 1)


async def test_database_outage_does_not_stop_the_flow(nats_url: str, tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", port=free_port(), options=("-c fsync=off",))
    url = server.start()
    await migrate(url)
    await register(nats_url, url, ClientRecord(name="alpha"))
    c = Cluster(nats_url=nats_url, database_url=url, workdir=tmp_path / "run")
    ran = tmp_path / "ran.txt"
    try:
        c.driver()
        c.executor(slots=16)

        async def submit(keys: range) -> None:
            async with await TidegateClient.connect(nats_url, "alpha") as tg:
                await tg.submit_many(
                    TaskSpec(key=f"k{i}", shell=f"echo k{i} >> {ran}") for i in keys
                )

        def lines() -> int:
            return len(ran.read_text().split()) if ran.exists() else 0

        await submit(range(0, 300))
        server.stop(mode="immediate")  # a crash, not a polite shutdown
        await submit(range(300, 600))  # accepted while the database is down

        async def all_ran() -> bool:
            return lines() == 600

        await wait_for(all_ran, timeout=120, what="600 tasks executed during the outage")
        server.start()

        async def all_projected() -> bool:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM tasks WHERE state = 'succeeded' AND exit_code = 0"
                )
                row = await cur.fetchone()
                return row is not None and row[0] == 600

        await wait_for(all_projected, timeout=120, interval=1, what="600 succeeded rows")
    finally:
        c.stop_all()
        server.stop()
