"""A driver whose database URL can never work says why, loudly, instead of retrying in
silence; once an operator fixes the database, it finishes its setup by itself."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from harness import Cluster, wait_for
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tidegate.embedded.servers import EmbeddedPostgres

pytestmark = pytest.mark.timeout(120)


def _admin(pg_server: EmbeddedPostgres | None) -> str:
    """A URL allowed to create databases: the application role may not."""
    return (
        pg_server.admin_url if pg_server is not None else os.environ["TIDEGATE_TEST_DATABASE_URL"]
    )


async def test_a_missing_database_is_named_then_set_up_once_it_exists(
    cluster: Cluster, pg_server: EmbeddedPostgres | None
) -> None:
    name = f"tg_missing_{uuid.uuid4().hex[:8]}"
    params = conninfo_to_dict(cluster.database_url)
    params["dbname"] = name
    driver = cluster.driver(TIDEGATE_DATABASE_URL=make_conninfo(**params))

    async def refused() -> bool:
        return "the database or role named in the URL does not exist" in driver.log()

    await wait_for(refused, timeout=30, what="the driver naming the missing database")
    log = driver.log()
    assert "ConfigError" in log and "fix TIDEGATE_DATABASE_URL" in log
    assert driver.alive()  # routing and dispatch need no database

    if pg_server is not None:
        pg_server.create_database(name)  # owned by the application role, as `up` makes it
    else:
        with psycopg.connect(_admin(pg_server), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:

        async def set_up() -> bool:
            return "applied migrations" in driver.log()

        await wait_for(set_up, timeout=40, what="the driver's setup after the fix")
        assert driver.alive()
    finally:
        driver.stop()
        with psycopg.connect(_admin(pg_server), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
