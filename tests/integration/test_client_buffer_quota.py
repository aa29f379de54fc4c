"""A client's own buffer quota (`buffer_max`), against real NATS, PostgreSQL and processes:
its submissions beyond it get `BufferFull` while other clients' are accepted, the router keeps
it for tasks published without the check (they wait, none lost), `tidegate client set
--buffer-max` changes it live, and the console refuses a bad value with a clear 4xx."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from harness import Cluster, cli, register, wait_for
from litestar import Litestar
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, cli_env, csrf, login

from tidegate import names
from tidegate.bus.clients import decode_client
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import PubAck, Publisher
from tidegate.bus.submit import task_message
from tidegate.client import Receipt, TidegateClient
from tidegate.config import Connection, Settings
from tidegate.console.app import create_app
from tidegate.errors import BufferFull
from tidegate.store import tokens
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, TaskSpec

Client = AsyncTestClient[Any]
CEILING = 1_000_000  # the default TIDEGATE_CLIENT_BUFFER_MAX the test streams start with


def spec(key: str) -> TaskSpec:
    return TaskSpec(key=key, argv=["true"])


async def backlog(nats_url: str, client: str) -> tuple[int, int, int]:
    """(submitted, ready, route redeliveries) of one client, from the streams."""
    nc = await connect(nats_url, "test-backlog")
    try:
        js = nc.jetstream()
        tasks = await js.stream_info(
            names.TASKS_STREAM, subjects_filter=names.submit_subject(client)
        )
        ready = await js.stream_info(
            names.READY_STREAM, subjects_filter=names.client_ready_filter(client)
        )
        try:
            consumer = await js.consumer_info(names.TASKS_STREAM, names.route_consumer(client))
            redelivered = consumer.num_redelivered
        except nats.js.errors.NotFoundError:
            redelivered = 0
    finally:
        await nc.drain()
    return (
        sum((tasks.state.subjects or {}).values()),
        sum((ready.state.subjects or {}).values()),
        redelivered,
    )


async def succeeded(database_url: str, client: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM tasks WHERE client = %s AND state = 'succeeded'", (client,)
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_own_quota_refuses_that_client_alone_and_the_command_raises_it_live(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    await register(nats_url, engine_db, ClientRecord(name="tiny", paused=True, buffer_max=5))
    c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
    try:
        c.driver()
        # One SDK client for the whole test: a change must reach a client already running.
        async with await TidegateClient.connect(nats_url, "tiny") as tiny:
            outcomes = await tiny.submit_each([spec(f"t{i}") for i in range(8)])
            assert [type(o) for o in outcomes] == [Receipt] * 5 + [BufferFull] * 3, outcomes
            why = str(outcomes[5])
            assert "'tiny'" in why and "quota is 5" in why, why
            assert "tidegate client set tiny --buffer-max N" in why, why
            with pytest.raises(BufferFull):
                await tiny.submit(spec("t5"))

            # Another client is untouched: accepted at once, and it runs.
            async with await TidegateClient.connect(nats_url, "alpha") as alpha:
                assert len(await alpha.submit_many([spec(f"a{i}") for i in range(50)])) == 50

            async def routed() -> bool:
                return (await backlog(nats_url, "tiny"))[:2] == (0, 5)

            await wait_for(routed, timeout=20, what="tiny's 5 tasks in its ready queue")

            done = cli(c.env(), "client", "set", "tiny", "--buffer-max", "8")
            assert done.returncode == 0, done.stderr
            assert "buffer_max=8" in done.stdout, done.stdout
            listed = cli(c.env(), "client", "list")
            assert "buffer_max=8" in listed.stdout and f"default({CEILING})" in listed.stdout

            async def accepted_again() -> bool:
                # The same keys as the refused ones: resubmitting is safe.
                again = await tiny.submit_each([spec(f"t{i}") for i in range(5, 8)])
                return all(isinstance(o, Receipt) and not o.duplicate for o in again)

            await wait_for(accepted_again, timeout=10, what="the raised quota to take effect")
            with pytest.raises(BufferFull, match="quota is 8"):
                await tiny.submit(spec("t8"))

        # Nothing accepted is lost: resumed and served, all of it runs.
        assert cli(c.env(), "client", "set", "tiny", "--resume").returncode == 0
        c.executor(slots=8)

        async def all_ran() -> bool:
            return (
                await succeeded(engine_db, "tiny") == 8
                and await succeeded(engine_db, "alpha") == 50
            )

        await wait_for(all_ran, timeout=60, what="every accepted task to run")
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop_all()


async def test_the_router_keeps_the_quota_for_publishes_that_skip_the_check(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    await register(nats_url, engine_db, ClientRecord(name="raw", paused=True, buffer_max=4))
    c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
    nc = await connect(nats_url, "test-raw")
    try:
        c.driver()
        # A publisher that speaks the wire directly, without the SDK's check: JetStream
        # accepts up to the stream-wide ceiling.
        publisher = Publisher(nc)
        outs = [task_message("raw", spec(f"r{i}"), max_task_bytes=64 * 1024) for i in range(10)]
        assert all(isinstance(r, PubAck) for r in await publisher.publish_many(outs))

        async def four_routed() -> bool:
            return (await backlog(nats_url, "raw"))[:2] == (6, 4)

        await wait_for(four_routed, timeout=20, what="4 routed, 6 waiting as submissions")
        # And it stays so: the 6 wait where they are, not fetched and handed back again and
        # again (each a delivery towards max_deliver, then a dead letter).
        until = time.monotonic() + 3
        while time.monotonic() < until:
            assert await backlog(nats_url, "raw") == (6, 4, 0)
        # The quota back to the stream-wide one: the rest is routed, live.
        done = cli(c.env(), "client", "set", "raw", "--buffer-max", "default")
        assert done.returncode == 0 and f"buffer_max=default({CEILING})" in done.stdout, done

        async def all_routed() -> bool:
            return (await backlog(nats_url, "raw"))[:2] == (0, 10)

        await wait_for(all_routed, timeout=20, what="the rest routed after the change")
    except BaseException:
        print(c.logs())
        raise
    finally:
        await nc.drain()
        c.stop_all()


async def test_the_command_refuses_a_bad_quota(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    env = cli_env(nats_url, engine_db, tmp_path)
    for value in ("0", "-3", "lots"):
        done = cli(env, "client", "set", "alpha", "--buffer-max", value)
        assert done.returncode == 2 and "--buffer-max" in done.stderr, (value, done.stderr)
    above = cli(env, "client", "set", "alpha", "--buffer-max", str(CEILING + 1))
    assert above.returncode == 2, above
    assert f"above the stream-wide ceiling of {CEILING}" in above.stderr, above.stderr
    added = cli(env, "client", "add", "small", "--buffer-max", "100")
    assert added.returncode == 0, added.stderr
    async with Store(engine_db, min_size=1, max_size=1) as store:
        record = await store.get_client("small")
        assert record is not None and record.buffer_max == 100


@pytest.fixture
async def app(nats_url: str, engine_db: str, tmp_path: Path) -> Litestar:
    settings = Settings(
        connection=Connection(nats_url=nats_url, database_url=engine_db, data_dir=tmp_path)
    )
    return create_app(settings, FAST)


@pytest.fixture
async def operator(
    app: Litestar, nats_url: str, engine_db: str, tmp_path: Path
) -> AsyncIterator[Client]:
    add_operator(cli_env(nats_url, engine_db, tmp_path), "olga", "operator")
    async with AsyncTestClient(app=app) as client:
        assert (await login(client, "olga")).status_code == 303
        yield client


async def mirrored(nats_url: str, client: str) -> ClientRecord:
    nc = await nats.connect(nats_url)
    try:
        entry = await (await nc.jetstream().key_value(names.CLIENTS_BUCKET)).get(client)
        assert entry.value is not None
        return decode_client(entry.value)
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("lots", "buffer_max"),
        ("0", "buffer_max"),
        ("-1", "buffer_max"),
        (str(CEILING + 1), f"above the stream-wide ceiling of {CEILING}"),
    ],
)
async def test_the_client_form_refuses_a_bad_quota(
    operator: Client, engine_db: str, value: str, says: str
) -> None:
    data = {"transport": "none", "default_pool": "default", "buffer_max": value}
    answer = await operator.post("/clients/alpha", data=data, headers=csrf(operator))
    assert answer.status_code == 422, answer.text
    assert says in answer.text and 'role="alert"' in answer.text, answer.text
    async with Store(engine_db, min_size=1, max_size=1) as store:
        record = await store.get_client("alpha")
    assert record is not None and record.buffer_max is None  # nothing changed


async def test_the_form_and_the_api_set_the_quota_live(
    operator: Client, nats_url: str, engine_db: str
) -> None:
    page = await operator.get("/clients/alpha/edit")
    assert 'name="buffer_max"' in page.text
    data = {"transport": "none", "default_pool": "default", "buffer_max": "3"}
    saved = await operator.post(
        "/clients/alpha", data=data, headers=csrf(operator), follow_redirects=False
    )
    assert saved.status_code in (302, 303), saved.text  # to the list: saved
    assert (await mirrored(nats_url, "alpha")).buffer_max == 3  # what every driver reads

    async with Store(engine_db, min_size=1, max_size=2) as store:
        _, ops = await tokens.add_token(
            store, name="ops", scope="operator", client=None, actor="test"
        )
        _, bot = await tokens.add_token(
            store, name="alpha-bot", scope="client", client="alpha", actor="test"
        )
    ops_h, bot_h = {"Authorization": f"Bearer {ops}"}, {"Authorization": f"Bearer {bot}"}
    # A bearer token wins over the session cookie beside it (and needs no CSRF token).
    await _api_checks(operator, nats_url, ops_h, bot_h)


async def _api_checks(
    api: Client, nats_url: str, ops_h: dict[str, str], bot_h: dict[str, str]
) -> None:
    for body, status in (({"buffer_max": 0}, 422), ({"buffer_max": "x"}, 400)):
        bad = await api.patch("/api/v1/clients/alpha", json=body, headers=ops_h)
        assert bad.status_code == status and "buffer_max" in bad.json()["error"], bad.text
    above = await api.patch(
        "/api/v1/clients/alpha", json={"buffer_max": CEILING + 1}, headers=ops_h
    )
    assert above.status_code == 422 and "ceiling" in above.json()["error"], above.text

    # The HTTP submit answers the quota as the SDK does (no driver: all 3 wait).
    for i in range(3):
        ok = await api.post("/api/v1/tasks", json={"key": f"h{i}", "argv": ["true"]}, headers=bot_h)
        assert ok.status_code == 201, ok.text
    full = await api.post("/api/v1/tasks", json={"key": "h3", "argv": ["true"]}, headers=bot_h)
    assert full.status_code == 503, full.text
    assert "tidegate client set alpha --buffer-max N" in full.json()["error"], full.text

    cleared = await api.patch("/api/v1/clients/alpha", json={"buffer_max": None}, headers=ops_h)
    assert cleared.status_code == 200 and cleared.json()["client"]["buffer_max"] is None
    assert (await mirrored(nats_url, "alpha")).buffer_max is None

    async def accepted() -> bool:
        again = await api.post("/api/v1/tasks", json={"key": "h3", "argv": ["true"]}, headers=bot_h)
        return again.status_code == 201

    await wait_for(accepted, timeout=10, what="the HTTP submit to see the quota cleared")
