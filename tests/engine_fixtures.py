"""Fixtures shared by the engine's integration tests: a migrated database and a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from mesh.clients import publish_client
from mesh.config import Settings
from mesh.natsconn import connect
from mesh.store.migrate import migrate
from mesh.store.rows import ClientRecord
from mesh.store.store import Store
from mesh.topology import ensure_all
from tests.harness import FAST_ENV, Cluster

CLIENTS = ["alpha", "beta", "gamma", "delta", "epsilon"]


async def register(nats_url: str, database_url: str, *records: ClientRecord) -> None:
    nc = await connect(nats_url, "test-setup")
    try:
        buckets = await ensure_all(nc.jetstream(), Settings.from_env(FAST_ENV).limits)
        async with Store(database_url) as store:
            for record in records:
                await store.add_client(record)
                stored = await store.get_client(record.name)
                assert stored is not None
                await publish_client(buckets.clients, stored)
    finally:
        await nc.drain()


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
