"""A run's attempts history (migration 0009) against a real PostgreSQL and, end to end, a real
driver, executors and NATS: every attempt of a run is kept beside the row's latest state and
shown on the task page, in the JSON API and by `tidegate task show`."""

from __future__ import annotations

import dataclasses
import html
import json
import random
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from harness import Cluster, cli, wait_for
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, cli_env, login
from test_engine_outcomes import final

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.config import Connection, Settings
from tidegate.console.app import create_app
from tidegate.store.migrate import migrate
from tidegate.store.rows import TaskRow, coalesce, columns
from tidegate.store.store import Store
from tidegate.wire import TERMINAL_STATES, Failed, Running, Succeeded, TaskSpec, encode

Conn = psycopg.AsyncConnection[Any]
Client = AsyncTestClient[Any]

DAY = datetime(2024, 11, 27, 23, 0, tzinfo=UTC)  # long past: no partition made ahead
S1, S2 = DAY + timedelta(seconds=1), DAY + timedelta(seconds=40)


def reports(task_id: str) -> list[TaskRow]:
    """Every report of a run with two attempts: attempt 1 failed with exit 3 on exec-a,
    attempt 2 succeeded on exec-b."""
    client, key = task_id.split(":", 1)

    def row(state: str, attempt: int, **kw: Any) -> TaskRow:
        return TaskRow(
            task_id=task_id,
            client=client,
            key=key,
            submitted_at=DAY,
            state=state,
            attempt=attempt,
            run=11,
            **kw,
        )

    return [
        row("queued", 0, spec=TaskSpec(key=key, argv=["/bin/true"]), pool="default"),
        row("dispatched", 0),
        row("running", 1, executor="exec-a", started_at=S1),
        row(
            "failed",
            1,
            executor="exec-a",
            exit_code=3,
            reason="exit code 3",
            started_at=S1,
            finished_at=S1 + timedelta(seconds=2),
        ),
        row("running", 2, executor="exec-b", started_at=S2),
        row(
            "succeeded",
            2,
            executor="exec-b",
            exit_code=0,
            reason="",
            started_at=S2,
            finished_at=S2 + timedelta(seconds=1),
        ),
    ]


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url)
    async with Store(database_url, min_size=1, max_size=2) as s:
        yield s


@pytest.fixture
async def sql(store: Store, database_url: str) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


async def stored_history(sql: Conn, task_id: str) -> Any:
    cur = await sql.execute("SELECT attempts FROM tasks WHERE task_id = %s", (task_id,))
    row = await cur.fetchone()
    assert row is not None, task_id
    return row[0]


async def test_any_order_of_reports_one_at_a_time_or_batched_stores_one_history(
    store: Store, sql: Conn
) -> None:
    """The upsert's merge is the Python one (`rows.coalesce`), whatever the order or batching."""
    expected = json.loads(columns(coalesce(reports("c:x")))["attempts"][0])
    orders = [reports("c:x")]
    orders.append(list(reversed(orders[0])))
    shuffled = random.Random(7)
    for _ in range(4):
        orders.append(shuffled.sample(orders[0], len(orders[0])))
    for n, order in enumerate(orders):
        one_by_one, batched = f"c:one{n}", f"c:batch{n}"
        for r in order:
            await store.upsert_task_one(dataclasses.replace(r, task_id=one_by_one))
        # Two batches: the first one's history meets the second one's in the statement.
        half = len(order) // 2
        for part in (order[:half], order[half:]):
            await store.upsert_tasks([dataclasses.replace(r, task_id=batched) for r in part])
        for task_id in (one_by_one, batched):
            assert await stored_history(sql, task_id) == expected, (task_id, order)
    (record,) = await store.task_runs("c:one0")
    assert (record.state, record.attempt, record.exit_code) == ("succeeded", 2, 0)
    assert [(a.attempt, a.executor, a.exit_code, a.state) for a in record.attempts] == [
        (2, "exec-b", 0, "succeeded"),
        (1, "exec-a", 3, "failed"),
    ]
    assert [a.duration_s for a in record.attempts] == [1.0, 2.0]


async def test_an_older_report_does_not_regress_an_attempt_and_a_replay_writes_nothing(
    store: Store,
) -> None:
    queued, _, running1, failed1, running2, succeeded2 = reports("c:late")
    assert await store.upsert_task_one(queued) == 1
    assert await store.upsert_task_one(running2) == 1
    # Attempt 1's end, late, after attempt 2 started: written to its attempt only.
    assert await store.upsert_task_one(failed1) == 1
    # Attempt 1's start, later still: nothing left to change, so nothing is written.
    assert await store.upsert_task_one(running1) == 0
    (record,) = await store.task_runs("c:late")
    assert (record.state, record.attempt, record.executor) == ("running", 2, "exec-b")
    assert [(a.attempt, a.state, a.exit_code) for a in record.attempts] == [
        (2, "running", None),
        (1, "failed", 3),
    ]
    assert await store.upsert_task_one(succeeded2) == 1
    # A running report of attempt 2 after its end: the attempt stays succeeded.
    assert await store.upsert_task_one(running2) == 0
    assert await store.upsert_tasks(reports("c:late")) == 0  # a replayed stream costs no tuple
    (record,) = await store.task_runs("c:late")
    assert [(a.attempt, a.state, a.exit_code) for a in record.attempts] == [
        (2, "succeeded", 0),
        (1, "failed", 3),
    ]


async def test_rows_from_before_the_history_show_their_latest_attempt(
    store: Store, sql: Conn
) -> None:
    *_, succeeded2 = reports("c:old")
    await store.upsert_task_one(succeeded2)
    await sql.execute("UPDATE tasks SET attempts = '{}'::jsonb WHERE task_id = 'c:old'")
    (record,) = await store.task_runs("c:old")
    assert [(a.attempt, a.state, a.executor, a.exit_code) for a in record.attempts] == [
        (2, "succeeded", "exec-b", 0)
    ]


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture
async def console(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Client]:
    settings = Settings(
        connection=Connection(
            nats_url=cluster.nats_url, database_url=cluster.database_url, data_dir=tmp_path
        )
    )
    add_operator(cli_env(cluster.nats_url, cluster.database_url, tmp_path), "olga", "operator")
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        assert (await login(client, "olga")).status_code == 303
        yield client


def attempt_rows(page: str, table_id: str) -> list[list[str]]:
    """The cells of an attempts table, as text, row by row."""
    table = re.search(rf'<table id="{table_id}".*?</table>', page, re.S)
    assert table, page
    rows = re.findall(r'<tr data-attempt="\d+">(.*?)</tr>', table.group(0), re.S)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)
        ]
        for r in rows
    ]


@pytest.mark.slow
async def test_a_task_delivered_twice_shows_both_attempts(
    cluster: Cluster, db: Conn, console: Client, tmp_path: Path
) -> None:
    """Attempt 1 runs on exec-0, which is killed under it; attempt 2 succeeds on exec-1. The
    row ends at attempt 2; the page, the API, `task show` and the database keep attempt 1."""
    cluster.driver()
    doomed = cluster.executor(slots=2)
    flag = tmp_path / "started-once"
    spec = TaskSpec(
        key="twice", shell=f"test -e {flag} && exit 0; touch {flag}; sleep 60", max_attempts=2
    )
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(spec)
    running = await final(db, "alpha:twice", "running")
    assert running["executor"] == "exec-0" and running["attempt"] == 1
    doomed.kill9()
    cluster.executor(slots=2)
    done = await final(db, "alpha:twice", "succeeded", timeout=60)
    assert done["attempt"] == 2 and done["executor"] == "exec-1"

    cur = await db.execute("SELECT attempts FROM tasks WHERE task_id = 'alpha:twice'")
    (stored,) = await cur.fetchone() or (None,)
    assert set(stored) == {"1", "2"}, stored
    assert stored["1"]["executor"] == "exec-0" and "started_at" in stored["1"]
    assert "exit_code" not in stored["1"]  # never reported finished: its executor died
    assert (stored["2"]["state"], stored["2"]["exit_code"]) == ("succeeded", 0)
    assert stored["2"]["executor"] == "exec-1"

    page = await console.get("/task", params={"id": "alpha:twice"})
    assert page.status_code == 200, page.text
    cells = attempt_rows(page.text, "task-attempts")
    assert [c[0] for c in cells] == ["2", "1"]  # newest first
    (_, ex2, started2, finished2, duration2, code2, state2, _, log2) = cells[0]
    assert (ex2, code2, state2) == ("exec-1", "0", "succeeded")
    assert started2 and finished2 and duration2.endswith(" s")
    (_, ex1, started1, finished1, _, code1, state1, _, log1) = cells[1]
    assert (ex1, code1, finished1) == ("exec-0", "", "") and started1
    assert state1.split()[0] == stored["1"]["state"]
    assert log1 == log2 == "full log"  # each from the executor that ran it
    assert 'href="/task/log?id=alpha%3Atwice&amp;attempt=1&amp;executor=exec-0' in page.text
    if stored["1"]["state"] not in TERMINAL_STATES:  # the page says why it never ended
        assert "delivered again" in state1

    api = await console.get("/api/v1/task", params={"id": "alpha:twice"})
    assert api.status_code == 200, api.text
    listed = api.json()["task"]["attempts"]
    assert [(a["attempt"], a["executor"], a.get("exit_code")) for a in listed] == [
        (2, "exec-1", 0),
        (1, "exec-0", None),
    ]
    shown = cli(cluster.env(), "task", "show", "alpha:twice", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [a["attempt"] for a in json.loads(shown.stdout)["attempts"]] == [2, 1]
    text = cli(cluster.env(), "task", "show", "alpha:twice")
    assert "attempt 1: " in text.stdout and "on exec-0" in text.stdout
    assert "attempt 2: succeeded, on exec-1" in text.stdout and "exit 0" in text.stdout


@pytest.mark.slow
async def test_a_late_failed_attempt_lands_in_its_own_entry_through_the_projector(
    cluster: Cluster, db: Conn, console: Client
) -> None:
    """Reports as executors publish them, attempt 1's failure (exit 3) arriving after attempt 2
    succeeded (exit 0): the driver's projector keeps the row at attempt 2 and both exit codes
    in the history, and the task page shows them."""
    cluster.driver()
    now = datetime.now(UTC).replace(microsecond=0)
    common: dict[str, Any] = {
        "task_id": "beta:late",
        "client": "beta",
        "key": "late",
        "submitted_at": now,
        "run": 5,
        "sensitive": True,
    }
    t1, t2 = now + timedelta(seconds=1), now + timedelta(seconds=10)
    events = [
        Running(**common, attempt=2, at=t2, executor="exec-b", started_at=t2),
        Succeeded(
            **common,
            attempt=2,
            at=t2,
            executor="exec-b",
            exit_code=0,
            started_at=t2,
            finished_at=t2 + timedelta(seconds=3),
        ),
        Failed(
            **common,
            attempt=1,
            at=t1,
            executor="exec-a",
            exit_code=3,
            reason="exit code 3",
            started_at=t1,
            finished_at=t1 + timedelta(seconds=2),
        ),
    ]
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        for event in events:
            await js.publish(names.event_subject("beta"), encode(event))
    finally:
        await nc.close()

    async def both_attempts() -> Any:
        cur = await db.execute(
            "SELECT state, attempt, exit_code, attempts FROM tasks WHERE task_id = 'beta:late'"
        )
        row = await cur.fetchone()
        return row if row is not None and len(row[3]) == 2 else None

    state, attempt, exit_code, stored = await wait_for(
        both_attempts, timeout=30, what="both attempts of beta:late projected"
    )
    assert (state, attempt, exit_code) == ("succeeded", 2, 0)
    assert (stored["1"]["state"], stored["1"]["exit_code"], stored["1"]["executor"]) == (
        "failed",
        3,
        "exec-a",
    )
    assert (stored["2"]["state"], stored["2"]["exit_code"]) == ("succeeded", 0)

    page = await console.get("/task", params={"id": "beta:late"})
    assert page.status_code == 200, page.text
    cells = attempt_rows(page.text, "task-attempts")
    assert [(c[0], c[1], c[4], c[5], c[6], c[7]) for c in cells] == [
        ("2", "exec-b", "3.000 s", "0", "succeeded", ""),
        ("1", "exec-a", "2.000 s", "3", "failed", "exit code 3"),
    ]
