"""Real servers for the suite: a nats-server per test, one PostgreSQL per session.

PostgreSQL comes from the `pgserver` wheel unless TIDEGATE_TEST_DATABASE_URL names a server
(any database on it; the suite creates and drops its own databases there).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from harness import CLIENTS, Cluster, register
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from upharness import Up, stop_all

from tidegate.embedded.servers import EmbeddedNats, EmbeddedPostgres
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres | None]:
    """The suite's PostgreSQL, as `tidegate up` runs it (passwords, a non-superuser role that
    owns each test's database); None when TIDEGATE_TEST_DATABASE_URL names one instead."""
    if os.environ.get("TIDEGATE_TEST_DATABASE_URL"):
        yield None
        return
    # Durability settings off: the suite tests logic, not the disk; the fault tests stop the
    # server with `pg_ctl -m immediate`-like kills through their own fixture.
    server = EmbeddedPostgres(
        tmp_path_factory.mktemp("pg"),
        options=("-c fsync=off", "-c synchronous_commit=off", "-c max_connections=300"),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_url(pg_server: EmbeddedPostgres | None) -> Iterator[str]:
    """A fresh, empty database for one test (migrations not applied)."""
    name = f"tg_{uuid.uuid4().hex[:12]}"
    if pg_server is not None:
        yield pg_server.create_database(name)
        pg_server.drop_database(name)
        return
    pg_server_url = os.environ["TIDEGATE_TEST_DATABASE_URL"]
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(pg_server_url)
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server with JetStream of this test's own (stop/start it to provoke outages)."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def engine_db(database_url: str, nats_url: str) -> str:
    await migrate(database_url)
    await register(nats_url, database_url, *(ClientRecord(name=n) for n in CLIENTS))
    return database_url


@pytest.fixture
def cluster(nats_url: str, engine_db: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
    yield c
    c.stop_all()


@pytest.fixture
async def db(engine_db: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    async with await psycopg.AsyncConnection.connect(engine_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    """Every `tidegate up` a test makes; whatever is still running afterwards is stopped."""
    made: list[Up] = []
    yield made
    stop_all(made)
