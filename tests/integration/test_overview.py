"""The console's overview on real servers: figures from JetStream and the drivers' samples.

The page is served by a small Litestar app holding only the overview's routes (and the static
routes base.html links to): login and CSRF are app-wide concerns of `console.app`, and they
are not what these tests are about.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
from harness import Cluster, register, wait_for
from litestar import Litestar
from litestar.plugins.htmx import HTMXPlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.bus.clients import RegistryBuckets, publish_client
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.console import overview
from tidegate.console.figures import Overview, collect
from tidegate.console.link import BusLink
from tidegate.console.sources import StatsHistory
from tidegate.driver.stats import StatsSampler
from tidegate.embedded.servers import free_port
from tidegate.metrics import DriverMetrics
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, TaskSpec, decode_driver_stats

Conn = psycopg.AsyncConnection[Any]
STATS_EVERY = {"TIDEGATE_STATS_EVERY_S": "0.5"}


def templates_dir() -> Path:
    return Path(str(files("tidegate.templates")))


def closed_url(scheme: str) -> str:
    """A URL nothing listens on: the server is "down"."""
    port = free_port()
    return f"nats://127.0.0.1:{port}" if scheme == "nats" else f"postgresql://x@127.0.0.1:{port}/x"


@asynccontextmanager
async def page_app(nats_url: str, database_url: str) -> AsyncIterator[AsyncTestClient[Litestar]]:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Made in the app's own event loop, as console.app does: the test client runs the
        # app in another loop than the test's.
        store = Store(database_url, min_size=1, max_size=2, name="test-console")
        await store.open(wait=False)
        link = BusLink(nats_url)
        link.start()
        app.state.store, app.state.link = store, link
        try:
            yield
        finally:
            await link.close()
            await store.close()

    static = templates_dir() / "static"
    app = Litestar(
        route_handlers=[
            *overview.ROUTES,
            create_static_files_router(path="/static", directories=[static], name="static"),
            create_static_files_router(path="/static/htmx", directories=[static], name="htmx"),
        ],
        lifespan=[lifespan],
        plugins=[HTMXPlugin()],
        template_config=TemplateConfig(directory=templates_dir(), engine=JinjaTemplateEngine),
    )
    async with AsyncTestClient(app) as client:
        yield client


async def test_figures_follow_a_real_cluster(cluster: Cluster, engine_db: str) -> None:
    await register(cluster.nats_url, engine_db, ClientRecord(name="sleepy", paused=True))
    cluster.driver(**STATS_EVERY)
    cluster.executor(slots=4)
    nc: NATS = await connect(cluster.nats_url, "test-overview")
    js = nc.jetstream()
    history = StatsHistory()
    store = Store(engine_db, name="test-overview")
    await store.open()
    try:
        async with await TidegateClient.connect(cluster.nats_url, "sleepy") as tg:
            await tg.submit_many(TaskSpec(key=f"z{i}", argv=["/bin/true"]) for i in range(10))
        async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
            await tg.submit_many(
                TaskSpec(key=f"s{i}", shell="sleep 4", timeout_s=60) for i in range(6)
            )

        last: list[Overview] = []  # for the failure message

        async def busy() -> Overview | None:
            o = await collect(store, js, history)
            last[:] = [o]
            by_client = {c.client: c for c in o.clients}
            sleepy, alpha = by_client.get("sleepy"), by_client.get("alpha")
            running = alpha.running if alpha is not None else None
            # The three sources agree: heartbeats (running), the work consumer (delivered)
            # and the pools. The executor fills at most its slots (one may stay reserved for
            # the other class), so "every slot" is not the test.
            ok = (
                sleepy is not None
                and sleepy.ready == 10  # paused: its tasks wait in its ready queue
                and sleepy.paused
                and alpha is not None
                and alpha.work == 6  # in the work queue, the running ones included
                and running is not None
                and 1 <= running <= 4
                and [(w.task_class, w.stored, w.delivered) for w in o.work or []]
                == [("short", 6, running)]
                and [(p.pool, p.running) for p in o.pools or []] == [("default", running)]
                and (o.rates.accepted or 0) > 0
            )
            return o if ok else None

        try:
            seen: Overview = await wait_for(busy, timeout=60, what="a busy overview")
        except AssertionError:
            raise AssertionError(f"{last}\n{cluster.logs()}") from None
        assert seen.missing == [] and seen.nats and seen.database
        assert seen.totals.ready == 10 and seen.totals.work == 6 and seen.totals.submitted == 0
        assert seen.pools is not None
        [pool] = seen.pools
        assert (pool.executors, pool.slots) == (1, 4)
        assert seen.work is not None
        [work] = seen.work
        assert work.waiting == 6 - (seen.totals.running or 0)
        assert seen.callbacks is not None and seen.callbacks.dead == 0
        assert seen.drivers == 1

        record = await store.update_client("sleepy", paused=False)
        await publish_client(await RegistryBuckets.of(js), record)

        async def history_shows_the_flow() -> Overview | None:
            o = await collect(store, js, history)
            peaks = {c.key: max((v for _, v in c.points), default=0.0) for c in o.charts}
            drained = o.totals.ready == 0 and o.totals.work == 0 and o.totals.running == 0
            return o if drained and peaks["accepted"] > 0 and peaks["finished"] > 0 else None

        # The charts hold complete 20 s buckets only: this waits for one to close.
        done: Overview = await wait_for(
            history_shows_the_flow, timeout=90, interval=1.0, what="the flow in the charts"
        )
        accepted = next(c for c in done.charts if c.key == "accepted")
        assert all(v >= 0 for _, v in accepted.points)
        # The rate's integral over the hour cannot exceed what was submitted.
        assert sum(v for _, v in accepted.points) * 20 <= 16 + 1e-6

        # The samples themselves: one subject per driver on the stats stream, an hour kept.
        info = await js.stream_info(names.STATS_STREAM, subjects_filter=names.STATS_ALL)
        assert info.config.max_age == 3600
        assert info.state.subjects is not None and len(info.state.subjects) == 1
        [subject] = info.state.subjects
        last = decode_driver_stats((await js.get_last_msg(names.STATS_STREAM, subject)).data or b"")
        assert subject == names.stats_subject(last.driver)
        assert last.accepted == 16 and last.finished >= 6 and last.commits > 0
    finally:
        await store.close()
        await nc.close()


async def test_a_new_console_reads_the_same_history(nats_url: str) -> None:
    """The history lives on the bus: a second reader (a restarted console) gets it all."""
    nc = await connect(nats_url, "test-history")
    js = nc.jetstream()
    try:
        await ensure_all(js, Limits())
        metrics = DriverMetrics()
        sampler = StatsSampler(js, metrics, "driver-host.example-1", every_s=0.1)
        for n in range(5):
            metrics.routed.labels(pool="default", task_class="short").inc(10)
            metrics.events.labels(state="succeeded").inc(n)
            metrics.events.labels(state="running").inc(100)  # not a terminal state
            assert await sampler.publish_once()
        now = time.time()
        first = await StatsHistory().refresh(js, now=now)
        again = StatsHistory()
        assert await again.refresh(js, now=now) == first
        assert [s.seq for s in first] == [0, 1, 2, 3, 4]
        assert [s.accepted for s in first] == [10, 20, 30, 40, 50]
        assert first[-1].finished == 0 + 1 + 2 + 3 + 4
        # Only what was added is read on the next poll.
        assert await sampler.publish_once()
        assert len(await again.refresh(js, now=time.time())) == 6
        assert again.last_seq == 6
    finally:
        await nc.close()


async def test_the_page_renders_while_nats_is_down(engine_db: str) -> None:
    async with page_app(closed_url("nats"), engine_db) as client:
        started = time.monotonic()
        page = await client.get("/")
        took = time.monotonic() - started
        live = await client.get("/overview/live")
    assert page.status_code == 200 and live.status_code == 200
    assert took < 5
    assert "NATS: not connected" in page.text
    assert 'hx-get="/overview/live"' in page.text and 'hx-trigger="every 3s"' in page.text
    assert page.text.count("<svg") == 4 and "no data yet" in page.text
    assert 'aria-current="page">Overview' in page.text
    # The database still answers: the callback counts are real numbers.
    assert "callback dead letters" in live.text and 'PostgreSQL <span class="ok">' in live.text
    assert not live.text.lstrip().startswith("<!doctype")  # a fragment, not a page


async def test_the_page_renders_while_postgres_is_down(nats_url: str) -> None:
    nc = await connect(nats_url, "test-setup")
    try:
        await ensure_all(nc.jetstream(), Limits())
        # A long period: the driver still counts as reporting when the page is asked for.
        sampler = StatsSampler(nc.jetstream(), DriverMetrics(), "d1", every_s=60.0)
        assert await sampler.publish_once()
    finally:
        await nc.close()
    async with page_app(nats_url, closed_url("postgresql")) as client:

        async def connected() -> bool:
            live = await client.get("/overview/live")
            return 'NATS <span class="ok">up' in live.text

        await wait_for(connected, timeout=10, what="the console's NATS link")
        started = time.monotonic()
        page = await client.get("/")
        took = time.monotonic() - started
    assert page.status_code == 200
    assert took < 5
    assert "PostgreSQL: callback counts" in page.text
    assert 'PostgreSQL <span class="bad">down' in page.text
    assert "1 driver reporting" in page.text
    assert "NATS: not connected" not in page.text


def test_templates_ship_with_the_package() -> None:
    assert (Path(templates_dir()) / "overview.html").is_file()
    assert (Path(templates_dir()) / "overview_live.html").is_file()
