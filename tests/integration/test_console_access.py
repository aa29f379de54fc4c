"""The console's access layer against real NATS and PostgreSQL: operators made with the CLI,
login, sessions that outlive outages, CSRF, roles, throttling, headers and cookies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from harness import cli, wait_for
from litestar.testing import AsyncTestClient

from tidegate.config import Connection, Settings
from tidegate.console.app import create_app
from tidegate.console.security import AccessConfig
from tidegate.embedded.servers import EmbeddedNats, EmbeddedPostgres, free_port
from tidegate.store import operators
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.up.login import first_login

PASSWORD = "correct horse battery staple"
Conn = psycopg.AsyncConnection[Any]
Client = AsyncTestClient[Any]
FAST = AccessConfig(roster_refresh_s=0.3, login_db_timeout_s=2.0)


def cli_env(nats_url: str, database_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env.update(
        TIDEGATE_NATS_URL=nats_url,
        TIDEGATE_DATABASE_URL=database_url,
        TIDEGATE_DATA_DIR=str(data_dir),
    )
    return env


def cli_stdin(env: dict[str, str], stdin: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *argv],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_operator(env: dict[str, str], name: str, role: str, password: str = PASSWORD) -> None:
    done = cli_stdin(
        env, password + "\n", "operator", "add", name, "--role", role, "--password-stdin"
    )
    assert done.returncode == 0, done.stderr
    assert "password" not in done.stdout  # given on stdin: never printed


@pytest.fixture
def env(nats_url: str, engine_db: str, tmp_path: Path) -> dict[str, str]:
    return cli_env(nats_url, engine_db, tmp_path)


@pytest.fixture
def settings(nats_url: str, engine_db: str, tmp_path: Path) -> Settings:
    return Settings(
        connection=Connection(nats_url=nats_url, database_url=engine_db, data_dir=tmp_path)
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings, FAST)) as c:
        yield c


def form_token(page: httpx.Response) -> str:
    found = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def login(
    client: Client, username: str, password: str = PASSWORD, next: str = "/account"
) -> httpx.Response:
    token = form_token(await client.get("/login"))
    return await client.post(
        "/login",
        data={"username": username, "password": password, "next": next, "_csrf_token": token},
        follow_redirects=False,
    )


def csrf(client: Client) -> dict[str, str]:
    token = client.cookies.get("csrftoken")
    assert token
    return {"x-csrftoken": token}


def another_browser(client: Client) -> Client:
    """A second cookie jar on the same running console (its lifespan belongs to `client`)."""
    return AsyncTestClient(app=client.app)


async def audit_rows(db: Conn) -> list[tuple[Any, ...]]:
    cur = await db.execute("SELECT actor, action, target, details FROM audit_log ORDER BY id")
    return await cur.fetchall()


# --- login ---------------------------------------------------------------------------------------


async def test_login_with_a_cli_created_operator(
    client: Client, env: dict[str, str], db: Conn
) -> None:
    add_operator(env, "alice", "operator")
    assert (await client.get("/api/session")).status_code == 401

    done = await login(client, "alice", next="/account")
    assert done.status_code == 303 and done.headers["location"] == "/account"
    page = await client.get("/account")
    assert page.status_code == 200
    assert "alice" in page.text and "operator" in page.text and "Log out" in page.text
    assert (await client.get("/api/session")).json() == {"username": "alice", "role": "operator"}

    out = await client.post("/logout", headers=csrf(client), follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert (await client.get("/api/session")).status_code == 401
    actions = [(a, act, t) for a, act, t, _ in await audit_rows(db)]
    assert actions == [
        ("cli", "operator.add", "alice"),
        ("alice", "login", "alice"),
        ("alice", "logout", "alice"),
    ]


async def test_wrong_password_is_refused_and_audited(
    client: Client, env: dict[str, str], db: Conn
) -> None:
    add_operator(env, "alice", "operator")
    for name, password in (("alice", "not the password"), ("nobody", PASSWORD)):
        refused = await login(client, name, password)
        assert refused.status_code == 401
        assert "wrong username or password" in refused.text  # the same for an unknown name
    assert (await client.get("/api/session")).status_code == 401
    failed = [row for row in await audit_rows(db) if row[1] == "login.failed"]
    assert [(a, t) for a, _, t, _ in failed] == [("anonymous", "alice"), ("anonymous", "nobody")]
    assert failed[0][3] == {"address": "testclient"}


async def test_pages_need_a_login_and_the_open_paths_stay_open(client: Client) -> None:
    page = await client.get("/account?x=1", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Faccount%3Fx%3D1"
    api = await client.get("/api/session")
    assert api.status_code == 401 and api.json()["detail"].startswith("not logged in")
    fragment = await client.get(
        "/account", headers={"HX-Request": "true", "HX-Current-URL": "http://x/account"}
    )
    assert fragment.status_code == 401 and fragment.headers["hx-redirect"].startswith("/login")
    assert (await client.get("/login")).status_code == 200
    assert (await client.get("/static/console.css")).status_code == 200
    assert (await client.get("/static/htmx/htmx.min.js")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    # Another site's URL is never where a login leads.
    sneaky = await client.get("/login?next=//evil.example/x")
    assert 'value="/"' in sneaky.text


async def test_failed_logins_are_throttled_per_username_and_per_address(
    settings: Settings, env: dict[str, str], db: Conn
) -> None:
    add_operator(env, "alice", "operator")
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        for attempt in range(1, 6):
            refused = await login(client, "alice", f"guess number {attempt}")
            assert refused.status_code == 401
        assert "too many failed logins" in refused.text
        # Now even the right password waits: the answer does not say whether it was right.
        blocked = await login(client, "alice", PASSWORD)
        assert blocked.status_code == 429
        assert re.search(r"too many failed logins, try again in \d+ s", blocked.text)
        assert 290 <= int(blocked.headers["retry-after"]) <= 300
    throttled = [r for r in await audit_rows(db) if r[1] == "login.failed"]
    # The lock is 300 s from the fifth failure; a loaded machine may take a moment to record it.
    assert len(throttled) == 5 and 290 <= throttled[-1][3]["throttled_for_s"] <= 300

    # One address trying many names is stopped too (a fresh console: counts are in memory).
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        for i in range(5):
            assert (await login(client, f"user{i}", "whatever it is")).status_code == 401
        assert (await login(client, "alice", PASSWORD)).status_code == 429


async def test_login_while_the_database_is_down_is_a_clear_503(tmp_path: Path) -> None:
    nobody = free_port()  # nothing listens there
    settings = Settings(
        connection=Connection(
            nats_url=f"nats://127.0.0.1:{nobody}",
            database_url=f"postgresql://postgres@127.0.0.1:{nobody}/postgres",
            data_dir=tmp_path,
        )
    )
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        refused = await login(client, "alice")
        assert refused.status_code == 503
        assert (
            "the database is unreachable: new logins are not possible until it is back; "
            "operators already logged in are not affected"
        ) in refused.text


async def test_login_on_a_database_not_migrated_says_so(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        connection=Connection(nats_url=nats_url, database_url=database_url, data_dir=tmp_path)
    )
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        refused = await login(client, "alice")
        assert refused.status_code == 503 and "tidegate migrate" in refused.text


# --- CSRF and roles ------------------------------------------------------------------------------


async def test_mutations_need_the_csrf_token(client: Client, env: dict[str, str]) -> None:
    add_operator(env, "alice", "operator")
    token = form_token(await client.get("/login"))
    no_token = await client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert no_token.status_code == 403 and "CSRF" in no_token.text
    wrong = await client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "_csrf_token": token[::-1]}
    )
    assert wrong.status_code == 403
    assert (await login(client, "alice")).status_code == 303

    for path in ("/logout", "/account/password"):
        refused = await client.post(path, data={"current": PASSWORD}, follow_redirects=False)
        assert refused.status_code == 403, path
        assert "reload the page" in refused.text
    # A token of another site's making (another console's secret) is refused as well.
    forged = await client.post("/logout", headers={"x-csrftoken": "0" * 128})
    assert forged.status_code == 403
    assert (await client.get("/api/session")).status_code == 200  # still logged in


async def test_a_viewer_may_look_but_not_change(client: Client, env: dict[str, str]) -> None:
    add_operator(env, "victor", "viewer")
    assert (await login(client, "victor")).status_code == 303
    page = await client.get("/account")
    assert page.status_code == 200 and "change nothing" in page.text
    refused = await client.post(
        "/account/password",
        data={"current": PASSWORD, "new": "x" * 20, "again": "x" * 20},
        headers=csrf(client),
    )
    assert refused.status_code == 403
    assert "victor is a viewer" in refused.text and "operator role" in refused.text
    # Logging out is not a change to the system: a viewer may.
    out = await client.post("/logout", headers=csrf(client), follow_redirects=False)
    assert out.status_code == 303


async def test_an_operator_changes_their_password_and_other_sessions_end(
    settings: Settings, env: dict[str, str], db: Conn
) -> None:
    add_operator(env, "alice", "operator")
    async with AsyncTestClient(app=create_app(settings, FAST)) as one:
        two = another_browser(one)
        assert (await login(one, "alice")).status_code == 303
        assert (await login(two, "alice")).status_code == 303
        new = "a new and longer password"
        changed = await one.post(
            "/account/password",
            data={"current": PASSWORD, "new": new, "again": new},
            headers=csrf(one),
        )
        assert changed.status_code == 200 and "password changed" in changed.text

        async def two_logged_out() -> bool:
            return (await two.get("/api/session")).status_code == 401

        await wait_for(two_logged_out, timeout=10, what="the other session to end")
        assert (await one.get("/api/session")).status_code == 200
        assert (await login(two, "alice", new)).status_code == 303
    assert ("alice", "operator.set-password", "alice") in [r[:3] for r in await audit_rows(db)]


async def test_a_removed_operator_is_logged_out(client: Client, env: dict[str, str]) -> None:
    add_operator(env, "bob", "operator")
    assert (await login(client, "bob")).status_code == 303
    assert (await client.get("/api/session")).status_code == 200
    done = cli(env, "operator", "remove", "bob")
    assert done.returncode == 0, done.stderr

    async def logged_out() -> bool:
        return (await client.get("/api/session")).status_code == 401

    await wait_for(logged_out, timeout=10, what="the removed operator's session to end")


# --- headers and cookies -------------------------------------------------------------------------


async def test_security_headers_on_every_response(client: Client) -> None:
    for path in ("/login", "/health", "/static/console.css", "/api/session", "/no-such-page"):
        response = await client.get(path, follow_redirects=False)
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["referrer-policy"] == "same-origin", path
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
    login_page = await client.get("/login")
    # The page loads htmx from the console itself and carries the token for htmx to send.
    assert 'src="/static/htmx/htmx.min.js"' in login_page.text
    assert "<script>" not in login_page.text and "style=" not in login_page.text
    assert re.search(r"hx-headers='\{\"x-csrftoken\": \"[0-9a-f]{128}\"\}'", login_page.text)


def _set_cookie(response: httpx.Response, name: str) -> str:
    found = [c for c in response.headers.get_list("set-cookie") if c.startswith(name + "=")]
    assert found, response.headers
    return found[0]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_cookie_flags(settings: Settings, env: dict[str, str], scheme: str) -> None:
    add_operator(env, "alice", "operator")
    app = create_app(settings, FAST)
    async with AsyncTestClient(app=app, base_url=f"{scheme}://console.test") as client:
        page = await client.get("/login")
        assert "tg_session" not in page.headers.get("set-cookie", "")  # none before login
        csrf_cookie = _set_cookie(page, "csrftoken")
        done = await login(client, "alice")
        session = _set_cookie(done, "tg_session")
    for cookie in (session, csrf_cookie):
        assert "HttpOnly" in cookie
        assert ("Secure" in cookie) == (scheme == "https")
    assert "SameSite=lax" in session
    assert "SameSite=strict" in csrf_cookie


# --- outages -------------------------------------------------------------------------------------


@pytest.fixture
def own_servers(tmp_path: Path) -> Iterator[tuple[EmbeddedNats, EmbeddedPostgres]]:
    """A nats-server on a fixed port (a restart comes back where clients look for it) and a
    PostgreSQL of this test's own, to stop."""
    nats = EmbeddedNats(tmp_path / "nats", port=free_port())
    pg = EmbeddedPostgres(tmp_path / "pg", port=free_port(), options=("-c fsync=off",))
    nats.start()
    try:
        pg.start()
        yield nats, pg
    finally:
        pg.stop()
        nats.stop()


async def test_a_session_survives_database_and_nats_outages(
    own_servers: tuple[EmbeddedNats, EmbeddedPostgres], tmp_path: Path
) -> None:
    nats, pg = own_servers
    database_url = pg.url
    await migrate(database_url)
    add_operator(cli_env(nats.url, database_url, tmp_path), "alice", "operator")
    settings = Settings(
        connection=Connection(nats_url=nats.url, database_url=database_url, data_dir=tmp_path)
    )
    async with AsyncTestClient(app=create_app(settings, FAST)) as first:
        assert (await login(first, "alice")).status_code == 303
        cookies = dict(first.cookies)

        pg.stop(mode="immediate")  # a crash, not a polite shutdown

        async def degraded() -> bool:
            health = await first.get("/health")
            return health.status_code == 503 and health.json() == {
                "status": "degraded",
                "nats": True,
                "database": False,
            }

        await wait_for(degraded, timeout=15, what="/health to say the database is down")
        page = await first.get("/account")
        assert page.status_code == 200 and "alice" in page.text
        # The overview still renders, with what it has, and says what is missing.
        overview = await first.get("/")
        assert overview.status_code == 200 and "PostgreSQL" in overview.text
        # A new login cannot be checked, and says so; the logged-in one is untouched.
        refused = await login(another_browser(first), "alice")
        assert refused.status_code == 503 and "new logins are not possible" in refused.text
        out = await first.post("/logout", headers=csrf(first), follow_redirects=False)
        assert out.status_code == 303  # and the audit line is only logged: no error shown
        assert (await login(first, "alice")).status_code == 503
        first.cookies.update(cookies)  # the session from before the logout ...
        assert (await first.get("/api/session")).status_code == 401  # ... is over

    # A new session, then NATS goes down as well: memory carries it.
    pg.start()
    async with AsyncTestClient(app=create_app(settings, FAST)) as second:
        assert (await login(second, "alice")).status_code == 303
        cookies = dict(second.cookies)
        pg.stop(mode="immediate")
        nats.stop()
        assert (await second.get("/api/session")).status_code == 200
        assert (await second.get("/account")).status_code == 200

    # A restarted console (empty memory) finds the session in KV, the database still down.
    nats.start()
    async with AsyncTestClient(app=create_app(settings, FAST)) as third:
        third.cookies.update(cookies)
        me = await third.get("/api/session")
        assert me.status_code == 200 and me.json()["username"] == "alice"


# --- the first operator of `tidegate up` --------------------------------------------------------


async def test_the_first_operator_is_made_once_and_its_login_kept(
    engine_db: str, env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with Store(engine_db) as store:
        login = await first_login(store, data)
        assert login is not None and login.username == "admin"
        assert (data / "operator.json").stat().st_mode & 0o777 == 0o600
        assert await first_login(store, data) == login  # a later `up`: the same login
        roles = [(o.username, o.role) for o in await operators.list_operators(store)]
        assert roles == [("admin", "operator")]

        # Someone changed the password: `up` has none to show, and does not reset it.
        await operators.set_password(store, username="admin", password=PASSWORD, actor="t")
        assert await first_login(store, data) is None
        assert not (data / "operator.json").exists()
        assert len(await operators.list_operators(store)) == 1

        # Nobody left at all: a new first operator.
        await operators.remove_operator(store, username="admin", actor="t")
        again = await first_login(store, data)
        assert again is not None and again.password != login.password


# --- the command line ----------------------------------------------------------------------------


def test_operator_commands(env: dict[str, str], engine_db: str) -> None:
    added = cli(env, "operator", "add", "carol", "--role", "operator")
    assert added.returncode == 0, added.stderr
    assert "operator carol added (role operator)" in added.stdout
    generated = re.search(r"password \(shown once; it cannot be recovered\): (\S+)", added.stdout)
    assert generated and len(generated.group(1)) >= 20
    assert cli(env, "operator", "add", "dave").returncode == 0  # viewer by default

    again = cli(env, "operator", "add", "carol")
    assert again.returncode == 2 and "already exists" in again.stderr
    bad_name = cli(env, "operator", "add", "no spaces")
    assert bad_name.returncode == 2 and "is not valid" in bad_name.stderr
    bad_role = cli(env, "operator", "add", "erin", "--role", "admin")
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr
    short = cli_stdin(env, "short\n", "operator", "add", "erin", "--password-stdin")
    assert short.returncode == 2 and "at least 12 characters" in short.stderr

    listed = cli(env, "operator", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["username"], r["role"]) for r in rows] == [("carol", "operator"), ("dave", "viewer")]
    assert set(rows[0]) == {"username", "role", "created_at", "updated_at"}
    text = cli(env, "operator", "list")
    assert text.returncode == 0 and "carol" in text.stdout and "viewer" in text.stdout

    changed = cli_stdin(
        env, PASSWORD + "\n", "operator", "set-password", "carol", "--password-stdin"
    )
    assert changed.returncode == 0, changed.stderr
    assert "password of carol changed" in changed.stdout and PASSWORD not in changed.stdout
    reset = cli(env, "operator", "set-password", "dave")
    assert reset.returncode == 0 and "shown once" in reset.stdout
    unknown = cli(env, "operator", "set-password", "zed")
    assert unknown.returncode == 2 and "no operator named 'zed'" in unknown.stderr

    assert cli(env, "operator", "remove", "dave").returncode == 0
    gone = cli(env, "operator", "remove", "dave")
    assert gone.returncode == 2 and "no operator named 'dave'" in gone.stderr

    with psycopg.connect(engine_db) as conn:
        rows = conn.execute("SELECT actor, action, target FROM audit_log ORDER BY id").fetchall()
    assert rows == [
        ("cli", "operator.add", "carol"),
        ("cli", "operator.add", "dave"),
        ("cli", "operator.set-password", "carol"),
        ("cli", "operator.set-password", "dave"),
        ("cli", "operator.remove", "dave"),
    ]
    with psycopg.connect(engine_db) as conn:
        stored = conn.execute("SELECT password_hash FROM operators").fetchall()
    assert all(h.startswith("$argon2id$") for (h,) in stored)  # never the password itself
