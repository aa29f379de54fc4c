"""The PostgreSQL store against a real server: migrations, monotone upserts, partitions, clients."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from importlib.resources import files
from pathlib import Path

import msgspec
import psycopg
import pytest
from psycopg import sql

from tidegate import wire
from tidegate.errors import MigrationError, StoreError, UnknownClient, UsageError
from tidegate.store.migrate import available, migrate
from tidegate.store.queries import FILES, Q, load, parse
from tidegate.store.rows import TaskRow, coalesce
from tidegate.store.store import Store, TaskRecord
from tidegate.wire import ClientRecord

# Days long past, so that no partition for "tomorrow" is made ahead (see test_tomorrow_ahead).
DAY1 = datetime(2024, 11, 27, 23, 0, tzinfo=UTC)
DAY2 = datetime(2024, 11, 28, 0, 0, 1, tzinfo=UTC)
SPEC = wire.TaskSpec(
    key="k",
    argv=["/bin/echo", "hi"],
    env={"A": "1"},
    cwd="/tmp",
    timeout_s=60,
    labels={"name": "daily"},
    priority=5,
    max_attempts=2,
)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url)
    async with Store(database_url, max_size=8) as s:
        yield s


def row(task_id: str, state: str, attempt: int = 1, at: datetime = DAY1, **kw: object) -> TaskRow:
    client, key = task_id.split(":", 1)
    return TaskRow(
        task_id=task_id, client=client, key=key, submitted_at=at, state=state, attempt=attempt, **kw
    )  # type: ignore[arg-type]


def history(task_id: str) -> list[TaskRow]:
    """Two attempts of one task, every report; no two share an (attempt, rank)."""
    s1, s2 = DAY1 + timedelta(seconds=1), DAY1 + timedelta(seconds=40)
    return [
        row(task_id, "queued", spec=SPEC, pool="default", task_class="short"),
        row(task_id, "dispatched", executor="e1"),
        row(task_id, "running", executor="e1", started_at=s1, pool="default"),
        row(task_id, "lost", reason="executor e1 vanished"),
        row(task_id, "dispatched", attempt=2, executor="e2"),
        row(task_id, "running", attempt=2, executor="e2", started_at=s2),
        row(
            task_id,
            "succeeded",
            attempt=2,
            executor="e2",
            exit_code=0,
            reason="",
            log_tail="hi\n",
            started_at=s2,
            finished_at=s2 + timedelta(seconds=2.5),
        ),
    ]


def essence(rec: TaskRecord | None) -> dict[str, object]:
    assert rec is not None
    d = msgspec.structs.asdict(rec)
    del d["updated_at"], d["task_id"], d["key"]
    return d


async def partitions(url: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'tasks'::regclass ORDER BY 1"
        )
        return [str(r[0]) for r in await cur.fetchall()]


# --- migrations ------------------------------------------------------------------------------


ALL_VERSIONS = [m.version for m in available()]


async def test_migrate_applies_once(database_url: str) -> None:
    assert ALL_VERSIONS[0] == "0001_init"
    assert await migrate(database_url) == ALL_VERSIONS
    assert await migrate(database_url) == []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [v for (v,) in await cur.fetchall()] == ALL_VERSIONS


async def test_concurrent_migrate_applies_exactly_once(database_url: str) -> None:
    results = await asyncio.gather(*(migrate(database_url) for _ in range(4)))
    assert sorted(results) == [[], [], [], ALL_VERSIONS]


async def test_failing_migration_names_the_file(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "tg_test_bad_migrations"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "0001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (pkg / "0002_bad.sql").write_text("CREATE TABLE half (x int);\nSELEC 1;")
    (pkg / "0003_later.sql").write_text("CREATE TABLE later (x int);")
    (pkg / "notes.txt").write_text("not a migration")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MigrationError, match=r"0002_bad\.sql.*SELEC"):
        await migrate(database_url, package="tg_test_bad_migrations")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations")
        assert await cur.fetchall() == [("0001_ok",)]
        cur = await conn.execute("SELECT to_regclass('half'), to_regclass('later')")
        assert await cur.fetchone() == (None, None)


async def test_migrate_unreachable_database() -> None:
    with pytest.raises(MigrationError, match="cannot connect"):
        await migrate("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


# --- the monotone upsert ---------------------------------------------------------------------


async def test_upsert_is_monotone_in_any_order(store: Store) -> None:
    expected = coalesce(history("c:ref"))[0]
    assert (expected.state, expected.attempt, expected.spec) == ("succeeded", 2, SPEC)
    rng = random.Random(7)
    finals = []
    for i in range(12):
        rows = history(f"c:one-{i}")
        rng.shuffle(rows)
        for r in rows:
            await store.upsert_task_one(r)
        finals.append(essence(await store.get_task(f"c:one-{i}")))
        # The batch path, from a shuffled batch with the same rows twice over.
        batch = history(f"c:batch-{i}") * 2
        rng.shuffle(batch)
        assert await store.upsert_tasks(batch) == 1
        finals.append(essence(await store.get_task(f"c:batch-{i}")))
    assert all(f == finals[0] for f in finals)
    final = finals[0]
    assert (final["state"], final["attempt"], final["executor"]) == ("succeeded", 2, "e2")
    assert final["started_at"] == expected.started_at
    assert final["argv"] == SPEC.argv  # the spec survived whatever came after it
    assert final["duration_s"] == 2.5


async def test_stale_attempt_terminal_does_not_overwrite(store: Store) -> None:
    t2 = DAY1 + timedelta(minutes=5)
    await store.upsert_task_one(row("c:t", "running", attempt=2, executor="e2", started_at=t2))
    written = await store.upsert_task_one(
        row(
            "c:t",
            "failed",
            attempt=1,
            executor="e1",
            exit_code=9,
            reason="late",
            started_at=DAY1,
            finished_at=DAY1 + timedelta(minutes=1),
        )
    )
    # Written to attempt 1's entry of the attempts history only (migration 0009).
    assert written == 1
    rec = await store.get_task("c:t")
    assert rec is not None
    assert (rec.state, rec.attempt, rec.executor, rec.exit_code, rec.reason) == (
        "running",
        2,
        "e2",
        None,
        None,
    )
    assert rec.started_at == t2 and rec.finished_at is None
    assert [(a.attempt, a.state, a.exit_code) for a in rec.attempts] == [
        (2, "running", None),
        (1, "failed", 9),
    ]


async def test_spec_arriving_after_running_fills_in(store: Store) -> None:
    await store.upsert_tasks([row("c:s", "running", executor="e1", started_at=DAY1)])
    rec = await store.get_task("c:s")
    assert rec is not None and rec.argv is None and rec.max_attempts is None
    assert (
        await store.upsert_tasks(
            [row("c:s", "queued", spec=SPEC, pool="default", task_class="short")]
        )
        == 1
    )
    rec = await store.get_task("c:s")
    assert rec is not None
    assert (rec.state, rec.pool, rec.task_class) == ("running", "default", "short")
    assert (rec.argv, rec.env, rec.cwd, rec.labels) == (SPEC.argv, SPEC.env, "/tmp", SPEC.labels)
    assert (rec.timeout_s, rec.priority, rec.max_attempts) == (60.0, 5, 2)
    assert (
        await store.upsert_tasks(
            [row("c:s", "queued", spec=SPEC, pool="default", task_class="short")]
        )
        == 0
    )


async def test_big_batch_across_two_days(store: Store, database_url: str) -> None:
    rows = [
        row(
            f"c{i % 7}:k{i}",
            "queued",
            at=DAY1 if i % 2 else DAY2,
            spec=SPEC,
            pool="default",
            task_class="short",
        )
        for i in range(10_000)
    ]
    assert await store.upsert_tasks(rows) == 10_000
    assert await partitions(database_url) == ["tasks_20241127", "tasks_20241128"]
    counts = await store.count_tasks_by_state()
    assert counts["queued"] == 10_000 and counts["running"] == 0
    assert set(counts) == set(wire.STATE_RANK)
    # Replaying the same batch changes nothing and writes nothing.
    assert await store.upsert_tasks(rows) == 0
    running = [
        dataclasses.replace(r, state="running", executor="e", started_at=DAY2) for r in rows[:3000]
    ]
    assert await store.upsert_tasks(running) == 3000
    assert (await store.count_tasks_by_state())["running"] == 3000
    day2 = await store.count_tasks_by_state(since=DAY2.date())
    assert day2["queued"] + day2["running"] == 5000


async def test_drop_partitions_before(store: Store, database_url: str) -> None:
    days = [DAY1 - timedelta(days=2), DAY1 - timedelta(days=1), DAY1, DAY2]
    await store.upsert_tasks([row(f"c:d{i}", "queued", at=d) for i, d in enumerate(days)])
    assert len(await partitions(database_url)) == 4
    assert await store.drop_partitions_before(DAY1.date()) == 2
    assert await partitions(database_url) == ["tasks_20241127", "tasks_20241128"]
    assert await store.get_task("c:d0") is None
    assert await store.get_task("c:d2") is not None
    assert await store.drop_partitions_before(DAY1.date()) == 0
    # A straggler for a dropped day re-creates its partition rather than failing the batch.
    assert await store.upsert_tasks([row("c:d0", "succeeded", at=days[0])]) == 1


async def test_partition_dropped_by_another_store(store: Store, database_url: str) -> None:
    await store.upsert_tasks([row("c:x", "queued", at=DAY1)])  # this store caches DAY1
    async with Store(database_url) as other:
        assert await other.drop_partitions_before(DAY2.date()) == 1
    assert await store.upsert_tasks([row("c:y", "queued", at=DAY1)]) == 1
    assert await partitions(database_url) == ["tasks_20241127"]


async def test_concurrent_ensure_partition(store: Store, database_url: str) -> None:
    day = date(2023, 1, 1)
    conns = [await psycopg.AsyncConnection.connect(database_url) for _ in range(8)]
    try:

        async def ensure(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
            async with conn.transaction():
                await conn.execute("SELECT tg_ensure_partition(%s)", (day,))
                await asyncio.sleep(0.05)  # hold the transaction so the others really wait

        await asyncio.gather(*(ensure(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    stores = [Store(database_url) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        await asyncio.gather(*(s.ensure_partitions([date(2023, 1, 2), day]) for s in stores))
        await asyncio.gather(
            *(
                s.upsert_tasks([row(f"c:p{i}", "queued", at=datetime(2023, 1, 3, tzinfo=UTC))])
                for i, s in enumerate(stores)
            )
        )
    finally:
        for s in stores:
            await s.close()
    assert await partitions(database_url) == ["tasks_20230101", "tasks_20230102", "tasks_20230103"]


async def test_tomorrow_is_made_ahead(store: Store, database_url: str) -> None:
    now = datetime.now(UTC)
    await store.upsert_tasks([row("c:now", "queued", at=now)])
    tomorrow = now.date() + timedelta(days=1)
    assert await partitions(database_url) == [f"tasks_{now:%Y%m%d}", f"tasks_{tomorrow:%Y%m%d}"]


async def test_upsert_raises_database_errors(database_url: str) -> None:
    async with Store(database_url) as s:  # not migrated: no tasks table
        with pytest.raises(psycopg.Error):
            await s.upsert_tasks([row("c:e", "queued")])
        with pytest.raises(StoreError, match="get_task"):
            await s.get_task("c:e")


# --- the SQL and the query helpers -----------------------------------------------------------


def sql_texts() -> dict[str, str]:
    return {name: files("tidegate.store").joinpath(name).read_text("utf-8") for name in FILES}


def test_one_loader_reads_every_sql_file() -> None:
    assert load(sql_texts()) == Q
    assert Q.upsert_tasks.startswith("INSERT INTO tasks")
    assert Q.outbox_enqueue.startswith("INSERT INTO callback_outbox")
    assert not any(line.lstrip().startswith("--") for line in Q.outbox_claim_rows.splitlines())


def test_loader_refuses_a_bad_set_of_queries() -> None:
    texts = sql_texts()
    with pytest.raises(ValueError, match=r"'get_task' is also defined in queries\.sql"):
        load({**texts, "more.sql": "-- name: get_task\nSELECT 1;"})
    with pytest.raises(ValueError, match=r"missing \['outbox_bury'\], extra \['buried'\]"):
        renamed = texts["outbox.sql"].replace("-- name: outbox_bury", "-- name: buried")
        load({**texts, "outbox.sql": renamed})
    with pytest.raises(ValueError, match=r"more\.sql: query 'nothing' is empty"):
        load({**texts, "more.sql": "-- name: nothing\n-- only a comment\n"})
    with pytest.raises(ValueError, match=r"x\.sql: query 'a' is defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;", "x.sql")


async def test_query_helpers(store: Store) -> None:
    # Parameters travel apart from the text: a quote in a value is data, never SQL.
    tricky = "x'); DROP TABLE tasks; --"
    assert await store.fetch_one("SELECT %(v)s::text AS v", {"v": tricky}) == {"v": tricky}
    assert await store.fetch_one("SELECT 1 AS n WHERE false") is None
    rows = await store.fetch_all("SELECT g AS n FROM generate_series(1, 3) AS g")
    assert rows == [{"n": 1}, {"n": 2}, {"n": 3}]
    await store.execute("CREATE TEMP TABLE IF NOT EXISTS t (v int)")
    with pytest.raises(psycopg.Error):  # without `what`, psycopg's own error, to classify
        await store.fetch_one("SELECT nope")
    with pytest.raises(StoreError, match="peek failed"):
        await store.fetch_all("SELECT nope", what="peek")


async def test_transaction_commits_or_rolls_back(store: Store, database_url: str) -> None:
    await store.execute("CREATE TABLE IF NOT EXISTS helper_t (v int)")
    async with store.transaction() as tx:
        assert await tx.execute("INSERT INTO helper_t VALUES (1), (2)") == 2
        assert await tx.fetch_one("SELECT count(*) AS n FROM helper_t") == {"n": 2}
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO helper_t VALUES (3)")
            raise RuntimeError("changed my mind")
    with pytest.raises(StoreError, match="fill failed"):
        async with store.transaction(what="fill") as tx:
            await tx.execute("INSERT INTO helper_t VALUES (4)")
            await tx.execute("INSERT INTO helper_t VALUES ('four')")
    assert await store.fetch_all("SELECT v FROM helper_t ORDER BY v") == [{"v": 1}, {"v": 2}]
    await store.execute("DROP TABLE helper_t")


# --- reading tasks ---------------------------------------------------------------------------


async def test_task_record_shape(store: Store) -> None:
    await store.upsert_tasks(history("c1:a"))
    rec = await store.get_task("c1:a")
    assert rec is not None
    shape = msgspec.json.decode(msgspec.json.encode(rec))
    assert list(shape) == [
        "task_id",
        "client",
        "key",
        "state",
        "attempt",
        "pool",
        "task_class",
        "executor",
        "exit_code",
        "reason",
        "log_tail",
        "submitted_at",
        "started_at",
        "finished_at",
        "duration_s",
        "updated_at",
        "argv",
        "shell",
        "env",
        "cwd",
        "timeout_s",
        "labels",
        "priority",
        "max_attempts",
        "run",
        "attempts",
    ]
    assert shape["task_id"] == "c1:a" and shape["key"] == "a" and shape["client"] == "c1"
    assert shape["duration_s"] == 2.5 and shape["exit_code"] == 0 and shape["shell"] is None
    assert shape["log_tail"] == "hi\n" and shape["submitted_at"] == "2024-11-27T23:00:00Z"

    await store.upsert_tasks([row("c1:b", "running", executor="e", started_at=DAY1)])
    rec = await store.get_task("c1:b")
    assert rec is not None
    assert rec.duration_s is None and rec.finished_at is None
    assert (rec.argv, rec.env, rec.timeout_s, rec.priority, rec.max_attempts) == (None,) * 5
    assert await store.get_task("c1:nope") is None


async def test_times_read_back_in_utc(store: Store, database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        db = sql.Identifier(conn.info.dbname)
        await conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'Asia/Tokyo'").format(db))
    async with Store(database_url) as tokyo:
        await tokyo.upsert_tasks([row("c:tz", "running", started_at=DAY1)])
        rec = await tokyo.get_task("c:tz")
    assert rec is not None
    assert msgspec.json.decode(msgspec.json.encode(rec))["started_at"] == "2024-11-27T23:00:00Z"


async def test_list_tasks(store: Store) -> None:
    rows = [
        row(f"c{i % 2}:k{i}", "failed" if i % 3 == 0 else "queued", at=DAY1 + timedelta(seconds=i))
        for i in range(12)
    ]
    await store.upsert_tasks(rows)
    everything = await store.list_tasks()
    assert [r.key for r in everything] == [f"k{i}" for i in reversed(range(12))]
    assert [r.key for r in await store.list_tasks(limit=2)] == ["k11", "k10"]
    assert {r.client for r in await store.list_tasks(client="c0")} == {"c0"}
    failed = await store.list_tasks(state="failed")
    assert [r.key for r in failed] == ["k9", "k6", "k3", "k0"]
    assert [r.key for r in await store.list_tasks(client="c1", state="failed")] == ["k9", "k3"]
    assert await store.list_tasks(client="nobody") == []
    with pytest.raises(UsageError, match="unknown state"):
        await store.list_tasks(state="finished")


# --- clients ---------------------------------------------------------------------------------


async def test_clients(store: Store) -> None:
    added = await store.add_client(
        ClientRecord(name="wf", sensitive=True, callback_url="https://wf.example/cb")
    )
    assert added.sensitive and added.created_at is not None and added.default_pool == "default"
    await store.add_client(ClientRecord(name="etl", callback_nats=True, max_running=10))
    with pytest.raises(StoreError, match="already exists"):
        await store.add_client(ClientRecord(name="wf"))
    assert await store.get_client("wf") == added
    assert await store.get_client("nope") is None
    assert [c.name for c in await store.list_clients()] == ["etl", "wf"]

    changed = await store.update_client("wf", sensitive=False, max_submit_per_s=50)
    assert not changed.sensitive and changed.max_submit_per_s == 50.0
    assert changed.callback_url == "https://wf.example/cb"  # untouched columns stay
    assert changed.updated_at is not None and added.updated_at is not None
    assert changed.updated_at > added.updated_at
    switched = await store.update_client("wf", callback_nats=True)  # drops the URL
    assert switched.callback_url is None and switched.callback_nats
    back = await store.update_client("etl", callback_url="https://etl.example/")
    assert back.callback_url == "https://etl.example/" and not back.callback_nats
    assert await store.update_client("wf") == switched

    with pytest.raises(UnknownClient, match="nope"):
        await store.update_client("nope", paused=True)
    with pytest.raises(StoreError, match="unknown field"):
        await store.update_client("wf", colour="red")  # type: ignore[call-arg]
    with pytest.raises(StoreError, match="max_running"):
        await store.update_client("wf", max_running="lots")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="not both"):
        await store.update_client("wf", callback_url="https://x.example/", callback_nats=True)
    with pytest.raises(StoreError, match="max_running must be 0 or more"):
        await store.update_client("wf", max_running=-1)
    with pytest.raises(StoreError, match="client name"):
        await store.add_client(ClientRecord(name="has space"))
    with pytest.raises(StoreError, match="http"):
        await store.add_client(ClientRecord(name="ftp", callback_url="ftp://x"))
    assert await store.get_client("wf") == switched
