"""Cordon and drain through the executor control bucket, against real executor processes;
and the console's Executors page, collected from their real heartbeats."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats
import psycopg
from harness import Cluster, wait_for
from jinja2 import Environment, FileSystemLoader
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from test_engine_outcomes import final

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.config import Settings
from tidegate.console.app import create_app, templates_dir
from tidegate.console.executors import collect, live_context
from tidegate.console.security import AccessConfig
from tidegate.embedded.servers import EmbeddedNats
from tidegate.store.operators import add_operator, list_actions
from tidegate.store.store import Store
from tidegate.wire import (
    ExecutorControl,
    Heartbeat,
    TaskSpec,
    decode_executor_control,
    decode_heartbeat,
    encode,
    now,
)

Conn = psycopg.AsyncConnection[Any]
INTERVAL_S = 0.5  # the harness's heartbeat interval


@dataclass
class Bus:
    js: JetStreamContext
    beats: KeyValue
    control: KeyValue

    async def heartbeat(self, executor: str) -> Heartbeat | None:
        try:
            entry = await self.beats.get(executor)
        except KeyNotFoundError:
            return None
        return decode_heartbeat(entry.value) if entry.value else None

    async def heartbeat_where(
        self, executor: str, check: Callable[[Heartbeat], bool], what: str, timeout: float = 15
    ) -> Heartbeat:
        async def seen() -> Heartbeat | None:
            hb = await self.heartbeat(executor)
            return hb if hb is not None and check(hb) else None

        found: Heartbeat = await wait_for(seen, timeout=timeout, what=f"{executor}: {what}")
        return found

    async def tell(self, executor: str, *, cordoned: bool, drain: bool = False) -> None:
        value = ExecutorControl(cordoned=cordoned, drain=drain, by="test", at=now())
        await self.control.put(executor, encode(value))

    async def control_of(self, executor: str) -> ExecutorControl | None:
        try:
            entry = await self.control.get(executor)
        except KeyNotFoundError:
            return None
        return decode_executor_control(entry.value) if entry.value else None

    async def work(self) -> tuple[int, int]:
        """(tasks in the work stream, of which delivered to an executor and not acked yet)."""
        info = await self.js.stream_info(names.WORK_STREAM)
        taken = 0
        for task_class in names.TASK_CLASSES:
            consumer = await self.js.consumer_info(
                names.WORK_STREAM, names.work_consumer("default", task_class)
            )
            taken += consumer.num_ack_pending
        return info.state.messages, taken


@asynccontextmanager
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        yield Bus(
            js=js,
            beats=await js.key_value(names.EXECUTORS_BUCKET),
            control=await js.key_value(names.EXECUTOR_CONTROL_BUCKET),
        )
    finally:
        await nc.close()


async def idle_beats(b: Bus, executor: str, count: int) -> None:
    """`count` more heartbeats of `executor` with nothing running: time passes on its clock,
    observed, not slept."""
    last = await b.heartbeat_where(executor, lambda hb: True, "a heartbeat")
    for _ in range(count):
        after = last.at

        def idle_and_newer(hb: Heartbeat, after: datetime = after) -> bool:
            return hb.at > after and not hb.running

        last = await b.heartbeat_where(executor, idle_and_newer, "an idle beat")


async def test_cordon_keeps_new_work_off_until_uncordoned(cluster: Cluster, db: Conn) -> None:
    cluster.driver()
    cluster.executor(slots=4)  # exec-0
    async with bus(cluster.nats_url) as b:
        hb = await b.heartbeat_where("exec-0", lambda hb: True, "first heartbeat")
        assert hb.cordoned is False and hb.draining is False

        await b.tell("exec-0", cordoned=True)
        await b.heartbeat_where("exec-0", lambda hb: hb.cordoned, "cordoned")
        async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
            await tg.submit_many(TaskSpec(key=f"c{i}", argv=["/bin/true"]) for i in range(5))
        # Dispatched to the work queue, and not taken: the cordoned executor goes on beating,
        # idle, and nobody holds a work message.
        await wait_for(lambda: _eq(b.work(), (5, 0)), timeout=20, what="5 tasks dispatched")
        await idle_beats(b, "exec-0", 4)
        assert await b.work() == (5, 0)

        # Another executor runs them.
        second = cluster.executor(slots=4)  # exec-1
        for i in range(5):
            row = await final(db, f"alpha:c{i}", "succeeded")
            assert row["executor"] == "exec-1" and row["attempt"] == 1
        assert second.stop() == 0

        # Uncordoned, the first one takes work again.
        await b.tell("exec-0", cordoned=False)
        await b.heartbeat_where("exec-0", lambda hb: not hb.cordoned, "uncordoned")
        async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
            await tg.submit_many(TaskSpec(key=f"u{i}", argv=["/bin/true"]) for i in range(3))
        for i in range(3):
            row = await final(db, f"alpha:u{i}", "succeeded")
            assert row["executor"] == "exec-0"


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_drain_finishes_running_work_exits_0_and_comes_back_cordoned(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver()
    leaving = cluster.executor(slots=2)  # exec-0; the harness's drain timeout is 5 s
    async with bus(cluster.nats_url) as b:
        async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
            await tg.submit(TaskSpec(key="d1", argv=["sleep", "3"]))
        await final(db, "beta:d1", "running")

        await b.tell("exec-0", cordoned=True, drain=True)
        hb = await b.heartbeat_where(
            "exec-0", lambda hb: hb.draining and hb.cordoned, "draining, cordoned"
        )
        assert [t.task_id for t in hb.running] == ["beta:d1"]
        await wait_for(
            _async(lambda: not leaving.alive()), timeout=20, what="the drained executor to exit"
        )
        assert leaving.proc is not None and leaving.proc.returncode == 0
        row = await final(db, "beta:d1", "succeeded")
        assert row["attempt"] == 1 and row["executor"] == "exec-0"
        # It left a plain cordon behind, and removed its heartbeat (a clean exit).
        left = await b.control_of("exec-0")
        assert left is not None and left.cordoned and not left.drain and left.by == "test"
        assert await b.heartbeat("exec-0") is None

        # Restarted under the same id, as `tidegate up` would: cordoned, and takes nothing.
        leaving.start()
        back = await b.heartbeat_where(
            "exec-0", lambda hb: hb.pid == leaving.pid, "the restarted executor's heartbeat"
        )
        assert back.cordoned and not back.draining and back.running == []
        async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
            await tg.submit(TaskSpec(key="d2", argv=["/bin/true"]))
        await wait_for(lambda: _eq(b.work(), (1, 0)), timeout=20, what="d2 dispatched")
        await idle_beats(b, "exec-0", 4)
        assert await b.work() == (1, 0)

        await b.tell("exec-0", cordoned=False)
        row = await final(db, "beta:d2", "succeeded")
        assert row["executor"] == "exec-0" and row["attempt"] == 1


def _async(check: Callable[[], bool]) -> Callable[[], Any]:
    async def run() -> bool:
        return check()

    return run


# --- the console's page, from real heartbeats ------------------------------------------------


def render_live(context: dict[str, Any]) -> str:
    env = Environment(loader=FileSystemLoader(templates_dir()), autoescape=True)
    env.globals["csrf_token"] = lambda: "token"
    return env.get_template("executors_live.html").render(context)


async def test_executors_page_from_real_heartbeats(cluster: Cluster, db: Conn) -> None:
    cluster.driver()
    executors = {"exec-0": cluster.executor(slots=3), "exec-1": cluster.executor(slots=2)}
    async with bus(cluster.nats_url) as b:
        async with await TidegateClient.connect(cluster.nats_url, "gamma") as tg:
            await tg.submit(TaskSpec(key="slow/1", argv=["sleep", "60"]))
        await final(db, "gamma:slow/1", "running")
        await b.heartbeat_where("exec-1", lambda hb: True, "exec-1 beating")
        runner = ""
        for name in executors:
            hb = await b.heartbeat(name)
            if hb is not None and hb.running:
                runner = name
        (idle,) = set(executors) - {runner}
        await b.tell(idle, cordoned=True)
        await b.heartbeat_where(idle, lambda hb: hb.cordoned, "cordoned")

        page = await collect(b.js, interval_s=INTERVAL_S)
        assert page.problems == []
        rows = {e.executor_id: e for e in page.rows}
        assert set(rows) == {"exec-0", "exec-1"}
        assert rows[runner].state == "active" and rows[runner].used == 1
        assert [t.task_id for t in rows[runner].running] == ["gamma:slow/1"]
        assert rows[idle].state == "drained"  # cordoned, nothing running
        assert page.used == 1 and page.total == 5

        html = render_live(live_context(page))
        assert f'data-executor="{runner}" data-state="active"' in html
        assert f'data-executor="{idle}" data-state="drained"' in html
        assert 'href="/task?id=gamma%3Aslow/1"' in html
        assert f'action="/executors/{idle}/uncordon"' in html
        assert f'action="/executors/{runner}/cordon"' in html
        assert "1 of 5 slots in use" in html

        # An executor that stopped while cordoned stays listed, for its cordon.
        assert executors[idle].stop() == 0
        await wait_for(
            lambda: _eq(b.heartbeat(idle), None), timeout=15, what="the heartbeat removed"
        )
        page = await collect(b.js, interval_s=INTERVAL_S)
        gone = {e.executor_id: e for e in page.rows}[idle]
        assert gone.heartbeat is None and gone.state == "drained"
        assert "not running" in render_live(live_context(page))


async def test_executors_page_while_nats_is_down() -> None:
    page = await collect(None, interval_s=INTERVAL_S)
    assert page.rows == [] and page.problems == ["NATS unreachable: executors cannot be listed now"]
    html = render_live(live_context(page))
    assert "NATS unreachable" in html


# --- the console's routes, logged in as the console's users are ------------------------------


@asynccontextmanager
async def console(cluster: Cluster, role: str = "operator") -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings.from_env(cluster.env())
    async with Store(cluster.database_url) as store:
        await add_operator(store, username="olga", password=PASSWORD, role=role, actor="test")
    app = create_app(settings, AccessConfig(csrf_secret="s" * 32))
    async with AsyncTestClient(app=app) as client:
        form = await client.get("/login")
        token = re.search(r'name="_csrf_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        done = await client.post(
            "/login",
            data={"username": "olga", "password": PASSWORD, "_csrf_token": token[1]},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text
        client.headers["x-csrftoken"] = token[1]
        client.headers["hx-request"] = "true"
        yield client


PASSWORD = "a long enough password 1"


async def test_console_cordons_and_drains_through_the_bus(
    cluster: Cluster, nats_server: EmbeddedNats
) -> None:
    cluster.driver()
    leaving = cluster.executor(slots=2)  # exec-0
    async with bus(cluster.nats_url) as b, console(cluster) as web:
        await b.heartbeat_where("exec-0", lambda hb: True, "first heartbeat")
        page = await web.get("/executors")
        assert page.status_code == 200
        assert 'data-executor="exec-0" data-state="active"' in page.text
        assert 'aria-current="page"' in page.text and 'hx-trigger="every 2s"' in page.text

        assert (await web.post("/executors/nobody/cordon")).status_code == 404
        done = await web.post("/executors/exec-0/cordon")
        assert done.status_code == 200 and "exec-0: cordon sent" in done.text
        control = await b.control_of("exec-0")
        assert control is not None and control.cordoned and control.by == "olga"
        await b.heartbeat_where("exec-0", lambda hb: hb.cordoned, "cordoned by the console")
        live = await web.get("/executors/live")
        assert 'data-state="drained"' in live.text and "<html" not in live.text

        assert (await web.post("/executors/exec-0/uncordon")).status_code == 200
        await b.heartbeat_where("exec-0", lambda hb: not hb.cordoned, "uncordoned")
        assert (await web.post("/executors/exec-0/drain")).status_code == 200
        await wait_for(_async(lambda: not leaving.alive()), timeout=20, what="drained and exited")
        assert leaving.proc is not None and leaving.proc.returncode == 0

        audit = await _audit_lines(cluster.database_url)
        assert audit == [
            ("executor.cordon", "exec-0", "olga"),
            ("executor.uncordon", "exec-0", "olga"),
            ("executor.drain", "exec-0", "olga"),
        ]

        # NATS down: the page says so, and a change is refused, not half done.
        nats_server.stop()
        await wait_for(
            _async(lambda: web.app.state.link.js is None), timeout=10, what="the link down"
        )
        live = await web.get("/executors/live")
        assert live.status_code == 200 and "NATS unreachable" in live.text
        refused = await web.post("/executors/exec-0/uncordon")
        assert refused.status_code == 503
        assert refused.text == "NATS is unreachable: the executor was not told; nothing changed"


async def _audit_lines(database_url: str) -> list[tuple[str, str, str]]:
    async with Store(database_url) as store:
        lines = await list_actions(store, limit=50)
    return [
        (a.action, a.target, a.actor) for a in reversed(lines) if a.action.startswith("executor.")
    ]


async def test_a_viewer_may_look_but_not_cordon(cluster: Cluster) -> None:
    cluster.executor(slots=1)  # exec-0
    async with bus(cluster.nats_url) as b, console(cluster, role="viewer") as web:
        await b.heartbeat_where("exec-0", lambda hb: True, "first heartbeat")
        assert 'data-executor="exec-0"' in (await web.get("/executors/live")).text
        refused = await web.post("/executors/exec-0/cordon")
        assert refused.status_code == 403
        assert await b.control_of("exec-0") is None
