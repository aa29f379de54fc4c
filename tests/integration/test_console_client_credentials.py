"""A client added in the console gets its own NATS credentials, shown once, that a real
nats-server with Tidegate's users accepts; the client's page rotates them. Without users kept
by Tidegate, the add still succeeds and the page and the API say how to get credentials.

The console runs as a real app (Litestar's test client, a real login) against a real
nats-server started with the users of `DATA_DIR/nats` (as `tidegate up` starts it) and a real
PostgreSQL.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, cli_env, csrf, login

from tidegate import names
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Connection, Limits, Settings
from tidegate.console.app import create_app
from tidegate.embedded.natsauth import AuthFiles, url_with_credentials
from tidegate.embedded.servers import EmbeddedNats
from tidegate.wire import TaskSpec

Client = AsyncTestClient[Any]


class Secured:
    """A nats-server admitting only the users of `DATA_DIR/nats`."""

    def __init__(self, data_dir: Path) -> None:
        self.auth = AuthFiles(data_dir / "nats")
        self.passwords = self.auth.ensure()
        self.server = EmbeddedNats(data_dir / "nats", config_file=self.auth.conf)

    @property
    def url(self) -> str:  # no credentials: what a client is told to connect to
        return self.server.url

    def url_as(self, component: str) -> str:
        return url_with_credentials(self.server.url, component, self.passwords[component])


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    s = Secured(tmp_path)
    s.server.start()
    yield s
    s.server.stop()


@pytest.fixture
def nats_url(secured: Secured) -> str:
    """conftest's `engine_db` registers the test clients through this: as the operator."""
    return secured.url_as("operator")


async def _console(
    nats_url: str, console_url: str, engine_db: str, data_dir: Path
) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    await ensure_all(nc.jetstream(), Limits())
    await nc.close()
    settings = Settings(
        connection=Connection(nats_url=console_url, database_url=engine_db, data_dir=data_dir)
    )
    add_operator(cli_env(nats_url, engine_db, data_dir), "olga", "operator")
    async with AsyncTestClient(app=create_app(settings, FAST)) as client:
        assert (await login(client, "olga")).status_code == 303
        yield client


@pytest.fixture
async def operator(
    secured: Secured, nats_url: str, engine_db: str, tmp_path: Path
) -> AsyncIterator[Client]:
    """An operator's browser on a console that connects as the `console` user."""
    async for client in _console(nats_url, secured.url_as("console"), engine_db, tmp_path):
        yield client


async def _refusal(url: str, user: str, password: str) -> str | None:
    """None when the server accepts these credentials, else what it said."""
    try:
        nc = await nats.connect(
            url, user=user, password=password, allow_reconnect=False, connect_timeout=3
        )
    except Exception as exc:
        return str(exc) or type(exc).__name__
    await nc.close()
    return None


async def _submits(url: str, name: str, creds: dict[str, str]) -> None:
    """The credentials connect and may publish to tg.submit.<name> (the PubAck comes back)."""
    async with await TidegateClient.connect(
        url,
        name,
        user=creds["user"],
        password=creds["password"],
        inbox_prefix=creds["inbox_prefix"],
    ) as tg:
        receipt = await tg.submit(TaskSpec(key="first", argv=["true"]))
    assert receipt.task_id == f"{name}:first" and receipt.seq > 0


def _shown(page: str) -> dict[str, str]:
    found = {
        key: re.search(rf'id="nats-{key.replace("_", "-")}">([^<]+)</code>', page)
        for key in ("user", "password", "inbox_prefix")
    }
    assert all(found.values()), page
    return {k: html.unescape(m.group(1)) for k, m in found.items() if m}


async def _audited(engine_db: str, action: str, target: str) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(engine_db, autocommit=True) as db:
        cur = await db.execute(
            "SELECT actor, details FROM audit_log WHERE action = %s AND target = %s ORDER BY id",
            (action, target),
        )
        return list(await cur.fetchall())


async def test_the_add_form_shows_credentials_once_and_they_submit_on_the_real_server(
    operator: Client, secured: Secured, engine_db: str
) -> None:
    added = await operator.post(
        "/clients",
        data={"name": "billing", "transport": "nats"},
        headers=csrf(operator),
        follow_redirects=False,
    )
    assert added.status_code == 200, added.text
    assert added.headers["cache-control"] == "no-store"
    text = html.unescape(added.text)
    assert "Client billing added." in text and "Shown once, copy them now" in text
    creds = _shown(added.text)
    assert creds["user"] == "client-billing"
    assert creds["inbox_prefix"] == names.inbox_prefix("client-billing")
    snippet = (
        f'TidegateClient.connect({json.dumps(secured.url)}, "billing", '
        f'user="client-billing", password={json.dumps(creds["password"])}, '
        f"inbox_prefix={json.dumps(creds['inbox_prefix'])})"
    )
    assert snippet in text
    assert secured.passwords["console"] not in text  # the console's own URL stays unsaid

    await _submits(secured.url, "billing", creds)

    again = await operator.get("/clients/billing/edit")
    assert again.status_code == 200
    assert creds["password"] not in again.text and "Shown once" not in again.text
    assert "New NATS credentials" in again.text
    assert creds["password"] not in secured.auth.users_path.read_text()  # only a hash kept
    ((actor, details),) = await _audited(engine_db, "client.nats-credentials", "billing")
    assert actor == "olga" and details == {"user": "client-billing", "on": "add"}


async def test_the_api_add_answers_credentials_that_connect(
    operator: Client, secured: Secured
) -> None:
    made = await operator.post("/api/v1/clients", json={"name": "api-made"}, headers=csrf(operator))
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["nats_credentials_note"] is None
    creds = body["nats_credentials"]
    assert set(creds) == {"user", "password", "inbox_prefix"}
    assert creds["user"] == "client-api-made"
    await _submits(secured.url, "api-made", creds)
    listed = await operator.get("/api/v1/clients")
    assert creds["password"] not in listed.text


async def test_rotating_refuses_the_old_password_and_accepts_the_new(
    operator: Client, secured: Secured, engine_db: str
) -> None:
    added = await operator.post(
        "/clients", data={"name": "ledger"}, headers=csrf(operator), follow_redirects=False
    )
    old = _shown(added.text)
    assert await _refusal(secured.url, old["user"], old["password"]) is None

    rotated = await operator.post(
        "/clients/ledger/nats-credentials", headers=csrf(operator), follow_redirects=False
    )
    assert rotated.status_code == 200, rotated.text
    assert "Shown once, copy them now" in rotated.text
    new = _shown(rotated.text)
    assert new["user"] == old["user"] and new["password"] != old["password"]
    assert old["password"] not in rotated.text
    await _submits(secured.url, "ledger", new)
    refused = await _refusal(secured.url, old["user"], old["password"])
    assert refused is not None and "authorization violation" in refused.lower(), refused
    rotations = await _audited(engine_db, "client.nats-credentials", "ledger")
    assert [d["on"] for _, d in rotations] == ["add", "rotate"]

    # The same through the API; then an unknown client, and a broken users file.
    api = await operator.post("/api/v1/clients/ledger/nats-credentials", headers=csrf(operator))
    assert api.status_code == 200, api.text
    latest = api.json()["nats_credentials"]
    await _submits(secured.url, "ledger", latest)
    assert await _refusal(secured.url, new["user"], new["password"]) is not None
    unknown = await operator.post("/clients/nosuch/nats-credentials", headers=csrf(operator))
    assert unknown.status_code == 404 and "no client" in unknown.text

    kept = secured.auth.users_path.read_text()
    secured.auth.users_path.write_text("{ not json")
    try:
        failed = await operator.post("/clients/ledger/nats-credentials", headers=csrf(operator))
        assert failed.status_code == 503
        assert "were not issued" in failed.text and "damaged" in failed.text
        failed_api = await operator.post(
            "/api/v1/clients/ledger/nats-credentials", headers=csrf(operator)
        )
        assert failed_api.status_code == 503
        assert "were not issued" in failed_api.json()["error"]
    finally:
        secured.auth.users_path.write_text(kept)
    assert await _refusal(secured.url, latest["user"], latest["password"]) is None


class TestWithoutUsers:
    """A server without users (nothing in DATA_DIR/nats/users.json): nothing to issue."""

    @pytest.fixture
    def nats_url(self, nats_server: EmbeddedNats) -> str:
        return nats_server.url

    @pytest.fixture
    async def operator(
        self, nats_url: str, engine_db: str, tmp_path: Path
    ) -> AsyncIterator[Client]:
        async for client in _console(nats_url, nats_url, engine_db, tmp_path):
            yield client

    async def test_the_add_succeeds_and_says_how_to_get_credentials(self, operator: Client) -> None:
        added = await operator.post(
            "/clients", data={"name": "plain"}, headers=csrf(operator), follow_redirects=False
        )
        assert added.status_code in (302, 303), added.text
        assert added.headers["location"] == "/clients/plain/edit?added=1"
        page = await operator.get(added.headers["location"])
        assert page.status_code == 200
        text = html.unescape(page.text)
        assert "Client plain added." in text
        assert "tidegate client credentials plain" in text
        assert "cluster's own authentication applies" in text
        assert "New NATS credentials</button>" not in text
        assert '<p class="error" role="alert">' not in text  # not an error

        made = await operator.post(
            "/api/v1/clients", json={"name": "plain-api"}, headers=csrf(operator)
        )
        assert made.status_code == 201, made.text
        assert made.json()["nats_credentials"] is None
        assert "tidegate client credentials plain-api" in made.json()["nats_credentials_note"]

        asked = await operator.post("/clients/plain/nats-credentials", headers=csrf(operator))
        assert asked.status_code == 409 and "tidegate client credentials plain" in asked.text
