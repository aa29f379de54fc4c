"""A database outage longer than every ack wait (shortened by configuration) while tasks flow:
nothing is redelivered in a storm (the projector keeps the batch it holds alive however long a
write waits), and afterwards every task has exactly one terminal row."""

from __future__ import annotations

import time
from pathlib import Path

import nats
import psycopg
import pytest
from harness import Cluster, metric, register, scrape, wait_for

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.embedded.servers import EmbeddedPostgres, free_port
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord, TaskSpec

pytestmark = pytest.mark.slow

ACK_WAIT_S = 2.0  # the projector consumer's, shortened: the outage lasts many of these
OUTAGE_S = 8 * ACK_WAIT_S


async def test_outage_longer_than_the_ack_waits_redelivers_nothing(
    nats_url: str, tmp_path: Path
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", port=free_port(), options=("-c fsync=off",))
    url = server.start()
    await migrate(url)
    await register(
        nats_url, url, ClientRecord(name="alpha"), ClientRecord(name="touchy", sensitive=True)
    )
    env = {"TIDEGATE_PROJECTOR_ACK_WAIT_S": str(ACK_WAIT_S)}
    c = Cluster(nats_url=nats_url, database_url=url, workdir=tmp_path / "run", extra_env=env)
    ran = tmp_path / "ran.txt"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    redelivered: list[int] = []

    async def sample() -> None:
        info = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        redelivered.append(info.num_redelivered or 0)

    try:
        # Two drivers: once the database is back, the first whose write passes fetches again,
        # and would take over whatever the other holds whose ack wait ran out.
        ports = [free_port(), free_port()]
        for port in ports:
            c.driver("--metrics-port", str(port))
        c.executor(slots=16)

        async def configured() -> bool:  # the driver applied the shortened ack wait
            info = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
            return info.config.ack_wait == ACK_WAIT_S

        await wait_for(configured, timeout=30, what="the projector's ack wait shortened")

        async def submit(client: str, keys: range) -> None:
            async with await TidegateClient.connect(nats_url, client) as tg:
                await tg.submit_many(
                    TaskSpec(key=f"k{i}", shell=f"echo {client}:k{i} >> {ran}") for i in keys
                )

        def lines() -> int:
            return len(ran.read_text().split()) if ran.exists() else 0

        await submit("alpha", range(0, 200))
        server.stop(mode="immediate")  # a crash, not a polite shutdown
        down_at = time.monotonic()
        await submit("alpha", range(200, 400))  # accepted and run while the database is down
        await submit("touchy", range(0, 100))

        async def all_ran() -> bool:
            return lines() == 500

        await wait_for(all_ran, timeout=120, what="500 tasks executed during the outage")

        async def outage_long_enough() -> bool:
            await sample()  # the whole outage long: the projector holds a batch meanwhile
            return time.monotonic() - down_at >= OUTAGE_S

        await wait_for(outage_long_enough, timeout=OUTAGE_S + 30, interval=0.5, what="outage")
        failures = sum(metric(scrape(p), "tidegate_projection_write_failures_total") for p in ports)
        assert failures > 0, "the projectors never tried to write during the outage"
        server.start()

        async def all_projected() -> bool:
            await sample()
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT count(*), count(DISTINCT task_id) FROM tasks "
                    "WHERE state = 'succeeded' AND exit_code = 0"
                )
                row = await cur.fetchone()
                return row is not None and row == (500, 500)

        await wait_for(all_projected, timeout=120, interval=1, what="500 succeeded rows")
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT count(*) FROM tasks")
            assert await cur.fetchone() == (500,)  # one row per task, every one terminal
        # Held through more than eight ack waits, yet nothing came back: without the keep-alive
        # the batches held would be redelivered (and written twice) once the database is back.
        again = sum(metric(scrape(p), "tidegate_projection_redelivered_total") for p in ports)
        assert again == 0 and max(redelivered) == 0, (again, redelivered)
        assert len(redelivered) >= OUTAGE_S  # sampled through the outage
    finally:
        await nc.close()
        c.stop_all()
        server.stop()
