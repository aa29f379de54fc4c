"""A 5,000-task flood, for correctness only (issue 9, "Tests"): real nats-server, PostgreSQL,
driver and executors, real HTTP callback receivers, sensitive and non-sensitive clients.

Every task terminal exactly once (one row, one terminal callback), every state that is called
back received exactly once (sensitive: dispatched, running, succeeded; non-sensitive: the
end), in order per task, and the counts agree between what was submitted, what the database
holds and what the clients were called back with. No timing is asserted: the benchmark prints
those (`tidegate bench flood`).
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import pytest
from harness import Cluster, register, wait_for
from receiver import Receiver

from tidegate.client import TidegateClient
from tidegate.driver.callbacks.payload import Callback
from tidegate.store.migrate import migrate
from tidegate.wire import TERMINAL_STATES, ClientRecord, TaskSpec

TASKS = 5_000
SENSITIVE = ["careful0", "careful1"]
RELAXED = ["relaxed0", "relaxed1"]
CALLED_BACK = {True: ["dispatched", "running", "succeeded"], False: ["succeeded"]}
# Generous bounds: this test is about what arrives, not how fast. A short ack wait or callback
# timeout on a loaded machine would only add redeliveries and retries that other tests cover.
ENV = {
    "TIDEGATE_WORK_ACK_WAIT_S": "60",
    "TIDEGATE_CALLBACK_TIMEOUT_S": "60",
    "TIDEGATE_LOG_LEVEL": "WARNING",  # executors log every task at INFO
}


class Collected:
    """The receiver's callbacks, parsed once each (the receiver keeps raw requests)."""

    def __init__(self, rx: Receiver) -> None:
        self.rx = rx
        self.seen = 0
        self.by_path: dict[str, list[Callback]] = defaultdict(list)
        self.failed = 0  # requests not answered 2xx: there should be none

    def update(self) -> int:
        hits = self.rx.hits[self.seen :]
        self.seen += len(hits)
        for h in hits:
            if h.ok:
                self.by_path[h.path].extend(h.callbacks())
            else:
                self.failed += 1
        return sum(len(v) for v in self.by_path.values())


def specs(client: str, n: int) -> list[TaskSpec]:
    return [TaskSpec(key=f"{client}-{i:05d}", argv=["true"]) for i in range(n)]


async def submit(nats_url: str, client: str, tasks: list[TaskSpec]) -> int:
    async with await TidegateClient.connect(nats_url, client) as tg:
        receipts = await tg.submit_many(tasks)
    assert not [r for r in receipts if r.duplicate]
    return len(receipts)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_flood_of_5000_tasks_every_state_once_in_order_and_counts_agree(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    await migrate(database_url)
    clients = SENSITIVE + RELAXED
    per_client = TASKS // len(clients)
    async with Receiver() as rx:
        await register(
            nats_url,
            database_url,
            *(
                ClientRecord(name=n, sensitive=n in SENSITIVE, callback_url=rx.url(f"/{n}"))
                for n in clients
            ),
        )
        c = Cluster(nats_url=nats_url, database_url=database_url, workdir=tmp_path / "run")
        got = Collected(rx)
        expected = per_client * len(SENSITIVE) * 3 + per_client * len(RELAXED)
        try:
            c.driver(**ENV)
            c.executor(slots=8, **ENV)
            c.executor(slots=8, **ENV)
            submitted = sum(
                await asyncio.gather(*(submit(nats_url, n, specs(n, per_client)) for n in clients))
            )
            assert submitted == TASKS

            async def terminal_in_db() -> bool:
                async with await psycopg.AsyncConnection.connect(database_url) as conn:
                    cur = await conn.execute("SELECT count(*) FROM tasks WHERE state_rank = 3")
                    row = await cur.fetchone()
                    return row is not None and row[0] >= TASKS

            async def all_called_back() -> bool:
                return got.update() >= expected

            await wait_for(terminal_in_db, timeout=400, interval=1, what="every task terminal")
            await wait_for(all_called_back, timeout=120, interval=1, what="every callback")
            await asyncio.sleep(1)  # a duplicate or a stray late callback would arrive by now
            got.update()
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()

    # The database: one row per task, every one terminal and succeeded, first attempt.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT task_id, state, attempt FROM tasks")
        rows = await cur.fetchall()
    ids = Counter(str(r[0]) for r in rows)
    assert len(rows) == TASKS and len(ids) == TASKS, [i for i, n in ids.items() if n > 1][:5]
    assert Counter(str(r[1]) for r in rows) == {"succeeded": TASKS}

    # The callbacks: every called-back state of every task once, in order per task.
    assert got.failed == 0
    all_cbs = [cb for cbs in got.by_path.values() for cb in cbs]
    event_ids = Counter(cb.event_id for cb in all_cbs)
    assert [e for e, n in event_ids.items() if n > 1] == []
    assert len(all_cbs) == expected
    for name in clients:
        cbs = got.by_path[f"/{name}"]
        assert {cb.client for cb in cbs} == {name}  # to its own endpoint only
        states: dict[str, list[str]] = defaultdict(list)
        for cb in cbs:  # arrival order
            states[cb.task_id].append(cb.state)
        assert set(states) == {f"{name}:{t.key}" for t in specs(name, per_client)}
        want = CALLED_BACK[name in SENSITIVE]
        wrong = {t: s for t, s in states.items() if s != want}
        assert not wrong, list(wrong.items())[:3]
        # Terminal exactly once per task, as the client sees it.
        assert sum(cb.state in TERMINAL_STATES for cb in cbs) == per_client

    # Counts that agree: submitted = rows in the database = tasks called back terminal.
    terminal_cbs = {cb.task_id for cb in all_cbs if cb.state in TERMINAL_STATES}
    assert submitted == len(rows) == len(terminal_cbs) == TASKS
    assert terminal_cbs == set(ids)
