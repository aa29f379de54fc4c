"""An attempt's full log on the console's task page, asked for from the real executor process
that ran it over real NATS: paged, escaped, and a clear answer when it cannot be had."""

from __future__ import annotations

import html
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest
from harness import Cluster, wait_for
from litestar import Litestar
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, cli_env, login
from test_engine_outcomes import final

from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Connection, Limits, Settings
from tidegate.console.app import create_app
from tidegate.embedded.servers import EmbeddedNats
from tidegate.wire import LOG_CHUNK_MAX, TaskSpec

Client = AsyncTestClient[Any]
Conn = psycopg.AsyncConnection[Any]
HX = {"HX-Request": "true"}
LINES = 35_000  # "line 000001\n" is 12 bytes: 420,000 bytes, two parts, far beyond the tail
HOSTILE = "<b>&amp; not markup</b>"
# The task's output: a line of markup, then numbered lines.
PRINTER = (
    f"print({HOSTILE!r})\n"
    f"import sys\nsys.stdout.writelines(f'line {{i:06d}}\\n' for i in range(1, {LINES + 1}))"
)
EXPECTED = HOSTILE + "\n" + "".join(f"line {i:06d}\n" for i in range(1, LINES + 1))


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
async def viewer(
    app: Litestar, nats_url: str, engine_db: str, tmp_path: Path
) -> AsyncIterator[Client]:
    # Reading a log changes nothing: a viewer may.
    add_operator(cli_env(nats_url, engine_db, tmp_path), "vera", "viewer")
    async with AsyncTestClient(app=app) as client:
        assert (await login(client, "vera")).status_code == 303
        yield client


def link_of(page: httpx.Response) -> str:
    found = re.search(r'hx-get="(/task/log\?[^"]+)"', page.text)
    assert found, page.text
    return html.unescape(found.group(1))


def more_of(fragment: httpx.Response) -> str:
    found = re.search(r'hx-get="(/task/log\?[^"]+)"[^>]*name="log-more"', fragment.text)
    assert found, fragment.text
    return html.unescape(found.group(1))


def log_text(fragment: httpx.Response) -> str:
    found = re.search(r'<pre class="task-log"[^>]*>(.*?)</pre>', fragment.text, re.S)
    assert found, fragment.text
    return html.unescape(found.group(1))


async def test_the_full_log_comes_from_the_executor_in_parts(
    cluster: Cluster, db: Conn, viewer: Client, nats_server: EmbeddedNats
) -> None:
    cluster.driver()
    executor = cluster.executor(slots=2)
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(TaskSpec(key="big", argv=[sys.executable, "-c", PRINTER]))
    row = await final(db, "alpha:big", "succeeded")
    assert row["executor"] == "exec-0" and len(row["log_tail"]) < 5000  # the database: a tail

    page = await viewer.get("/task", params={"id": "alpha:big"})
    assert page.status_code == 200 and "Full log of attempt 1" in page.text
    link = link_of(page)
    assert "executor=exec-0" in link and "at=" in link  # readable while the database is down

    first = await viewer.get(link, headers=HX)
    assert first.status_code == 200, first.text
    part = log_text(first)
    assert part.startswith(HOSTILE + "\nline 000001\n")
    assert "&lt;b&gt;&amp;amp; not markup&lt;/b&gt;" in first.text  # escaped, not markup
    assert len(part.encode()) <= LOG_CHUNK_MAX and part.endswith("\n")  # whole lines
    size = len(EXPECTED.encode())
    assert f"bytes 0 to {len(part.encode())} of {size}" in first.text
    more = more_of(first)
    assert f"offset={len(part.encode())}" in more

    second = await viewer.get(more, headers=HX)
    assert second.status_code == 200, second.text
    rest = log_text(second)
    assert rest.endswith(f"line {LINES:06d}\n")
    assert part + rest == EXPECTED
    assert "End of the log so far" in second.text

    # Without the link's executor, the route finds it in the task's row; a whole page.
    plain = await viewer.get("/task/log", params={"id": "alpha:big", "attempt": "1"})
    assert plain.status_code == 200 and "<h1>Log of" in plain.text
    assert log_text(plain) == part

    # An attempt that never was, asked of the database and of the executor itself.
    unknown = await viewer.get("/task/log", params={"id": "alpha:big", "attempt": "7"})
    assert unknown.status_code == 404 and "has no attempt 7" in unknown.text
    asked = await viewer.get(
        "/task/log", params={"id": "alpha:big", "attempt": "7", "executor": "exec-0"}
    )
    assert asked.status_code == 404 and "not on this executor" in asked.text
    assert "attempt 7 of alpha:big" in asked.text
    bad = await viewer.get("/task/log", params={"id": "alpha:big", "attempt": "one"})
    assert bad.status_code == 422 and "attempt" in bad.text
    nobody = await viewer.get("/task/log", params={"id": "alpha:nope", "attempt": "1"})
    assert nobody.status_code == 404 and "no task" in nobody.text

    # The executor stops: its log is out of reach, and the page says so.
    assert executor.stop() == 0
    gone = await viewer.get(link)
    assert gone.status_code == 503, gone.text
    said = "the executor exec-0 does not answer: it is gone or stopped"
    assert said in html.unescape(gone.text)
    in_place = await viewer.get(link, headers=HX)  # htmx shows it where the log would be
    assert in_place.status_code == 200 and said in html.unescape(in_place.text)

    # NATS down: the console says so (the session lives on in the console's memory).
    for component in cluster.components:
        component.stop()
    nats_server.stop()

    async def nats_down() -> httpx.Response | None:
        answer = await viewer.get(link)
        return answer if "NATS is unreachable" in answer.text else None

    down = await wait_for(nats_down, timeout=15, what="the route to say NATS is down")
    assert down.status_code == 503


async def test_a_running_attempt_s_log_is_read_as_it_grows(
    cluster: Cluster, db: Conn, viewer: Client
) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        await tg.submit(TaskSpec(key="slow", shell="echo first; sleep 30"))
    await final(db, "beta:slow", "running")
    page = await viewer.get("/task", params={"id": "beta:slow"})
    link = link_of(page)

    async def first_line() -> httpx.Response | None:
        answer = await viewer.get(link, headers=HX)
        return answer if "first\n" in answer.text else None

    # Written through at once, not when the runner's buffer fills or the task ends.
    part = await wait_for(first_line, timeout=10, what="the running task's first line")
    assert "End of the log so far" in part.text and 'name="log-more"' in part.text
