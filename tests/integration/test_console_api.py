"""The console's JSON API against real NATS and PostgreSQL: API tokens made with the CLI, HTTP
submission that dedups as the bus does (and runs, with a real driver and executor), scopes,
revocation, CSRF only for cookie sessions, clear 4xx answers to bad input, and /schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest
from harness import Cluster, cli, wait_for
from litestar import Litestar
from litestar.testing import AsyncTestClient
from test_console_access import add_operator, cli_env, csrf, login

from tidegate import names
from tidegate.bus.clients import decode_client
from tidegate.client import TidegateClient
from tidegate.config import Connection, Limits, Settings
from tidegate.console.app import create_app
from tidegate.console.security import CSRF_FAILED, AccessConfig
from tidegate.embedded.servers import EmbeddedNats
from tidegate.store import tokens
from tidegate.store.rows import TaskRow
from tidegate.store.store import Store
from tidegate.store.tokens import TokenScope
from tidegate.wire import TaskSpec, decode_cancel

Client = AsyncTestClient[Any]
Conn = psycopg.AsyncConnection[Any]
# Token lookups trusted for half a second: a revocation shows within a second or two.
ACCESS = AccessConfig(roster_refresh_s=0.3, login_db_timeout_s=2.0, token_cache_s=0.5)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def env(nats_url: str, engine_db: str, tmp_path: Path) -> dict[str, str]:
    return cli_env(nats_url, engine_db, tmp_path)


@pytest.fixture
async def app(nats_url: str, engine_db: str, tmp_path: Path) -> Litestar:
    settings = Settings(
        connection=Connection(nats_url=nats_url, database_url=engine_db, data_dir=tmp_path)
    )
    return create_app(settings, ACCESS)


@pytest.fixture
async def api(app: Litestar) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture
async def store(engine_db: str) -> AsyncIterator[Store]:
    async with Store(engine_db, min_size=1, max_size=2) as s:
        yield s


async def token_for(store: Store, name: str, scope: TokenScope, client: str | None = None) -> str:
    _, token = await tokens.add_token(store, name=name, scope=scope, client=client, actor="test")
    return token


def error_of(answer: httpx.Response) -> str:
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


# --- tokens on the command line ------------------------------------------------------------------


def test_token_commands(env: dict[str, str], engine_db: str) -> None:
    added = cli(env, "token", "add", "billing-bot", "--client", "alpha", "--json")
    assert added.returncode == 0, added.stderr
    shown = json.loads(added.stdout)
    assert shown["name"] == "billing-bot" and shown["scope"] == "client"
    assert shown["client"] == "alpha" and shown["token"].startswith("tg_")
    text = cli(env, "token", "add", "ops", "--operator")
    assert text.returncode == 0, text.stderr
    assert "token ops added (scope operator)" in text.stdout and "shown once" in text.stdout
    assert cli(env, "token", "add", "dash", "--viewer").returncode == 0

    for argv, says in [
        (("token", "add", "x"), "exactly one of --client NAME, --operator or --viewer"),
        (("token", "add", "x", "--operator", "--viewer"), "exactly one of"),
        (("token", "add", "x", "--client", "nosuch"), "no client 'nosuch' is registered"),
        (("token", "add", "ops", "--viewer"), "a token named 'ops' is in use already"),
        (("token", "add", "no spaces", "--viewer"), "is not valid"),
        (("token", "revoke", "nobody"), "no token in use is named 'nobody'"),
    ]:
        refused = cli(env, *argv)
        assert refused.returncode == 2, (argv, refused.stderr)
        assert says in refused.stderr, (argv, refused.stderr)

    listed = cli(env, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["scope"], r["client"]) for r in rows] == [
        ("billing-bot", "client", "alpha"),
        ("dash", "viewer", None),
        ("ops", "operator", None),
    ]
    assert set(rows[0]) == {"name", "scope", "client", "created_at", "last_used_at", "revoked_at"}

    revoked = cli(env, "token", "revoke", "dash")
    assert revoked.returncode == 0 and "dash revoked" in revoked.stdout
    assert cli(env, "token", "revoke", "dash").returncode == 2  # revoked already
    again = cli(env, "token", "add", "dash", "--viewer")  # a revoked name may be given again
    assert again.returncode == 0, again.stderr
    plain = cli(env, "token", "list")
    assert plain.returncode == 0 and "revoked" in plain.stdout and "in use" in plain.stdout

    with psycopg.connect(engine_db) as conn:
        audit = conn.execute("SELECT actor, action, target FROM audit_log ORDER BY id").fetchall()
        hashes = [h for (h,) in conn.execute("SELECT token_hash FROM api_tokens").fetchall()]
    assert audit == [
        ("cli", "token.add", "billing-bot"),
        ("cli", "token.add", "ops"),
        ("cli", "token.add", "dash"),
        ("cli", "token.revoke", "dash"),
        ("cli", "token.add", "dash"),
    ]
    assert shown["token"] not in hashes  # only its hash is kept
    assert tokens.token_hash(shown["token"]) in hashes


# --- submitting over HTTP ------------------------------------------------------------------------


async def test_a_client_token_submits_over_http_the_task_runs_once(
    cluster: Cluster, api: Client, store: Store, tmp_path: Path
) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    token = await token_for(store, "alpha-bot", "client", "alpha")
    out = tmp_path / "ran.txt"
    spec = {"key": "wf-1/node.3", "shell": f"echo ran >> {out}", "labels": {"name": "http"}}

    first = await api.post("/api/v1/tasks", json=spec, headers=bearer(token))
    assert first.status_code == 201, first.text
    receipt = first.json()
    assert receipt == {"task_id": "alpha:wf-1/node.3", "seq": receipt["seq"], "duplicate": False}
    again = await api.post("/api/v1/tasks", json=spec, headers=bearer(token))
    assert again.status_code == 200, again.text
    assert again.json() == {**receipt, "duplicate": True}  # the stream's dedup: one task

    async def succeeded() -> Any:
        answer = await api.get(
            "/api/v1/task", params={"id": "alpha:wf-1/node.3"}, headers=bearer(token)
        )
        return answer.json() if answer.status_code == 200 else None

    done = await wait_for(
        lambda: _in_state(succeeded, "succeeded"), timeout=60, what="the HTTP task to succeed"
    )
    assert done["task"]["client"] == "alpha" and done["task"]["labels"] == {"name": "http"}
    assert done["runs"] == []

    # The bus and HTTP share one dedup id, <client>:<key>: the SDK's submit is a duplicate too.
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        sdk = await tg.submit(TaskSpec(key="wf-1/node.3", shell=f"echo ran >> {out}"))
    assert sdk.duplicate and sdk.seq == receipt["seq"]
    late = await api.post("/api/v1/tasks", json=spec, headers=bearer(token))
    assert late.status_code == 200 and late.json()["duplicate"] is True
    assert out.read_text() == "ran\n"  # executed once


async def _in_state(read: Any, state: str) -> Any:
    found = await read()
    return found if found and found["task"]["state"] == state else None


async def test_a_paused_client_is_accepted_and_an_unregistered_one_refused(
    api: Client, store: Store, nats_url: str
) -> None:
    ops = await token_for(store, "ops", "operator")
    paused = await api.patch("/api/v1/clients/beta", json={"paused": True}, headers=bearer(ops))
    assert paused.status_code == 200 and paused.json()["client"]["paused"] is True
    beta = await token_for(store, "beta-bot", "client", "beta")
    accepted = await api.post(
        "/api/v1/tasks", json={"key": "k1", "argv": ["true"]}, headers=bearer(beta)
    )
    assert accepted.status_code == 201, accepted.text  # it waits, as on the bus

    gamma = await token_for(store, "gamma-bot", "client", "gamma")
    nc = await nats.connect(nats_url)
    try:
        await (await nc.jetstream().key_value(names.CLIENTS_BUCKET)).delete("gamma")
    finally:
        await nc.close()
    refused = await api.post(
        "/api/v1/tasks", json={"key": "k1", "argv": ["true"]}, headers=bearer(gamma)
    )
    assert refused.status_code == 404
    assert "no client 'gamma' is registered" in error_of(refused)


async def test_submitting_while_nats_is_down_is_a_clear_503(
    api: Client, store: Store, nats_server: EmbeddedNats
) -> None:
    token = await token_for(store, "alpha-bot", "client", "alpha")
    nats_server.stop()

    async def refused() -> httpx.Response | None:
        answer = await api.post(
            "/api/v1/tasks", json={"key": "k1", "argv": ["true"]}, headers=bearer(token)
        )
        return answer if answer.status_code == 503 else None

    answer = await wait_for(refused, timeout=20, what="a 503 while NATS is down")
    assert "NATS is unreachable: the task was not accepted" in error_of(answer)


# --- scopes --------------------------------------------------------------------------------------


def _rows(client: str, keys: list[str], state: str = "running") -> list[TaskRow]:
    now = datetime.now(UTC)
    return [
        TaskRow(
            task_id=f"{client}:{key}",
            client=client,
            key=key,
            submitted_at=now,
            state=state,
            attempt=1,
            pool="default",
            spec=TaskSpec(key=key, argv=["sleep", "60"], env={"DB_PASSWORD": "hunter2"}),
        )
        for key in keys
    ]


OPERATOR_READS = ["/api/v1/clients", "/api/v1/overview", "/api/v1/executors", "/api/v1/audit"]
OPERATOR_READS += ["/api/v1/callbacks"]


async def test_a_client_token_touches_its_own_tasks_and_nothing_else(
    api: Client, store: Store, nats_url: str
) -> None:
    await store.upsert_tasks(_rows("alpha", ["a1", "a2"]) + _rows("beta", ["b1"]))
    token = await token_for(store, "alpha-bot", "client", "alpha")
    mine = bearer(token)

    listed = await api.get("/api/v1/tasks", headers=mine)
    assert listed.status_code == 200, listed.text
    assert sorted(t["task_id"] for t in listed.json()["tasks"]) == ["alpha:a1", "alpha:a2"]
    assert listed.json()["tasks"][0]["env"] == {"DB_PASSWORD": "•••"}  # masked, as in pages
    one = await api.get("/api/v1/task", params={"id": "alpha:a1"}, headers=mine)
    assert one.status_code == 200 and one.json()["task"]["state"] == "running"
    cancelled = await api.post("/api/v1/tasks/cancel", params={"id": "alpha:a1"}, headers=mine)
    assert cancelled.status_code == 200, cancelled.text

    for method, path, params in [
        ("GET", "/api/v1/task", {"id": "beta:b1"}),
        ("GET", "/api/v1/task", {"id": "beta:nosuch"}),  # 403 either way: existence not told
        ("GET", "/api/v1/tasks", {"client": "beta"}),
        ("POST", "/api/v1/tasks/cancel", {"id": "beta:b1"}),
        ("POST", "/api/v1/tasks/retry", {"id": "beta:b1"}),
        ("POST", "/api/v1/executors/cordon", {"id": "exec-0"}),
        ("POST", "/api/v1/callbacks/outbox/retry", {}),
        *[("GET", path, {}) for path in OPERATOR_READS],
    ]:
        refused = await api.request(method, path, params=params, headers=mine, json={})
        assert refused.status_code == 403, (method, path, refused.text)
        assert "API token of client alpha" in error_of(refused), (method, path)
    patched = await api.patch("/api/v1/clients/alpha", json={"paused": True}, headers=mine)
    assert patched.status_code == 403

    bulk = await api.post("/api/v1/tasks/cancel-matching", json={}, headers=mine)
    assert bulk.status_code == 200 and bulk.json()["matched"] == 2  # its own two only
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.CANCEL_BUCKET)
        requested = [decode_cancel((await kv.get(k)).value or b"") for k in await kv.keys()]
    finally:
        await nc.close()
    # The bulk cancel was only counted, not confirmed.
    assert [r.task_id for r in requested] == ["alpha:a1"]


async def test_a_viewer_token_reads_and_changes_nothing(api: Client, store: Store) -> None:
    viewer = bearer(await token_for(store, "dash", "viewer"))
    for path in [*OPERATOR_READS, "/api/v1/tasks", "/api/v1/me"]:
        answer = await api.get(path, headers=viewer)
        assert answer.status_code == 200, (path, answer.text)
    assert (await api.get("/api/v1/me", headers=viewer)).json() == {
        "name": "token:dash",
        "role": "viewer",
        "client": None,
        "via": "token",
    }
    for method, path, body in [
        ("PATCH", "/api/v1/clients/alpha", {"sensitive": True}),
        ("POST", "/api/v1/clients", {"name": "new"}),
        ("POST", "/api/v1/tasks/cancel?id=alpha:x", None),
        ("POST", "/api/v1/executors/drain?id=exec-0", None),
        ("POST", "/api/v1/callbacks/dead/1/redrive", None),
        ("POST", "/api/v1/tasks", {"key": "k", "argv": ["true"]}),
    ]:
        refused = await api.request(method, path, json=body, headers=viewer)
        assert refused.status_code == 403, (method, path, refused.text)
        assert "token:dash is a viewer" in error_of(refused), (method, path)


async def test_an_operator_token_does_what_an_operator_does(
    api: Client, store: Store, nats_url: str, db: Conn
) -> None:
    ops = bearer(await token_for(store, "ops", "operator"))
    flipped = await api.patch("/api/v1/clients/alpha", json={"sensitive": True}, headers=ops)
    assert flipped.status_code == 200, flipped.text
    assert flipped.json()["client"]["sensitive"] is True
    assert flipped.json()["callback_secret"] is None
    nc = await nats.connect(nats_url)
    try:
        entry = await (await nc.jetstream().key_value(names.CLIENTS_BUCKET)).get("alpha")
    finally:
        await nc.close()
    assert entry.value is not None and decode_client(entry.value).sensitive  # live everywhere

    made = await api.post(
        "/api/v1/clients",
        json={"name": "web", "transport": "http", "callback_url": "https://x.test/hook"},
        headers=ops,
    )
    assert made.status_code == 201, made.text
    assert made.json()["client"]["transport"] == "http" and made.json()["callback_secret"]
    switched = await api.patch("/api/v1/clients/web", json={"transport": "nats"}, headers=ops)
    assert switched.status_code == 200 and switched.json()["client"]["callback_url"] is None
    listed = await api.get("/api/v1/clients", headers=ops)
    assert "web" in [c["name"] for c in listed.json()["clients"]]
    assert "callback_secret" not in listed.json()["clients"][0]  # never listed
    unknown = await api.patch("/api/v1/clients/nosuch", json={"paused": True}, headers=ops)
    assert unknown.status_code == 404 and "no client 'nosuch'" in error_of(unknown)

    no_executor = await api.post("/api/v1/executors/cordon", params={"id": "exec-9"}, headers=ops)
    assert no_executor.status_code == 404, no_executor.text
    ask = await api.post("/api/v1/callbacks/outbox/retry", json={}, headers=ops)
    assert ask.status_code == 200 and ask.json()["confirm"] == 0
    confirmed = await api.post("/api/v1/callbacks/outbox/retry", json={"confirm": 0}, headers=ops)
    assert confirmed.status_code == 200 and "nothing to retry" in confirmed.json()["message"]
    figures = await api.get("/api/v1/overview", headers=ops)
    assert figures.status_code == 200 and "totals" in figures.json()

    cur = await db.execute("SELECT actor, action, target FROM audit_log ORDER BY id")
    actions = [tuple(r) for r in await cur.fetchall()]
    assert ("token:ops", "client.sensitive", "alpha") in actions
    assert ("token:ops", "client.add", "web") in actions
    assert ("token:ops", "client.edit", "web") in actions
    audit = await api.get("/api/v1/audit", params={"actor": "token:ops"}, headers=ops)
    assert audit.status_code == 200 and len(audit.json()["entries"]) == 3


async def test_bad_tokens_are_401_and_a_revoked_one_is_refused_within_seconds(
    api: Client, store: Store, env: dict[str, str]
) -> None:
    token = await token_for(store, "ops", "operator")
    assert (await api.get("/api/v1/me", headers=bearer(token))).status_code == 200
    for headers, says in [
        ({}, "not authenticated"),
        (bearer("tg_" + "x" * 43), "unknown or revoked"),
        (bearer("not-even-ours"), "unknown or revoked"),
        ({"Authorization": "Basic b3BzOnB3"}, "must be `Bearer <token>`"),
        ({"Authorization": "Bearer "}, "must be `Bearer <token>`"),
    ]:
        refused = await api.get("/api/v1/clients", headers=headers)
        assert refused.status_code == 401, (headers, refused.text)
        assert says in error_of(refused)
        assert refused.headers["www-authenticate"] == "Bearer"

    used = json.loads(cli(env, "token", "list", "--json").stdout)
    assert used[0]["name"] == "ops" and used[0]["last_used_at"] is not None
    assert cli(env, "token", "revoke", "ops").returncode == 0

    async def revoked() -> bool:
        return (await api.get("/api/v1/me", headers=bearer(token))).status_code == 401

    await wait_for(revoked, timeout=5, what="the revoked token to be refused")


# --- CSRF ----------------------------------------------------------------------------------------


async def test_only_token_requests_skip_csrf(
    api: Client, store: Store, env: dict[str, str]
) -> None:
    token = await token_for(store, "ops", "operator")
    cancel = "/api/v1/tasks/cancel?id=alpha:k1"
    assert (await api.post(cancel, headers=bearer(token))).status_code == 200  # no CSRF needed
    # Tokens open the API only: on a page the header means nothing (no login, no change).
    page = "/clients/alpha/paused"
    anonymous = await api.post(
        page, data={"paused": "true"}, headers=bearer(token), follow_redirects=False
    )
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")

    add_operator(env, "olga", "operator")
    assert (await login(api, "olga")).status_code == 303  # from now on `api` has cookies
    me = await api.get("/api/v1/me")
    assert me.json() == {"name": "olga", "role": "operator", "client": None, "via": "session"}
    forged = await api.post(cancel)  # the cookies alone, as a cross-site form would send
    assert forged.status_code == 403 and error_of(forged) == CSRF_FAILED
    assert (await api.post(cancel, headers=csrf(api))).status_code == 200
    # A token decides alone: it needs no CSRF beside the cookies, and a bad one is refused
    # even beside a good session.
    assert (await api.post(cancel, headers=bearer(token))).status_code == 200
    bad = await api.post(cancel, headers={**csrf(api), **bearer("tg_wrong")})
    assert bad.status_code == 401
    no_csrf = await api.post(page, data={"paused": "true"}, headers=bearer(token))
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text


# --- bad input -----------------------------------------------------------------------------------

SUBMIT_REFUSALS = [
    (b'{"key": "k1", "argv": ["true"]', 400, "malformed JSON"),
    (b"", 400, "the body is empty"),
    (b"key=k1", 400, "malformed JSON"),
    (b'{"key": "k1", "argv": "echo hi"}', 422, "Expected `array | null`, got `str`"),
    (b'{"key": "k1", "argv": ["true"], "timeout_s": "60"}', 422, "Expected `float`, got `str`"),
    (b'{"key": "k1", "argv": ["true"], "colour": "red"}', 422, "unknown field `colour`"),
    (b'{"key": "k1", "argv": ["true"], "shell": "true"}', 422, "exactly one of `argv`"),
    (b'{"key": "has space", "argv": ["true"]}', 422, "invalid task"),
    (b'{"argv": ["true"]}', 422, "missing required field `key`"),
    (b'["k1"]', 422, "Expected `object`, got `array`"),
    (b'{"key": "k1", "argv": ["true"], "cwd": "relative"}', 422, "`cwd` must be an absolute"),
]


@pytest.mark.parametrize(("body", "status", "says"), SUBMIT_REFUSALS)
async def test_a_bad_task_is_a_clear_4xx(
    api: Client, store: Store, body: bytes, status: int, says: str
) -> None:
    token = await token_for(store, "alpha-bot", "client", "alpha")
    answer = await api.post(
        "/api/v1/tasks",
        content=body,
        headers={**bearer(token), "content-type": "application/json"},
    )
    assert answer.status_code == status, answer.text
    assert says in error_of(answer)


async def test_an_oversized_task_is_413(api: Client, store: Store) -> None:
    token = await token_for(store, "alpha-bot", "client", "alpha")
    body = {"key": "big", "argv": ["true"], "env": {"BLOB": "x" * (Limits().max_task_bytes + 1)}}
    answer = await api.post("/api/v1/tasks", json=body, headers=bearer(token))
    assert answer.status_code == 413
    assert "larger than 65536 bytes, the limit (TIDEGATE_MAX_TASK_BYTES)" in error_of(answer)


OPERATOR_REFUSALS = [
    ("PATCH", "/api/v1/clients/alpha", {"max_running": "many"}, 400, "body field `max_running`"),
    ("PATCH", "/api/v1/clients/alpha", {"colour": "red"}, 400, "unknown field `colour`"),
    ("PATCH", "/api/v1/clients/alpha", b"{not json", 400, ""),
    ("PATCH", "/api/v1/clients/alpha", {"max_running": -1}, 422, "max_running"),
    ("PATCH", "/api/v1/clients/alpha", {"transport": "http"}, 422, "needs a URL"),
    ("PATCH", "/api/v1/clients/alpha", {"transport": "pigeon"}, 400, "transport"),
    ("POST", "/api/v1/clients", {"name": "has space"}, 422, "name"),
    ("POST", "/api/v1/clients", {}, 400, "name"),
    ("POST", "/api/v1/clients", [1, 2], 400, ""),
    ("GET", "/api/v1/tasks?limit=0", None, 400, "query parameter `limit`: Expected `int` >= 1"),
    ("GET", "/api/v1/tasks?limit=lots", None, 400, "query parameter `limit`"),
    ("GET", "/api/v1/tasks?state=bogus", None, 422, "state: 'bogus' is not one of"),
    ("GET", "/api/v1/tasks?after=garbage", None, 422, "not a page cursor"),
    ("GET", "/api/v1/tasks?since=yesterday", None, 422, "not a time"),
    ("GET", "/api/v1/task", None, 400, "id"),
    ("GET", "/api/v1/task?id=alpha:nosuch", None, 404, "no task 'alpha:nosuch'"),
    ("GET", "/api/v1/callbacks?after=-1", None, 422, "after"),
    ("GET", "/api/v1/callbacks?client=no%20such", None, 422, "client"),
    ("GET", "/api/v1/audit?before=x", None, 400, "before"),
    ("POST", "/api/v1/executors/cordon", None, 400, "id"),
    ("POST", "/api/v1/executors/cordon?id=..", None, 404, "not a valid executor id"),
    ("POST", "/api/v1/callbacks/outbox/x/retry", None, 404, ""),
    ("POST", "/api/v1/callbacks/outbox/retry", {"confirm": "all"}, 400, "confirm"),
    ("POST", "/api/v1/callbacks/dead/redrive", {}, 422, "client"),
    ("POST", "/api/v1/tasks/cancel-matching", {"state": "nope"}, 422, "state"),
    ("DELETE", "/api/v1/clients/alpha", None, 405, ""),
    ("GET", "/api/v1/nothing-here", None, 404, ""),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), OPERATOR_REFUSALS)
async def test_bad_parameters_and_bodies_are_a_clear_4xx(
    api: Client, store: Store, method: str, path: str, body: Any, status: int, says: str
) -> None:
    ops = bearer(await token_for(store, "ops", "operator"))
    if isinstance(body, bytes):
        answer = await api.request(
            method, path, content=body, headers={**ops, "content-type": "application/json"}
        )
    else:
        answer = await api.request(method, path, json=body, headers=ops)
    assert answer.status_code == status, (method, path, answer.text)
    assert says in error_of(answer), (method, path, answer.text)


# --- the OpenAPI document ------------------------------------------------------------------------


async def test_the_schema_documents_the_api_without_a_login(api: Client) -> None:
    for path in ("/schema", "/schema/openapi.json"):
        answer = await api.get(path)
        assert answer.status_code == 200, (path, answer.text)
        doc = answer.json()
        paths = doc["paths"]
        assert {"/api/v1/tasks", "/api/v1/task", "/api/v1/tasks/cancel", "/api/v1/clients"} <= set(
            paths
        )
        assert "/api/v1/clients/{name}" in paths and "/api/v1/executors/drain" in paths
        assert not any(p in paths for p in ("/clients", "/tasks", "/login", "/api/session"))
    submit = paths["/api/v1/tasks"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["key"] and {"key", "argv", "shell", "env"} <= set(
        body["properties"]
    )
    assert {"201", "413", "422", "503"} <= set(submit["responses"])
    assert doc["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"
    receipt = doc["components"]["schemas"]["Receipt"]["properties"]
    assert set(receipt) == {"task_id", "seq", "duplicate"}
