"""`tidegate bench console`: the console's answer times with a million tasks in the database.

On a private stack (`stack.Stack`: its own nats-server and PostgreSQL) it migrates the
database and makes the NATS topology, registers the clients (PostgreSQL and the KV mirror),
fills `tasks` (`fill`), adds a viewer account, and runs a real driver, an executor and the
console as processes, as `tidegate up` does. It logs in through the login form, then times
GETs of each page over HTTP, one request at a time, so a figure is the whole answer: HTTP,
session check, database and NATS reads, template rendering.

The overview's charts draw the drivers' samples of the last hour (the TG_STATS stream). A
fresh stack has none, so before the console starts the bench publishes an hour of samples of
a driver named `bench-history` (one every 5 s, as a driver does); the real driver's live
samples follow. Without them the charts would be empty and the overview cheaper than it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final
from urllib.parse import urlencode

import httpx
import msgspec
import psycopg
from nats.js import JetStreamContext
from psycopg.rows import dict_row

from tidegate import names
from tidegate.bench.fill import fill_tasks
from tidegate.bench.flood import client_names
from tidegate.bench.model import BenchError
from tidegate.bench.run import cleanup_guard, term_as_interrupt
from tidegate.bench.stack import Stack
from tidegate.bench.timing import ConsoleConfig, ConsoleReport, DataFacts, PageResult, summarize
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.console.tasks import PAGE_SIZE, cursor_of
from tidegate.embedded.servers import free_port
from tidegate.registry import add_client
from tidegate.store import operators
from tidegate.store.migrate import migrate
from tidegate.store.rows import TaskRecord
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, DriverStats, encode

log = logging.getLogger("tidegate.bench")

OPERATOR: Final = "bench"
WARMUP: Final = 3
DEEP_PAGE: Final = 200  # as far as an operator paging back through a flood with "next page" gets
READY_TIMEOUT_S: Final = 90.0
HTTP_TIMEOUT_S: Final = 30.0
HISTORY_DRIVER: Final = "bench-history"
HISTORY_EVERY_S: Final = 5.0
HISTORY_SPAN_S: Final = 3600.0

# What each page shows when it could read everything (it answers 200 in any case).
OVERVIEW_MISSING: Final = "Not everything could be read"
PAGE_ERROR: Final = '<p class="error" role="alert">'
PAGE_NOTICE: Final = '<p class="notice" role="status">'
TASK_ROW: Final = "<tr data-task="
CLIENT_ROW: Final = 'data-client="'
TOKEN: Final = re.compile(r'name="_csrf_token" value="([^"]+)"')

Check = Callable[[str], str | None]


@dataclass(frozen=True)
class Page:
    name: str
    url: str
    check: Check  # the body → what is wrong with it, or None


def deep_page_for(rows: int, page_size: int = PAGE_SIZE) -> int:
    """Pages to skip for the deep page: DEEP_PAGE, or half the list in a smaller table."""
    return max(min(DEEP_PAGE, rows // page_size // 2), 1)


def overview_check(body: str) -> str | None:
    return "the overview lists figures it could not read" if OVERVIEW_MISSING in body else None


def rows_check(marker: str, at_least: int, *, error: str = PAGE_ERROR) -> Check:
    def check(body: str) -> str | None:
        if error in body:
            return "the page shows an error"
        found = body.count(marker)
        return None if found >= at_least else f"{found} rows shown, expected {at_least}"

    return check


def task_check(body: str) -> str | None:
    if PAGE_ERROR in body or 'id="task-state"' not in body:
        return "the task page shows no task"
    return None


def history_samples(now: datetime) -> list[DriverStats]:
    """An hour of one driver's counters, a sample every 5 s, a flood at the top of the hour."""
    started = now - timedelta(seconds=HISTORY_SPAN_S)
    samples: list[DriverStats] = []
    accepted = finished = commits = rows = delivered = 0
    n = int(HISTORY_SPAN_S / HISTORY_EVERY_S)
    for seq in range(n):
        flood = 20 if seq < 12 else 1  # a top-of-the-hour flood in the first minute
        accepted += 150 * flood
        finished += 140 * flood
        commits += 12 * min(flood, 5)
        rows += 300 * flood
        delivered += 140 * flood
        samples.append(
            DriverStats(
                driver=HISTORY_DRIVER,
                started_at=started,
                at=started + timedelta(seconds=(seq + 1) * HISTORY_EVERY_S),
                seq=seq,
                every_s=HISTORY_EVERY_S,
                accepted=accepted,
                finished=finished,
                commits=commits,
                rows=rows,
                callbacks_delivered=delivered,
                callbacks_outboxed=0,
            )
        )
    return samples


async def _publish_history(js: JetStreamContext, now: datetime) -> None:
    subject = names.stats_subject(HISTORY_DRIVER)
    for sample in history_samples(now):
        await js.publish(subject, encode(sample))


async def _prepare(stack: Stack, cfg: ConsoleConfig) -> tuple[str, DataFacts]:
    """Topology, schema, clients, the filled table and a viewer (and its password)."""
    settings = Settings.from_env(stack.env())
    nc = await connect(stack.nats_url, "tidegate-bench")
    try:
        js = nc.jetstream()
        buckets = await ensure_all(js, settings.limits)
        await migrate(stack.database_url)
        clients = client_names(cfg.clients)
        password = operators.generate_password()
        async with Store(stack.database_url, max_size=1, name="tidegate-bench") as store:
            for name in clients:
                await add_client(store, buckets.registry, ClientRecord(name=name), allowed_nets=())
            await operators.add_operator(
                store, username=OPERATOR, password=password, role="viewer", actor="bench"
            )
        log.info("filling tasks with %d rows over %d days", cfg.rows, cfg.days)
        now = datetime.now(UTC)
        facts = await fill_tasks(stack.database_url, clients, cfg.rows, cfg.days, now=now)
        log.info(
            "%d rows in %d partitions (%.0f MB) in %.1f s, vacuumed in %.1f s",
            facts.rows,
            facts.partitions,
            facts.table_mb,
            facts.fill_s,
            facts.vacuum_s,
        )
        # Ending a minute ago: until the real driver's first sample, the overview says that no
        # driver reports, and the bench waits for that sample.
        await _publish_history(js, datetime.now(UTC) - timedelta(seconds=60))
    finally:
        await nc.close()
    return password, facts


async def _pages(database_url: str, cfg: ConsoleConfig) -> list[Page]:
    """The pages to time; the deep cursor and the task come from the filled table."""
    client = client_names(cfg.clients)[0]  # the largest client
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        conn.cursor(row_factory=dict_row) as cur,
    ):
        # The row a reader following "next page" deep_page times has last seen.
        await cur.execute(
            "SELECT * FROM task_records ORDER BY submitted_at DESC, task_id DESC OFFSET %s LIMIT 1",
            (cfg.deep_page * PAGE_SIZE - 1,),
        )
        last_seen = await cur.fetchone()
        # A failed task of the largest client, from the middle of the week if it has one.
        await cur.execute(
            "SELECT task_id FROM tasks WHERE client = %s"
            " ORDER BY state = 'failed' DESC, abs(extract(epoch FROM now() - submitted_at)"
            "          - %s * 43200) LIMIT 1",
            (client, cfg.days),
        )
        task = await cur.fetchone()
    if last_seen is None or task is None:
        raise BenchError("the filled table has too few rows for the deep page and a task")
    after = cursor_of(msgspec.convert(last_seen, TaskRecord))
    full = rows_check(TASK_ROW, PAGE_SIZE)
    return [
        Page("overview", "/", overview_check),
        Page("overview, live part", "/overview/live", overview_check),
        Page("clients", "/clients", rows_check(CLIENT_ROW, cfg.clients, error=PAGE_NOTICE)),
        Page("tasks, first page", "/tasks", full),
        Page(f"tasks, page {cfg.deep_page + 1}", "/tasks?" + urlencode({"after": after}), full),
        Page(
            "tasks, client + failed",
            "/tasks?" + urlencode({"client": client, "state": "failed"}),
            rows_check(TASK_ROW, 1),
        ),
        Page("one task", "/task?" + urlencode({"id": task["task_id"]}), task_check),
    ]


async def _wait_until(stack: Stack, what: str, ready: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        stack.check_children()
        with contextlib.suppress(httpx.HTTPError):
            if await ready():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} after {READY_TIMEOUT_S:.0f}s; see {stack.root / 'logs'}")
        await asyncio.sleep(0.5)


async def login(http: httpx.AsyncClient, username: str, password: str) -> None:
    """Through the form, as a browser: its CSRF token field, and the cookie set with it."""
    page = await http.get("/login")
    found = TOKEN.search(page.text)
    if found is None:
        raise BenchError(f"the login page has no CSRF token (HTTP {page.status_code})")
    answer = await http.post(
        "/login",
        data={"username": username, "password": password, "next": "/", "_csrf_token": found[1]},
    )
    if answer.status_code != 303:
        raise BenchError(f"login as {username!r} refused: HTTP {answer.status_code}")


async def _time(http: httpx.AsyncClient, page: Page) -> tuple[float, int, str | None]:
    started = time.perf_counter()
    answer = await http.get(page.url)  # the body is read before get() returns
    elapsed_ms = (time.perf_counter() - started) * 1000
    problem = f"HTTP {answer.status_code}" if answer.status_code != 200 else None
    return elapsed_ms, answer.status_code, problem or page.check(answer.text)


async def measure(
    http: httpx.AsyncClient, pages: list[Page], cfg: ConsoleConfig
) -> list[PageResult]:
    """Round after round over every page, so a slow moment of the machine is shared out."""
    for _ in range(cfg.warmup):
        for page in pages:
            await _time(http, page)
    times: dict[str, list[float]] = {p.name: [] for p in pages}
    statuses: dict[str, list[int]] = {p.name: [] for p in pages}
    problems: dict[str, list[str | None]] = {p.name: [] for p in pages}
    for _ in range(cfg.requests):
        for page in pages:
            ms, status, problem = await _time(http, page)
            times[page.name].append(ms)
            statuses[page.name].append(status)
            problems[page.name].append(problem)
    return [
        summarize(p.name, p.url, times[p.name], statuses[p.name], problems[p.name], cfg.target_ms)
        for p in pages
    ]


async def bench_stack(stack: Stack, cfg: ConsoleConfig, report: ConsoleReport) -> None:
    """Prepare `stack`, start the components, and time the pages into `report`."""
    password, report.data = await _prepare(stack, cfg)
    port = free_port()
    stack.spawn("driver", "driver")
    stack.spawn("executor0", "executor", "--executor-id", "bench-exec-0", "--slots", "4")
    stack.spawn("console", "console", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=HTTP_TIMEOUT_S) as http:

        async def healthy() -> bool:
            return (await http.get("/health")).status_code == 200

        await _wait_until(stack, "the console is not healthy", healthy)
        await login(http, OPERATOR, password)
        pages = await _pages(stack.database_url, cfg)

        async def complete() -> bool:  # the driver's first sample is in
            return overview_check((await http.get("/overview/live")).text) is None

        await _wait_until(stack, "the overview still misses figures", complete)
        log.info("console up at %s; timing %d pages", base, len(pages))
        report.load_before = list(os.getloadavg())
        report.pages = await measure(http, pages, cfg)
        report.load_after = list(os.getloadavg())


def run_console_bench(
    cfg: ConsoleConfig, *, work_dir: Path | None = None, keep: bool = False
) -> ConsoleReport:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tidegate-bench-console-", dir=work_dir))
    report = ConsoleReport(
        benchmark="console",
        config=cfg,
        data=None,
        pages=[],
        cpus=os.cpu_count() or 0,
        load_before=[],
        load_after=[],
        ok=False,
        under_target=False,
    )
    stack = Stack(root)
    try:
        with term_as_interrupt():
            try:
                log.info("starting nats-server and PostgreSQL in %s", root)
                stack.start_servers()
                asyncio.run(bench_stack(stack, cfg, report))
            except Exception as exc:
                log.exception("the console bench failed")
                report.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            finally:
                with cleanup_guard():
                    stack.close()
    finally:
        report.ok = (
            report.error is None
            and bool(report.pages)
            and all(p.failures == 0 and p.requests > 0 for p in report.pages)
        )
        report.under_target = report.ok and all(p.under_target for p in report.pages)
        if keep or not report.ok:
            log.info("data and logs kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return report
