"""Client policies under stress: a failing endpoint, caps across drivers, fairness, pause."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

import nats
import nats.js.errors
import psycopg
import pytest
from harness import Cluster, cli, metric, register, scrape, wait_for
from receiver import Receiver
from test_policies import assert_in_order, terminal_tasks

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.wire import ClientRecord, TaskSpec, decode_heartbeat

Conn = psycopg.AsyncConnection[Any]

# Backoff fast enough that a minute of failures is retried a dozen times, not twice.
RETRY_ENV = {
    "TIDEGATE_RETRY_BASE_S": "1",
    "TIDEGATE_RETRY_FACTOR": "2",
    "TIDEGATE_RETRY_CAP_S": "8",
}


@pytest.mark.slow
async def test_endpoint_down_for_a_minute_then_every_callback_arrives(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    down_until: list[float] = []

    def flaky(path: str, body: bytes) -> int:
        if path == "/healthy":
            return 200
        if not down_until:
            down_until.append(time.monotonic() + 60)
        return 500 if time.monotonic() < down_until[0] else 200

    async with Receiver(respond=flaky) as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="flaky",
                callback_url=receiver.url(),
            ),
        )
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="healthy",
                callback_url=receiver.url("/healthy"),
            ),
        )
        cluster.driver(**RETRY_ENV)
        cluster.executor(slots=16)
        async with await TidegateClient.connect(cluster.nats_url, "flaky") as tg:
            await tg.submit_many(TaskSpec(key=f"d{i}", argv=["/bin/true"]) for i in range(50))

        async def outboxed() -> bool:
            cur = await db.execute("SELECT count(*) FROM callback_outbox")
            return await cur.fetchone() == (50,)

        await wait_for(outboxed, timeout=60, what="50 failed callbacks in the outbox")
        # Another client's callbacks are not held up by the broken endpoint meanwhile.
        started = time.monotonic()
        async with await TidegateClient.connect(cluster.nats_url, "healthy") as tg:
            await tg.submit(TaskSpec(key="h", argv=["/bin/true"]))

        async def healthy_called_back() -> bool:
            return bool(receiver.delivered("/healthy"))

        await wait_for(healthy_called_back, timeout=10, what="the healthy client's callback")
        assert time.monotonic() - started < 5

        async def all_delivered() -> bool:
            return len(terminal_tasks(receiver.delivered("/hook"))) == 50

        await wait_for(all_delivered, timeout=150, interval=1, what="50 callbacks after recovery")
        cur = await db.execute("SELECT count(*) FROM callback_outbox")
        assert await cur.fetchone() == (0,)
    delivered = receiver.delivered("/hook")
    assert terminal_tasks(delivered) == {f"flaky:d{i}" for i in range(50)}
    assert_in_order(delivered)
    # Retries of the oldest callback: spaced by the backoff (1, 2, 4, 8, 8, ... s, ±20%).
    first_id = receiver.hits[0].headers["x-tidegate-event-id"]
    times = [h.at for h in receiver.hits if h.headers.get("x-tidegate-event-id") == first_id]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 5
    expected = [min(8.0, 2.0**i) for i in range(len(gaps))]
    for gap, want in zip(gaps, expected, strict=True):
        # Lower bound from the jitter; the retry job ticks once a second, hence the slack.
        assert want * 0.8 - 0.1 <= gap <= want * 1.2 + 1.5, (gaps, expected)


async def test_callbacks_older_than_max_age_are_dead_lettered(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    async with Receiver(respond=lambda path, body: 500) as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="gone",
                callback_url=receiver.url(),
            ),
        )
        cluster.driver(TIDEGATE_RETRY_BASE_S="0.5", TIDEGATE_RETRY_MAX_AGE_S="3")
        cluster.executor(slots=8)
        async with await TidegateClient.connect(cluster.nats_url, "gone") as tg:
            await tg.submit_many(TaskSpec(key=f"x{i}", argv=["/bin/true"]) for i in range(20))

        async def all_dead() -> bool:
            cur = await db.execute(
                "SELECT (SELECT count(*) FROM callback_dead_letters),"
                " (SELECT count(*) FROM callback_outbox)"
            )
            return await cur.fetchone() == (20, 0)

        await wait_for(all_dead, timeout=60, what="20 dead letters and an empty outbox")
    cur = await db.execute("SELECT DISTINCT state FROM callback_dead_letters")
    assert await cur.fetchall() == [("succeeded",)]
    cur = await db.execute("SELECT last_error FROM callback_dead_letters ORDER BY id")
    errors = [e for (e,) in await cur.fetchall()]
    # The first failed for real; the rest waited behind it, in order, until they aged out.
    assert sum("HTTP 500" in e for e in errors) >= 1
    assert all(e.startswith("gave up after") for e in errors)


async def running_by_client(nats_url: str) -> Counter[str]:
    """Tasks running at one instant, from the executors' heartbeats.

    Snapshots are taken at different moments; counting, as of the oldest snapshot, only the
    tasks that had started by then gives a consistent sample (a task listed by a newer
    snapshot and started earlier was running then too), never an overcount from a stale
    snapshot that still lists a task another executor's newer one has replaced.
    """
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.EXECUTORS_BUCKET)
        counts: Counter[str] = Counter()
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return counts
        snapshots = []
        for key in keys:
            entry = await kv.get(key)
            if entry.value:
                snapshots.append(decode_heartbeat(entry.value))
        if not snapshots:
            return counts
        instant = min(hb.at for hb in snapshots)
        for hb in snapshots:
            for task in hb.running:
                if task.started_at <= instant:
                    counts[task.client] += 1
        return counts
    finally:
        await nc.close()


async def max_overlap(db: Conn, client: str) -> int:
    """The most tasks of `client` that ran at the same time, from recorded start and end."""
    cur = await db.execute(
        "SELECT started_at, finished_at FROM tasks WHERE client = %s AND started_at IS NOT NULL",
        (client,),
    )
    points = []
    for started, finished in await cur.fetchall():
        points += [(started, 1), (finished, -1)]
    running = peak = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):  # ends before starts on ties
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
async def test_cap_holds_across_drivers_and_a_backlog_does_not_starve_others(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    await register(
        cluster.nats_url,
        engine_db,
        ClientRecord(name="capped", max_running=5),
        ClientRecord(name="bulk"),
        ClientRecord(name="small"),
    )
    cluster.driver()
    cluster.driver()
    cluster.executor(slots=16)
    cluster.executor(slots=16)

    async with await TidegateClient.connect(cluster.nats_url, "capped") as tg:
        await tg.submit_many(TaskSpec(key=f"c{i}", argv=["sleep", "0.3"]) for i in range(60))
    peak = 0

    async def capped_done() -> bool:
        nonlocal peak
        running = (await running_by_client(cluster.nats_url))["capped"]
        assert running <= 5, f"{running} tasks of a client capped at 5 are running"
        peak = max(peak, running)
        cur = await db.execute(
            "SELECT count(*) FROM tasks WHERE client = 'capped' AND state = 'succeeded'"
        )
        return await cur.fetchone() == (60,)

    await wait_for(capped_done, timeout=120, interval=0.1, what="60 capped tasks")
    assert peak >= 4  # the cap was actually reached, not trivially respected
    assert await max_overlap(db, "capped") == 5  # exact, from every task's start and end

    async with await TidegateClient.connect(cluster.nats_url, "bulk") as tg:
        await tg.submit_many(TaskSpec(key=f"b{i}", argv=["/bin/true"]) for i in range(20_000))

    started = time.monotonic()
    async with await TidegateClient.connect(cluster.nats_url, "small") as tg:
        await tg.submit_many(TaskSpec(key=f"s{i}", argv=["/bin/true"]) for i in range(50))

    async def small_done() -> bool:
        cur = await db.execute(
            "SELECT count(*) FROM tasks WHERE client = 'small' AND state = 'succeeded'"
        )
        return await cur.fetchone() == (50,)

    await wait_for(small_done, timeout=60, interval=0.1, what="the small client's 50 tasks")
    took = time.monotonic() - started
    cur = await db.execute("SELECT count(*) FROM tasks WHERE client = 'bulk' AND state_rank < 3")
    row = await cur.fetchone()
    bulk_unfinished = row[0] if row else 0
    assert took < 5.0, f"small waited {took:.1f}s behind the bulk backlog"
    assert bulk_unfinished > 5_000 or bulk_unfinished == 0  # bulk was still deep in backlog


async def test_paused_client_keeps_its_tasks_buffered(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    await register(cluster.nats_url, engine_db, ClientRecord(name="sleepy", paused=True))
    port = free_port()
    cluster.driver("--metrics-port", str(port))
    cluster.executor(slots=4)
    async with await TidegateClient.connect(cluster.nats_url, "sleepy") as tg:
        await tg.submit_many(TaskSpec(key=f"z{i}", argv=["/bin/true"]) for i in range(10))

    async def queued() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'queued'")
        return await cur.fetchone() == (10,)

    await wait_for(queued, timeout=30, what="10 queued tasks")
    # Paused: routed and visible as queued, but none dispatched while it stays paused.
    nc = await nats.connect(cluster.nats_url)
    try:
        info = await nc.jetstream().stream_info(names.READY_STREAM)
        assert info.state.messages == 10
    finally:
        await nc.close()

    async def backlog_shown() -> bool:  # what an operator sees of it
        return metric(scrape(port), 'tidegate_client_backlog{client="sleepy"}') == 10

    await wait_for(backlog_shown, timeout=10, what="the backlog gauge")
    result = cli(cluster.env(), "client", "set", "sleepy", "--resume")
    assert result.returncode == 0, result.stderr

    async def ran() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        return await cur.fetchone() == (10,)

    await wait_for(ran, timeout=30, what="10 tasks after resuming")


async def test_submissions_beyond_the_rate_wait_instead_of_failing(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    await register(cluster.nats_url, engine_db, ClientRecord(name="metered", max_submit_per_s=20))
    cluster.driver()
    cluster.driver()  # the rate holds across drivers: they share one token bucket
    cluster.executor(slots=16)
    async with await TidegateClient.connect(cluster.nats_url, "metered") as tg:
        receipts = await tg.submit_many(
            TaskSpec(key=f"m{i}", argv=["/bin/true"]) for i in range(100)
        )
    assert len(receipts) == 100  # all accepted at once

    async def all_ran() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        return await cur.fetchone() == (100,)

    await wait_for(all_ran, timeout=60, what="100 rate-limited tasks")
    cur = await db.execute(
        "SELECT extract(epoch FROM max(started_at) - min(started_at)) FROM tasks"
    )
    row = await cur.fetchone()
    assert row is not None
    # 20 per second with a burst of 20: the last of 100 starts about 4 s after the first.
    span = float(row[0])
    assert 3.5 <= span <= 10, f"100 tasks at 20/s started within {span:.1f}s"
