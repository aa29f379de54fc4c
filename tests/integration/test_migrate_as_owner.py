"""Every migration applies as a role that only owns its database: the one compose.yaml's
PostgreSQL init script makes (run here with psql, as the postgres image runs it, against the
suite's server), LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE.

Docker cannot run here; tests/unit/test_compose.py checks the script is mounted into the
image's /docker-entrypoint-initdb.d and holds no `$` (so compose interpolates nothing into it).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tidegate.embedded.servers import EmbeddedPostgres, _pg_bin
from tidegate.store.migrate import available, migrate

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def _init_script() -> str:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    script: str = document["configs"]["postgres-init"]["content"]
    return script


@pytest.fixture
def admin_url(pg_server: EmbeddedPostgres | None) -> str:
    """A connection that may create roles and databases, as the image's superuser does."""
    if pg_server is not None:
        return pg_server.admin_url
    url = os.environ["TIDEGATE_TEST_DATABASE_URL"]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT rolsuper OR (rolcreaterole AND rolcreatedb) FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
    if not (row and row[0]):
        pytest.skip("TIDEGATE_TEST_DATABASE_URL's role cannot create roles and databases")
    return url


@pytest.fixture
def owner_name(admin_url: str) -> Iterator[str]:
    """The name of the role and of its database; both are dropped afterwards."""
    name = f"tg_owner_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _run_init_script(
    admin_url: str, tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """As docker-entrypoint.sh runs a `*.sql` init file: psql -v ON_ERROR_STOP=1 --no-psqlrc
    -f FILE, as the superuser, with the container's environment (the password in PGPASSWORD,
    not on the command line)."""
    script = tmp_path / "10-tidegate.sql"
    script.write_text(_init_script())
    params = conninfo_to_dict(admin_url)
    password = str(params.pop("password", "") or "")
    return subprocess.run(
        [
            str(_pg_bin() / "psql"),
            "-v",
            "ON_ERROR_STOP=1",
            "--no-password",
            "--no-psqlrc",
            "--dbname",
            make_conninfo("", **params),
            "-f",
            str(script),
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": password, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_every_migration_applies_as_the_compose_init_scripts_owner_role(
    admin_url: str, owner_name: str, tmp_path: Path
) -> None:
    password = secrets.token_urlsafe(24)
    done = _run_init_script(
        admin_url,
        tmp_path,
        {
            "TIDEGATE_DB_USER": owner_name,
            "TIDEGATE_DB_NAME": owner_name,
            "TIDEGATE_DB_PASSWORD": password,
        },
    )
    assert done.returncode == 0, done.stderr
    params = conninfo_to_dict(admin_url) | {
        "user": owner_name,
        "password": password,
        "dbname": owner_name,
    }
    owner_url = make_conninfo("", **params)

    applied = await migrate(owner_url)

    everything = [m.version for m in available()]
    assert applied == everything and len(everything) >= 12
    # Again, as every driver's start does: the advisory lock, nothing left to apply.
    assert await migrate(owner_url) == []
    with psycopg.connect(owner_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (owner_name, False, False, False, True)
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert owner == (owner_name,)
        # What the drivers do later as this role: daily partitions made and dropped.
        conn.execute("SELECT tg_ensure_partition(%s)", (date(2026, 1, 2),))
        assert conn.execute("SELECT to_regclass('tasks_20260102') IS NOT NULL").fetchone() == (
            True,
        )
        dropped = conn.execute("SELECT tg_drop_partitions_before(%s)", (date(2026, 1, 3),))
        assert dropped.fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE intruder")


async def test_the_init_script_stops_without_the_password(
    admin_url: str, owner_name: str, tmp_path: Path
) -> None:
    """Unset, psql's variable stays unexpanded: the script fails (ON_ERROR_STOP) and makes no
    role, rather than one without a password."""
    done = _run_init_script(
        admin_url, tmp_path, {"TIDEGATE_DB_USER": owner_name, "TIDEGATE_DB_NAME": owner_name}
    )
    assert done.returncode != 0 and "syntax error" in done.stderr, done.stderr
    with psycopg.connect(admin_url) as conn:
        found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner_name,))
        assert found.fetchone() is None
