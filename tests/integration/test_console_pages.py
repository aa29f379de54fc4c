"""The console's Clients and Tasks pages, and every mutating route's protection, against a real
NATS and PostgreSQL through Litestar's test client with a real login."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, another_browser, cli_env, csrf, login

from tidegate import names
from tidegate.bus.clients import decode_client
from tidegate.bus.topology import ensure_all
from tidegate.config import Connection, Limits, Settings
from tidegate.console.app import create_app
from tidegate.store.rows import TaskRow
from tidegate.store.store import Store
from tidegate.wire import TaskSpec, decode_cancel

Client = AsyncTestClient[Any]
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# Routes a viewer may call: they change nothing but the caller's own session.
OWN_SESSION = {"/login", "/logout"}


@pytest.fixture
async def app(nats_url: str, engine_db: str, tmp_path: Path) -> Litestar:
    nc = await nats.connect(nats_url)
    await ensure_all(nc.jetstream(), Limits())
    await nc.close()
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


@pytest.fixture
async def store(engine_db: str) -> AsyncIterator[Store]:
    async with Store(engine_db, min_size=1, max_size=2) as s:
        yield s


async def mirrored(nats_url: str, client: str) -> Any:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.CLIENTS_BUCKET)
        entry = await kv.get(client)
        assert entry.value is not None
        return decode_client(entry.value)
    finally:
        await nc.close()


def _fill(path: str) -> str:
    return re.sub(r"\{[^}:]+:(\w+)\}", lambda m: "1" if m.group(1) == "int" else "x", path)


def _mutating_routes(app: Litestar) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        for method in getattr(route, "methods", set()) & MUTATING:
            found.append((method, route.path))
    return sorted(found)


async def test_every_mutating_route_needs_the_csrf_token_and_the_operator_role(
    app: Litestar, operator: Client, nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    routes = _mutating_routes(app)
    # The sweep covers the pages' actions, not only the login's.
    assert {("POST", "/clients/{name:str}/sensitive"), ("POST", "/task/cancel")} <= set(routes)
    assert len(routes) >= 12, routes
    for method, path in routes:
        refused = await operator.request(method, _fill(path), data={"x": "1"})
        assert refused.status_code == 403, (method, path, refused.status_code, refused.text)
    add_operator(cli_env(nats_url, engine_db, tmp_path), "victor", "viewer")
    viewer = another_browser(operator)  # the app's lifespan belongs to `operator`
    assert (await login(viewer, "victor")).status_code == 303
    for method, path in routes:
        if path in OWN_SESSION:
            continue
        answer = await viewer.request(method, _fill(path), data={"x": "1"}, headers=csrf(viewer))
        assert answer.status_code == 403, (method, path, answer.status_code)
        assert "viewer" in answer.text, (method, path, answer.text)


async def test_a_client_flipped_to_sensitive_reaches_the_database_mirror_and_audit(
    operator: Client, store: Store, nats_url: str
) -> None:
    add = await operator.post(
        "/clients",
        data={"name": "billing", "transport": "nats", "max_running": "7"},
        headers=csrf(operator),
        follow_redirects=False,
    )
    assert add.status_code in (302, 303), add.text
    page = await operator.get("/clients")
    assert page.status_code == 200 and 'id="client-billing"' in page.text
    assert "non-sensitive" in page.text

    flipped = await operator.post(
        "/clients/billing/sensitive", data={"sensitive": "true"}, headers=csrf(operator)
    )
    assert flipped.status_code == 200, flipped.text
    assert flipped.text.strip().startswith('<tr id="client-billing"')  # the row, swapped in place
    assert ">sensitive<" in flipped.text
    record = await store.get_client("billing")
    assert record is not None and record.sensitive and record.max_running == 7
    assert (await mirrored(nats_url, "billing")).sensitive  # what every driver watches
    rows = await store.fetch_all("SELECT actor, action, target FROM audit_log ORDER BY id")
    actions = [(r["actor"], r["action"], r["target"]) for r in rows]
    assert ("olga", "client.add", "billing") in actions
    assert ("olga", "client.sensitive", "billing") in actions

    paused = await operator.post(
        "/clients/billing/paused", data={"paused": "true"}, headers=csrf(operator)
    )
    assert paused.status_code == 200 and "resume" in paused.text
    assert (await mirrored(nats_url, "billing")).paused


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("max_running", "many", "max_running"),
        ("max_submit_per_s", "-1", "max_submit_per_s"),
        ("name", "has space", "name"),
        ("callback_batch_max", "5000", "callback_batch_max"),
        ("transport", "carrier-pigeon", "transport"),
    ],
)
async def test_a_bad_client_form_field_is_a_clear_422(
    operator: Client, field: str, value: str, says: str
) -> None:
    data = {"name": "ok-name", "transport": "none", field: value}
    answer = await operator.post("/clients", data=data, headers=csrf(operator))
    assert answer.status_code == 422, answer.text
    assert says in answer.text and 'role="alert"' in answer.text


async def test_an_http_client_without_a_url_is_refused(operator: Client) -> None:
    answer = await operator.post(
        "/clients", data={"name": "web", "transport": "http"}, headers=csrf(operator)
    )
    assert answer.status_code == 422 and "needs a URL" in answer.text


def _rows(client: str, n: int, start: datetime, **extra: Any) -> list[TaskRow]:
    return [
        TaskRow(
            task_id=f"{client}:k{i:04d}",
            client=client,
            key=f"k{i:04d}",
            submitted_at=start + timedelta(seconds=i),
            state=extra.get("state", "succeeded"),
            attempt=1,
            pool="default",
            spec=extra.get("spec", TaskSpec(key=f"k{i:04d}", argv=["true"])),
        )
        for i in range(n)
    ]


async def test_the_task_list_filters_and_pages_by_keyset(operator: Client, store: Store) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    await store.upsert_tasks(_rows("alpha", 120, start) + _rows("beta", 5, start))
    seen: list[str] = []
    url = "/tasks?client=alpha"
    for _ in range(4):
        page = await operator.get(url)
        assert page.status_code == 200, page.text
        ids = re.findall(r'data-task="([^"]+)"', page.text)
        seen += ids
        following = re.search(r'href="(/tasks\?[^"]+)" rel="next"', page.text)
        if not following:
            break
        url = following.group(1).replace("&amp;", "&")
    assert len(seen) == 120 and len(set(seen)) == 120  # every task once, none twice
    assert seen == sorted(seen, reverse=True)  # newest first
    assert all(s.startswith("alpha:") for s in seen)

    narrowed = await operator.get("/tasks?client=alpha&key=k011")
    assert sorted(re.findall(r'data-task="([^"]+)"', narrowed.text)) == [
        f"alpha:k011{i}" for i in range(10)
    ]
    since = (start + timedelta(seconds=115)).strftime("%Y-%m-%dT%H:%M:%S")
    recent = await operator.get(f"/tasks?client=alpha&since={since}")
    assert len(re.findall(r'data-task="', recent.text)) == 5


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("state=bogus", "state: 'bogus' is not one of"),
        ("since=yesterday", "since: 'yesterday' is not a time"),
        ("after=garbage", "after: not a page cursor"),
        ("since=2026-12-02T10:00&until=2026-12-01T10:00", "since must be before until"),
    ],
)
async def test_a_bad_filter_is_a_clear_422(operator: Client, query: str, says: str) -> None:
    answer = await operator.get(f"/tasks?{query}")
    assert answer.status_code == 422 and says in html.unescape(answer.text)


async def test_the_task_page_masks_secret_environment_values(
    operator: Client, store: Store
) -> None:
    spec = TaskSpec(
        key="k0000", argv=["env"], env={"API_TOKEN": "s3cr3t-value", "REGION": "eu-west"}
    )
    await store.upsert_tasks(_rows("gamma", 1, datetime.now(UTC), spec=spec))
    page = await operator.get("/task", params={"id": "gamma:k0000"})
    assert page.status_code == 200
    assert "s3cr3t-value" not in page.text
    assert "API_TOKEN=•••" in page.text and "REGION=eu-west" in page.text
    missing = await operator.get("/task", params={"id": "gamma:nope/with?odd#chars"})
    assert missing.status_code == 404 and "nope/with?odd#chars" in missing.text


async def test_bulk_cancel_shows_the_count_then_sends_one_request_per_task(
    operator: Client, store: Store, nats_url: str
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=5)
    await store.upsert_tasks(
        _rows("delta", 3, start, state="running") + _rows("epsilon", 2, start, state="running")
    )
    asked = await operator.post("/tasks/cancel", data={"client": "delta"}, headers=csrf(operator))
    assert asked.status_code == 200 and "Cancel 3 unfinished tasks?" in asked.text
    done = await operator.post(
        "/tasks/cancel", data={"client": "delta", "confirm": "3"}, headers=csrf(operator)
    )
    assert "cancel requested for 3 tasks" in done.text
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.CANCEL_BUCKET)
        requested = sorted(
            (c.task_id, c.run) for c in (decode_cancel(e.value or b"") for e in await _entries(kv))
        )
    finally:
        await nc.close()
    # Each request names the run it cancels, so a later run of the same key is not cancelled.
    assert requested == [("delta:k0000", 0), ("delta:k0001", 0), ("delta:k0002", 0)]


async def _entries(kv: Any) -> list[Any]:
    return [await kv.get(key) for key in await kv.keys()]


async def test_the_task_page_shows_the_latest_run_and_retry_starts_the_next(
    operator: Client, store: Store, nats_url: str
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=10)
    (first,) = _rows("gamma", 1, start, state="failed")
    (second,) = _rows("gamma", 1, start + timedelta(minutes=1), state="succeeded")
    await store.upsert_tasks(
        [dataclasses.replace(first, run=5), dataclasses.replace(second, run=9)]
    )
    page = await operator.get("/task", params={"id": "gamma:k0000"})
    assert page.status_code == 200, page.text
    state = page.text.split('id="task-state"')[1].split("</table>")[0]
    assert "run 2 of 2" in state and "(id 9)" in state and "succeeded" in state
    earlier = page.text.split('id="task-runs"')[1].split("</table>")[0]
    assert "(id 5)" in earlier and "failed" in earlier and "(id 9)" not in earlier
    assert 'name="retry"' in page.text and 'name="cancel"' not in page.text
    # By filter: the two runs are one task, asked about once.
    asked = await operator.post("/tasks/retry", data={"client": "gamma"}, headers=csrf(operator))
    assert asked.status_code == 200 and "Retry 1 finished task?" in asked.text

    retried = await operator.post(
        "/task/retry", params={"id": "gamma:k0000"}, headers=csrf(operator)
    )
    assert retried.status_code == 200 and "retry submitted as its next run" in retried.text
    nc = await nats.connect(nats_url)
    try:
        last = await nc.jetstream().get_last_msg(names.TASKS_STREAM, "tg.submit.gamma")
    finally:
        await nc.close()
    # The spec again, under an id that the submission dedup has not seen: the next run.
    assert (last.headers or {})["Nats-Msg-Id"].startswith("gamma:k0000#retry-")
    assert TaskSpec(key="k0000", argv=["true"]) == msgspec.json.decode(last.data, type=TaskSpec)
    assert f"({last.seq})" in retried.text

    (running,) = _rows("gamma", 1, start, state="running")
    await store.upsert_tasks([dataclasses.replace(running, task_id="gamma:busy", key="busy")])
    refused = await operator.post(
        "/task/retry", params={"id": "gamma:busy"}, headers=csrf(operator)
    )
    assert refused.status_code == 409 and "cancel it first" in refused.text
