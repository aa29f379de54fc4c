"""Runs: a key submitted again after the dedup window, or retried, is the task's next run.

Real servers and processes: a driver and an executor, a client paused so that its first run is
held back while the window passes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import Cluster, cli, register, wait_for
from litestar.testing import AsyncTestClient
from receiver import Receiver

from tidegate import names
from tidegate.bus.cancel import request_cancel
from tidegate.bus.clients import RegistryBuckets, publish_client
from tidegate.bus.natsconn import connect
from tidegate.client import TidegateClient
from tidegate.config import Connection, Settings
from tidegate.console.app import create_app
from tidegate.console.security import AccessConfig
from tidegate.store import tokens
from tidegate.store.rows import TaskRow
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, TaskSpec

Conn = psycopg.AsyncConnection[Any]
WINDOW_S = 5.0


async def rows_of(db: Conn, task_id: str) -> list[tuple[Any, ...]]:
    cur = await db.execute(
        "SELECT run, state, attempt FROM tasks WHERE task_id = %s ORDER BY run", (task_id,)
    )
    return list(await cur.fetchall())


async def set_paused(nats_url: str, database_url: str, client: str, paused: bool) -> None:
    async with Store(database_url, min_size=1, max_size=1) as store:
        record = await store.update_client(client, paused=paused)
    nc = await connect(nats_url, "test-pause")
    try:
        await publish_client(await RegistryBuckets.of(nc.jetstream()), record)
    finally:
        await nc.drain()


async def tasks_window_s(nats_url: str) -> float:
    nc = await connect(nats_url, "test-window")
    try:
        info = await nc.jetstream().stream_info(names.TASKS_STREAM)
        return float(info.config.duplicate_window or 0)
    finally:
        await nc.drain()


@pytest.mark.slow
async def test_a_key_resubmitted_after_the_window_is_its_next_run(
    cluster: Cluster, db: Conn
) -> None:
    """Held back by a pause while the dedup window passes, the first run of each key is
    followed by a second submission of the key: before runs, the second was acked as a
    duplicate at the ready stream and never ran, and its events collided with the first's."""
    async with Receiver() as hook:
        await register(
            cluster.nats_url,
            cluster.database_url,
            ClientRecord(name="rerun", paused=True, callback_url=hook.url()),
        )
        cluster.extra_env["TIDEGATE_DUPLICATE_WINDOW_S"] = str(WINDOW_S)
        cluster.driver()
        cluster.executor(slots=4)

        async def window_is_short() -> bool:
            return await tasks_window_s(cluster.nats_url) == WINDOW_S

        await wait_for(window_is_short, timeout=30, what="the 5 s dedup window on TG_TASKS")

        specs = [TaskSpec(key=k, argv=["/bin/sh", "-c", f"echo {k}"]) for k in ("a", "b")]
        async with await TidegateClient.connect(cluster.nats_url, "rerun") as tg:
            first = [await tg.submit(s) for s in specs]
            accepted_at = time.monotonic()
            assert not any(r.duplicate for r in first)

            async def queued_and_held() -> bool:
                states = [[r[1] for r in await rows_of(db, f"rerun:{k}")] for k in "ab"]
                return states == [["queued"], ["queued"]]

            await wait_for(queued_and_held, timeout=30, what="both first runs queued")
            # The window is what this test is about: wait it out, then submit the keys again.
            await asyncio.sleep(max(0.0, accepted_at + WINDOW_S + 0.5 - time.monotonic()))
            second = [await tg.submit(s) for s in specs]
        assert not any(r.duplicate for r in second)
        assert all(s.seq > f.seq for f, s in zip(first, second, strict=True))

        # A cancel request for b's first run, written while both of b's runs wait.
        nc = await connect(cluster.nats_url, "test-cancel")
        try:
            kv = await nc.jetstream().key_value(names.CANCEL_BUCKET)
            await request_cancel(kv, "rerun:b", first[1].seq)
        finally:
            await nc.drain()

        await set_paused(cluster.nats_url, cluster.database_url, "rerun", False)

        async def all_ended() -> list[tuple[Any, ...]] | None:
            rows = await rows_of(db, "rerun:a") + await rows_of(db, "rerun:b")
            ended = len(rows) == 4 and all(r[1] != "queued" and r[1] != "running" for r in rows)
            return rows if ended else None

        try:
            await wait_for(all_ended, timeout=60, what="four terminal runs")
        except AssertionError:
            raise AssertionError(cluster.logs()) from None

        # Two rows per task id, one per run, each with its own outcome.
        assert await rows_of(db, "rerun:a") == [
            (first[0].seq, "succeeded", 1),
            (second[0].seq, "succeeded", 1),
        ]
        assert await rows_of(db, "rerun:b") == [
            (first[1].seq, "cancelled", 1),  # the request named this run...
            (second[1].seq, "succeeded", 1),  # ...and not this one
        ]

        async def four_terminal_callbacks() -> bool:
            got = [c for c in hook.delivered() if c.state in ("succeeded", "cancelled")]
            return len(got) == 4

        await wait_for(four_terminal_callbacks, timeout=30, what="four terminal callbacks")
    # `task show`: the latest run, and the earlier one listed.
    shown = cli(cluster.env(), "task", "show", "rerun:b", "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["run"], record["state"]) == (second[1].seq, "succeeded")
    assert [(r["run"], r["state"]) for r in record["runs"]] == [(first[1].seq, "cancelled")]
    text = cli(cluster.env(), "task", "show", "rerun:b")
    assert f"run 1 (id {first[1].seq})" in text.stdout and "this is run 2 of 2" in text.stdout

    terminal = [c for c in hook.delivered() if c.state in ("succeeded", "cancelled")]
    by_task: dict[str, set[tuple[int, str]]] = {}
    for cb in terminal:
        by_task.setdefault(cb.task_id, set()).add((cb.run, cb.event_id))
    assert by_task["rerun:a"] == {
        (first[0].seq, f"rerun:a@{first[0].seq}/1/succeeded"),
        (second[0].seq, f"rerun:a@{second[0].seq}/1/succeeded"),
    }
    assert by_task["rerun:b"] == {
        (first[1].seq, f"rerun:b@{first[1].seq}/1/cancelled"),
        (second[1].seq, f"rerun:b@{second[1].seq}/1/succeeded"),
    }


# --- an operator's retry -------------------------------------------------------------------------


@pytest.fixture
async def api(cluster: Cluster, tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings(
        connection=Connection(
            nats_url=cluster.nats_url, database_url=cluster.database_url, data_dir=tmp_path
        )
    )
    app = create_app(settings, AccessConfig(roster_refresh_s=0.3, token_cache_s=0.5))
    async with AsyncTestClient(app=app) as client:
        yield client


async def test_a_retry_starts_the_next_run_and_it_runs(
    cluster: Cluster, db: Conn, api: AsyncTestClient[Any]
) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    async with Store(cluster.database_url, min_size=1, max_size=1) as store:
        _, token = await tokens.add_token(
            store, name="ops", scope="operator", client=None, actor="test"
        )
    ops = {"Authorization": f"Bearer {token}"}
    # Fails on its first run, succeeds on the retry: the file it checks exists by then.
    flag = cluster.workdir / "flag"
    spec = TaskSpec(key="flaky", shell=f"test -e {flag}", max_attempts=1)
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        receipt = await tg.submit(spec)

    async def failed_once() -> bool:
        return await rows_of(db, "alpha:flaky") == [(receipt.seq, "failed", 1)]

    await wait_for(failed_once, timeout=30, what="the first run failed")
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("now")

    retried = await api.post("/api/v1/tasks/retry", params={"id": "alpha:flaky"}, headers=ops)
    assert retried.status_code == 200, retried.text
    answer = retried.json()
    assert answer["previous_run"] == receipt.seq and answer["run"] > receipt.seq
    run2 = answer["run"]

    async def succeeded_on_retry() -> bool:
        return await rows_of(db, "alpha:flaky") == [
            (receipt.seq, "failed", 1),
            (run2, "succeeded", 1),
        ]

    await wait_for(succeeded_on_retry, timeout=30, what="the retry's run succeeded")
    shown = await api.get("/api/v1/task", params={"id": "alpha:flaky"}, headers=ops)
    assert shown.status_code == 200, shown.text
    detail = shown.json()
    assert (detail["task"]["run"], detail["task"]["state"]) == (run2, "succeeded")
    assert [(r["run"], r["state"]) for r in detail["runs"]] == [(receipt.seq, "failed")]
    cur = await db.execute(
        "SELECT actor, action, target FROM audit_log WHERE action = 'task.retry'"
    )
    assert await cur.fetchall() == [("token:ops", "task.retry", "alpha:flaky")]

    # A run that has not ended is not retried: its client would get two runs at once.
    spec_slow = TaskSpec(key="slow", argv=["/bin/sleep", "30"])
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(spec_slow)

    async def projected() -> bool:
        return bool(await rows_of(db, "alpha:slow"))

    await wait_for(projected, timeout=30, what="the slow task in the database")
    refused = await api.post("/api/v1/tasks/retry", params={"id": "alpha:slow"}, headers=ops)
    assert refused.status_code == 409 and "cancel it first" in refused.json()["error"]
    missing = await api.post("/api/v1/tasks/retry", params={"id": "alpha:nosuch"}, headers=ops)
    assert missing.status_code == 404


async def test_a_bulk_retry_counts_then_starts_each_finished_tasks_next_run(
    cluster: Cluster, api: AsyncTestClient[Any]
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)

    def row(key: str, state: str) -> TaskRow:
        return TaskRow(
            task_id=f"beta:{key}",
            client="beta",
            key=key,
            submitted_at=start,
            state=state,
            attempt=1,
            pool="default",
            spec=TaskSpec(key=key, argv=["/bin/true"]),
            run=3,
        )

    async with Store(cluster.database_url, min_size=1, max_size=1) as store:
        await store.upsert_tasks(
            [row("f1", "failed"), row("f2", "timed_out"), row("busy", "running")]
        )
        _, token = await tokens.add_token(
            store, name="ops", scope="operator", client=None, actor="test"
        )
    ops = {"Authorization": f"Bearer {token}"}
    asked = await api.post("/api/v1/tasks/retry-matching", json={"client": "beta"}, headers=ops)
    assert asked.status_code == 200, asked.text
    assert (asked.json()["matched"], asked.json()["retried"]) == (2, 0)  # the running one: no
    done = await api.post(
        "/api/v1/tasks/retry-matching", json={"client": "beta", "confirm": 2}, headers=ops
    )
    assert done.status_code == 200, done.text
    assert (done.json()["retried"], done.json()["skipped"]) == (2, 0)
    nc = await connect(cluster.nats_url, "test-retries")
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("tg.submit.beta", durable="peek", stream=names.TASKS_STREAM)
        msgs = await sub.fetch(2, timeout=5)
    finally:
        await nc.drain()
    ids = sorted((m.headers or {})["Nats-Msg-Id"].split("#retry-")[0] for m in msgs)
    assert ids == ["beta:f1", "beta:f2"]
