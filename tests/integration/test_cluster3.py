"""Three nats-server processes with R3 streams (compose.yaml's topology, on loopback): one node
killed with SIGKILL in the middle of a flood, and nothing is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from cluster3 import Cluster3
from harness import CLIENTS, Cluster, register, wait_for

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord, TaskSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PER_CLIENT = 1_000
ALL = PER_CLIENT * 3


@pytest.fixture
def nats3(tmp_path: Path) -> Iterator[Cluster3]:
    cluster = Cluster3(tmp_path / "nats").start()
    yield cluster
    cluster.stop()


async def test_a_node_killed_mid_flood_loses_nothing(
    nats3: Cluster3, database_url: str, tmp_path: Path
) -> None:
    await nats3.wait_ready()
    nc = await connect(nats3.url, "test-setup")
    try:
        await ensure_all(nc.jetstream(), Limits(replicas=3))
    finally:
        await nc.close()
    await migrate(database_url)
    # `register` ensures the topology with one replica: the streams keep their three.
    await register(nats3.url, database_url, *(ClientRecord(name=n) for n in CLIENTS))
    run = Cluster(
        nats_url=nats3.url,
        database_url=database_url,
        workdir=tmp_path / "run",
        extra_env={"TIDEGATE_REPLICAS": "3"},
    )
    try:
        run.driver()
        run.driver()
        run.executor(slots=16)
        run.executor(slots=16)
        await _flood_and_kill(nats3, run, database_url)
    finally:
        run.stop_all()


async def _flood_and_kill(nats3: Cluster3, run: Cluster, database_url: str) -> None:
    js_conn = await nats.connect(nats3.url.split(","))
    try:
        js = js_conn.jetstream()
        for stream in (names.TASKS_STREAM, names.WORK_STREAM, names.EVENTS_STREAM):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        # Consumers inherit the stream's replicas (Tidegate leaves num_replicas unset).
        projector = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        assert projector.cluster is not None and len(projector.cluster.replicas or []) == 2
        leader = (await js.stream_info(names.EVENTS_STREAM)).cluster
        assert leader is not None and leader.leader
    finally:
        await js_conn.close()

    for client in CLIENTS[:3]:
        async with await TidegateClient.connect(nats3.url, client) as tg:
            await tg.submit_many(
                TaskSpec(key=f"c{i}", argv=["true"], timeout_s=60) for i in range(PER_CLIENT)
            )

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:

        async def terminal() -> int:
            cur = await db.execute(
                "SELECT count(*) FROM tasks WHERE state IN ('succeeded', 'failed', 'lost')"
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        async def some() -> bool:
            return await terminal() >= 300

        await wait_for(some, timeout=180, what="300 tasks terminal before the kill")
        # The node leading the events stream: its loss forces an election mid-flood.
        nats3.kill9(nats3.node_named(leader.leader))

        async def everything() -> bool:
            return await terminal() == ALL

        try:
            await wait_for(everything, timeout=600, interval=2, what=f"{ALL} tasks terminal")
        except AssertionError:
            raise AssertionError(f"{await terminal()} of {ALL} terminal\n{run.logs()}") from None
        cur = await db.execute(
            "SELECT count(*), count(DISTINCT task_id), count(*) FILTER (WHERE state = 'succeeded')"
            " FROM tasks"
        )
        row: Any = await cur.fetchone()
        assert tuple(row) == (ALL, ALL, ALL)
