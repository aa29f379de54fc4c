"""Client policies end to end: sensitive vs non-sensitive callbacks, signatures, mode flips."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from typing import Any

import psycopg
from harness import Cluster, cli, metric, register, scrape, wait_for
from receiver import Receiver

from tidegate.client import TidegateClient
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.transport import SIGNATURE_HEADER, verify
from tidegate.embedded.servers import free_port
from tidegate.wire import STATE_RANK, ClientRecord, TaskSpec

Conn = psycopg.AsyncConnection[Any]
SECRET = "s3cret-for-tests"


def order(cb: Callback) -> tuple[int, int]:
    return (cb.attempt, STATE_RANK[cb.state])


def assert_in_order(callbacks: list[Callback]) -> None:
    """Per task, no callback is older than one delivered before it."""
    seen: dict[str, tuple[int, int]] = {}
    for cb in callbacks:
        last = seen.get(cb.task_id)
        assert last is None or order(cb) >= last, f"{cb.task_id}: {cb.state} after {last}"
        seen[cb.task_id] = order(cb)


def terminal_tasks(callbacks: list[Callback]) -> set[str]:
    return {cb.task_id for cb in callbacks if STATE_RANK[cb.state] == 3}


async def test_sensitive_callback_never_ahead_of_the_database(
    cluster: Cluster, engine_db: str
) -> None:
    violations: list[str] = []
    lock = asyncio.Lock()
    conn = await psycopg.AsyncConnection.connect(engine_db, autocommit=True)

    async def check(path: str, body: bytes) -> int:
        # At the moment the client hears of state S, the database must show S or later.
        cb = Callback(**json.loads(body))
        async with lock:
            cur = await conn.execute(
                "SELECT attempt, state_rank FROM tasks WHERE task_id = %s", (cb.task_id,)
            )
            row = await cur.fetchone()
        if row is None or tuple(row) < order(cb):
            violations.append(f"{cb.task_id} called back {cb.state}/{cb.attempt}, db has {row}")
        return 200

    async with Receiver(respond=check) as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="careful",
                sensitive=True,
                callback_url=receiver.url(),
                callback_secret=SECRET,
            ),
        )
        cluster.driver()
        cluster.executor(slots=16)
        cluster.executor(slots=16)
        async with await TidegateClient.connect(cluster.nats_url, "careful") as tg:
            await tg.submit_many(TaskSpec(key=f"s{i}", argv=["/bin/true"]) for i in range(500))

        async def all_called_back() -> bool:
            return len(terminal_tasks(receiver.delivered())) == 500

        await wait_for(all_called_back, timeout=120, interval=0.5, what="500 terminal callbacks")
    await conn.close()
    assert violations == []
    delivered = receiver.delivered()
    assert_in_order(delivered)
    states: dict[str, set[str]] = defaultdict(set)
    for cb in delivered:
        states[cb.task_id].add(cb.state)
    assert all(s >= {"dispatched", "running", "succeeded"} for s in states.values())
    for hit in receiver.hits:
        assert verify(SECRET, hit.body, hit.headers[SIGNATURE_HEADER.lower()])
        assert not verify(SECRET, hit.body + b" ", hit.headers[SIGNATURE_HEADER.lower()])


async def test_non_sensitive_writes_in_batches_and_converges(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    # Production timings here: the bound is heartbeat interval + linger.
    env = {
        "TIDEGATE_HEARTBEAT_INTERVAL_S": "2",
        "TIDEGATE_HEARTBEAT_TTL_S": "6",
        "TIDEGATE_PROJECTOR_MAX_LINGER_S": "0.2",
        "TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S": "20",
    }
    called_at: dict[str, float] = {}

    def record(path: str, body: bytes) -> int:
        cb = Callback(**json.loads(body))
        called_at.setdefault(cb.task_id, time.monotonic())
        return 200

    n = 500
    async with Receiver(respond=record) as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="relaxed",
                callback_url=receiver.url(),
                callback_secret=SECRET,
            ),
        )
        dport = free_port()
        cluster.driver("--metrics-port", str(dport), **env)
        cluster.executor(slots=16, **env)
        async with await TidegateClient.connect(cluster.nats_url, "relaxed") as tg:
            await tg.submit_many(TaskSpec(key=f"r{i}", shell="sleep 0.3") for i in range(n))
        lag: dict[str, float] = {}

        async def converged() -> bool:
            waiting = [t for t in called_at if t not in lag]
            if waiting:
                cur = await db.execute(
                    "SELECT task_id FROM tasks WHERE state_rank = 3 AND task_id = ANY(%s)",
                    (waiting,),
                )
                now = time.monotonic()
                for (task_id,) in await cur.fetchall():
                    lag[task_id] = now - called_at[task_id]
            return len(lag) == n

        await wait_for(converged, timeout=180, interval=0.1, what="database to converge")
        delivered = receiver.delivered()
    assert max(lag.values()) <= 5.0, sorted(lag.values())[-5:]
    assert {cb.state for cb in delivered} == {"succeeded"}  # no intermediate callbacks
    text = scrape(dport)
    commits = metric(text, "tidegate_projection_commits_total")
    rows = metric(text, "tidegate_projection_rows_total")
    # Queued and terminal rows, and at most one heartbeat-borne `running` per task, all in
    # batches: nothing like one transaction per transition.
    assert rows <= 3 * n
    assert commits <= n / 5, commits
    cur = await db.execute(
        "SELECT sum(n_tup_ins + n_tup_upd) FROM pg_stat_user_tables WHERE relname LIKE 'tasks_%%'"
    )
    row = await cur.fetchone()
    assert row is not None and row[0] <= 3 * n


async def test_flipping_sensitivity_mid_flood(cluster: Cluster, engine_db: str) -> None:
    async with Receiver() as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(
                name="flipper",
                callback_url=receiver.url(),
                callback_batch_max=100,
            ),
        )
        cluster.driver()
        cluster.executor(slots=16)
        cluster.executor(slots=16)
        n = 5000
        async with await TidegateClient.connect(cluster.nats_url, "flipper") as tg:
            await tg.submit_many(TaskSpec(key=f"f{i}", argv=["/bin/true"]) for i in range(n))

        async def done_at_least(k: int) -> bool:
            return len(terminal_tasks(receiver.delivered())) >= k

        await wait_for(lambda: done_at_least(1000), timeout=120, what="1000 callbacks")
        flip_asked = time.time()
        result = cli(cluster.env(), "client", "set", "flipper", "--sensitive")
        flip_on = time.time()  # the registry has changed by now
        assert result.returncode == 0, result.stderr
        await wait_for(lambda: done_at_least(2500), timeout=120, what="2500 callbacks")
        result = cli(cluster.env(), "client", "set", "flipper", "--no-sensitive")
        flip_off = time.time()
        assert result.returncode == 0, result.stderr
        await wait_for(lambda: done_at_least(n), timeout=180, what=f"{n} callbacks")
        delivered = receiver.delivered()
    assert terminal_tasks(delivered) == {f"flipper:f{i}" for i in range(n)}  # none lost
    assert_in_order(delivered)
    intermediate = [cb.at.timestamp() for cb in delivered if cb.state in ("dispatched", "running")]
    assert intermediate, "sensitive mode never took effect"
    assert min(intermediate) >= flip_asked
    assert min(intermediate) - flip_on <= 1.0  # the new mode applies within a second
    assert max(intermediate) <= flip_off + 1.0  # ... both ways
