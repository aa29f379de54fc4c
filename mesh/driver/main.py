"""`tidegate driver`: route, project and housekeeping loops of one stateless driver.

Drivers share everything through JetStream and PostgreSQL; start as many as you like.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tidegate.backoff import Backoff
from tidegate.bus.clients import decode_client, publish_client
from tidegate.bus.kvwatch import KvMirror
from tidegate.bus.lease import Leases
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Publisher
from tidegate.bus.topology import Buckets, ensure_all
from tidegate.config import Settings
from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy
from tidegate.driver.callbacks.retry import retry_pass, schedule_retries
from tidegate.driver.callbacks.transport import Transports
from tidegate.driver.dispatch import Dispatcher
from tidegate.driver.notify import Notifier
from tidegate.driver.projector import Projector
from tidegate.driver.route import Router
from tidegate.driver.stats import StatsSampler
from tidegate.metrics import DriverMetrics, serve
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.supervise import Supervisor, until_done
from tidegate.wire import ClientRecord, Heartbeat, decode_heartbeat

log = logging.getLogger(__name__)

# Migrations and the client mirror, until the database answers (it may start after us).
SETUP_RETRY = Backoff(base_s=0.5, cap_s=10.0)


class Driver:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = DriverMetrics()
        self.store = Store(
            settings.connection.database_url,
            max_size=max(4, settings.driver.per_event_connections),
            name="tidegate-driver",
        )
        self.supervisor = Supervisor("driver")
        self.metrics_port: int | None = None
        self._gauged: set[str] = set()  # executors with an age gauge, removed when they go

    async def start(self) -> None:
        s = self.settings
        self.nc = await connect(s.connection.nats_url, "tidegate-driver")
        js = self.nc.jetstream()
        self.buckets: Buckets = await ensure_all(js, s.limits)
        await self.store.open(wait=False)
        if s.driver.metrics_port is not None:
            _, self.metrics_port = serve(self.metrics.registry, s.driver.metrics_port)
        self.publisher = Publisher(self.nc)
        self.projector = Projector(js, self.store, s.driver, self.metrics)
        self.clients: KvMirror[ClientRecord] = KvMirror(
            self.buckets.clients, decode_client, name="clients"
        )
        self.executors: KvMirror[Heartbeat] = KvMirror(
            self.buckets.executors,
            decode_heartbeat,
            name="executors",
            on_change=self._on_heartbeat,
        )
        router = Router(js, self.publisher, self.clients.get, s.driver, s.limits, self.metrics)
        self.leases = Leases(self.buckets.leases, f"driver-{socket.gethostname()}-{os.getpid()}")
        dispatcher = Dispatcher(
            js,
            self.publisher,
            self.leases,
            self.buckets.dispatch,
            self.clients.get,
            lambda: list(self.executors.values.values()),
            s.driver,
            self.metrics,
        )
        d = s.driver
        self.callback_store = Store(
            s.connection.database_url, min_size=0, max_size=16, name="tidegate-callbacks"
        )
        await self.callback_store.open(wait=False)
        self.outbox = Outbox(
            self.callback_store,
            RetryPolicy(
                base_s=d.retry_base_s,
                factor=d.retry_factor,
                cap_s=d.retry_cap_s,
                max_attempts=d.retry_max_attempts,
                max_age_s=d.retry_max_age_s,
            ),
        )
        self.transports = Transports(self.nc, timeout_s=d.callback_timeout_s)
        self.notifier = Notifier(
            js,
            self.store,
            self.outbox,
            self.transports,
            self.clients.get,
            self.leases,
            self.metrics,
        )
        sup = self.supervisor
        # The database may be down at start: routing must not wait for it, only projection.
        sup.start("database-setup", self._database_setup)
        sup.start("clients", self.clients.run)
        sup.start("executors", self.executors.run)
        await self.clients.ready.wait()  # never reject a known client as unknown at start
        sup.start("route", router.run)
        sup.start("dispatch", dispatcher.run)
        sup.start("project", self.projector.run)
        sup.start("notify", self.notifier.run)
        sup.start("gauges", self._gauges)
        stats = StatsSampler(js, self.metrics, self.leases.owner, d.stats_every_s)
        sup.start("stats", stats.run)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.add_job(
            self._retention,
            "cron",
            hour=0,
            minute=30,
            id="retention",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=3600,
        )
        schedule_retries(self.scheduler, self._retry_callbacks, d.retry_every_s)
        self.scheduler.start()
        log.info("driver up (persist=%s)", s.driver.persist)

    async def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        await self.supervisor.stop()
        await self.publisher.close()
        await self.transports.close()
        await self.callback_store.close()
        await self.store.close()
        await self.nc.drain()

    def _on_heartbeat(self, key: str, hb: Heartbeat | None) -> None:
        if hb is not None:
            self.projector.offer_heartbeat(hb)
        elif key in self._gauged:
            self.metrics.heartbeat_age.remove(key)
            self._gauged.discard(key)

    async def _gauges(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for key, at in list(self.executors.updated_at.items()):
                self.metrics.heartbeat_age.labels(executor=key).set(now - at)
                self._gauged.add(key)
            self.metrics.executors.set(len(self.executors.values))
            self.metrics.running.set(sum(len(h.running) for h in self.executors.values.values()))
            await asyncio.sleep(1.0)

    async def _database_setup(self) -> None:
        async def once() -> None:
            applied = await migrate(self.settings.connection.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            records = await self.store.list_clients()
            for record in records:
                await publish_client(self.buckets.clients, record)
            log.info("mirrored %d clients into the clients bucket", len(records))

        await until_done(once, what="database setup", backoff=SETUP_RETRY)

    async def _retry_callbacks(self) -> None:
        stats = await retry_pass(self.outbox, self.transports, self.clients.get)
        self.metrics.retries.labels(result="delivered").inc(stats.delivered)
        self.metrics.retries.labels(result="failed").inc(stats.failed)
        self.metrics.retries.labels(result="dead").inc(stats.dead)

    async def _retention(self) -> None:
        cutoff = (datetime.now(UTC) - timedelta(days=self.settings.driver.retention_days)).date()
        dropped = await self.store.drop_partitions_before(cutoff)
        log.info("retention: dropped %d day partitions before %s", dropped, cutoff)


async def run_driver(settings: Settings, stop: asyncio.Event) -> None:
    driver = Driver(settings)
    await driver.start()
    await stop.wait()
    log.info("driver stopping")
    await driver.stop()
