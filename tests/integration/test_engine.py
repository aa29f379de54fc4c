"""The flow end to end on real servers: submit → route → execute → report → project."""

from __future__ import annotations

from typing import Any

import psycopg
from harness import CLIENTS, Cluster, wait_for

from tidegate.client import TidegateClient
from tidegate.wire import TaskSpec

Conn = psycopg.AsyncConnection[Any]


async def states(db: Conn) -> dict[str, int]:
    cur = await db.execute("SELECT state, count(*) FROM tasks GROUP BY state")
    return {s: n for s, n in await cur.fetchall()}


async def test_thousand_tasks_from_five_clients_succeed(cluster: Cluster, db: Conn) -> None:
    cluster.driver()
    cluster.executor(slots=16)
    cluster.executor(slots=16)
    for name in CLIENTS:
        async with await TidegateClient.connect(cluster.nats_url, name) as tg:
            receipts = await tg.submit_many(
                TaskSpec(key=f"t{i}", argv=["/bin/true"]) for i in range(200)
            )
        assert len(receipts) == 200 and not any(r.duplicate for r in receipts)

    async def all_done() -> bool:
        return (await states(db)).get("succeeded", 0) == 1000

    await wait_for(all_done, timeout=120, what="1000 succeeded tasks")
    cur = await db.execute(
        "SELECT count(*) FROM tasks WHERE exit_code = 0 AND finished_at >= started_at"
        " AND attempt = 1 AND executor IS NOT NULL"
    )
    assert await cur.fetchone() == (1000,)
    assert await states(db) == {"succeeded": 1000}
