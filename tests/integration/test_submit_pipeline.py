"""Pipelined submission through the SDK: one outcome per task, exactly, at flood sizes and
when some tasks of a batch are refused."""

from __future__ import annotations

import psycopg
import pytest
from harness import Cluster, wait_for

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import PartlySubmitted, Receipt, TidegateClient
from tidegate.config import Limits
from tidegate.errors import BufferFull
from tidegate.wire import TaskSpec

Conn = psycopg.AsyncConnection[tuple[object, ...]]


def specs(prefix: str, n: int) -> list[TaskSpec]:
    return [TaskSpec(key=f"{prefix}{i}", argv=["/bin/true"]) for i in range(n)]


@pytest.mark.slow
async def test_20000_across_two_clients_get_one_receipt_each_and_all_reach_the_database(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver()  # no executor: the tasks stay queued, routed and projected
    per_client = 10_000
    batches = {}
    for client in ("alpha", "beta"):
        async with await TidegateClient.connect(cluster.nats_url, client) as tg:
            batches[client] = await tg.submit_each(specs("k", per_client))
    for client, outcomes in batches.items():
        assert len(outcomes) == per_client
        assert all(isinstance(o, Receipt) for o in outcomes), next(
            o for o in outcomes if not isinstance(o, Receipt)
        )
        receipts = [o for o in outcomes if isinstance(o, Receipt)]
        assert [r.task_id for r in receipts] == [f"{client}:k{i}" for i in range(per_client)]
        assert not any(r.duplicate for r in receipts)
        assert len({r.seq for r in receipts}) == per_client

    async def stored() -> bool:
        cur = await db.execute("SELECT client, count(*) FROM tasks GROUP BY client ORDER BY 1")
        return await cur.fetchall() == [("alpha", per_client), ("beta", per_client)]

    await wait_for(stored, timeout=180, interval=1.0, what="20,000 tasks in the database")
    cur = await db.execute("SELECT count(*) FROM tasks WHERE state <> 'queued'")
    assert await cur.fetchone() == (0,)

    # The same keys again: every one is reported a duplicate, none is stored twice.
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        again = await tg.submit_many(specs("k", 2_000))
    assert [r.task_id for r in again] == [f"alpha:k{i}" for i in range(2_000)]
    assert all(r.duplicate for r in again)


async def test_over_quota_tasks_mid_batch_are_refused_alone(nats_url: str) -> None:
    quota = 100
    nc = await connect(nats_url, "test")
    try:
        await ensure_all(nc.jetstream(), Limits(client_buffer_max=quota))  # no driver: all wait
        tg = TidegateClient(nc, "alpha")
        first = await tg.submit_many(specs("old", 60))
        assert [r.duplicate for r in first] == [False] * 60
        # 30 already stored, 80 new (room for 40 of them), 30 more already stored.
        mixed = specs("old", 30) + specs("new", 80) + specs("old", 60)[30:]
        outcomes = await tg.submit_each(mixed, max_in_flight=16)
        assert len(outcomes) == len(mixed)
        for i, (spec, outcome) in enumerate(zip(mixed, outcomes, strict=True)):
            if spec.key.startswith("old"):
                assert isinstance(outcome, Receipt) and outcome.duplicate, (i, outcome)
                assert outcome.task_id == f"alpha:{spec.key}"
            elif int(spec.key[3:]) < 40:
                assert isinstance(outcome, Receipt) and not outcome.duplicate, (i, outcome)
            else:
                assert isinstance(outcome, BufferFull), (i, outcome)
                assert "'alpha'" in str(outcome) and "quota" in str(outcome)

        # submit_many says the same, as an error that carries every outcome.
        with pytest.raises(PartlySubmitted) as caught:
            await tg.submit_many(mixed)
        again = caught.value.outcomes
        assert [type(o) for o in again] == [
            Receipt if s.key.startswith("old") or int(s.key[3:]) < 40 else BufferFull for s in mixed
        ]
        assert "40 of 140 tasks were not accepted" in str(caught.value)

        info = await nc.jetstream().stream_info(names.TASKS_STREAM)
        assert info.state.messages == quota
    finally:
        await nc.drain()
