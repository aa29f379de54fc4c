"""The embedded PostgreSQL asks for passwords, and the components are not superusers."""

from __future__ import annotations

import stat

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tidegate.embedded.servers import APP_ROLE, EmbeddedPostgres
from tidegate.store.migrate import migrate


def _without_password(url: str) -> str:
    params = conninfo_to_dict(url)
    params.pop("password", None)
    return make_conninfo(**params)


async def test_passwords_are_required_and_the_application_role_is_not_a_superuser(
    pg_server: EmbeddedPostgres | None, database_url: str
) -> None:
    if pg_server is None:
        pytest.skip("TIDEGATE_TEST_DATABASE_URL names a server of someone else's")
    for url in (pg_server.url, pg_server.admin_url, database_url):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(_without_password(url), connect_timeout=5).close()
        wrong = conninfo_to_dict(url) | {"password": "guess"}
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(make_conninfo(**wrong), connect_timeout=5).close()
    mode = stat.S_IMODE(pg_server.passwords_path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    # The components' own role: it owns its database (migrations run), and no more.
    await migrate(database_url)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
        assert row == (APP_ROLE, False, False, False)
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE intruder SUPERUSER")
