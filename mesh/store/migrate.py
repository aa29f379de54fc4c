"""Apply the numbered SQL migrations shipped in the `migrations` package.

Every driver runs this at start, so several may race: a session advisory lock serialises them
and the loser finds everything applied. Each file runs in its own transaction together with
its `schema_migrations` row, so a file is either fully applied and recorded, or neither.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib.resources import files

import psycopg

from tidegate.errors import MigrationError
from tidegate.store.queries import Q

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_\w+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # the file name without `.sql`, e.g. `0001_init`
    sql: str


def available(package: str = "tidegate.migrations") -> list[Migration]:
    """The package's `NNNN_*.sql` files in order; two files with one number is an error."""
    found: dict[str, Migration] = {}
    for entry in files(package).iterdir():
        match = _FILE.match(entry.name)
        if not match:
            continue
        number = match.group(1)
        if number in found:
            raise MigrationError(
                f"two migrations numbered {number}: {found[number].version}.sql and {entry.name}"
            )
        found[number] = Migration(entry.name.removesuffix(".sql"), entry.read_text("utf-8"))
    return [found[n] for n in sorted(found)]


async def migrate(conninfo: str, *, package: str = "tidegate.migrations") -> list[str]:
    """Apply every migration not yet applied; return the versions applied by this call."""
    pending = available(package)
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to the database to migrate: {exc}") from exc
    applied_now: list[str] = []
    async with conn:
        current = "schema_migrations"
        try:
            await conn.execute(Q.lock_migrations)
            await conn.execute(Q.create_schema_migrations)
            cur = await conn.execute(Q.applied_migrations)
            done = {str(version) for (version,) in await cur.fetchall()}
            for migration in pending:
                if migration.version in done:
                    continue
                current = f"{migration.version}.sql"
                async with conn.transaction():
                    # No parameters: psycopg sends the file as one simple query, so it may hold
                    # many statements and `%` needs no escaping.
                    await conn.execute(migration.sql.encode())
                    await conn.execute(Q.record_migration, {"version": migration.version})
                log.info("applied migration %s", migration.version)
                applied_now.append(migration.version)
            current = "schema_migrations"
            # Closing the connection would release the lock too; unlocking says we are done.
            await conn.execute(Q.unlock_migrations)
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {current} failed: {exc}"
                + (f" (applied before it: {', '.join(applied_now)})" if applied_now else "")
            ) from exc
    return applied_now
