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

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus.buckets import Buckets
from tidegate.bus.clients import decode_client, decode_secrets, publish_client
from tidegate.bus.deadletters import set_aside_raw
from tidegate.bus.handback import hand_back, keep_late_deliveries
from tidegate.bus.kvwatch import KvMirror
from tidegate.bus.lease import Leases
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Publisher
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy
from tidegate.driver.callbacks.retry import retry_pass, schedule_retries
from tidegate.driver.callbacks.transport import Transports
from tidegate.driver.clientapi import ClientApi
from tidegate.driver.dispatch import Dispatcher
from tidegate.driver.fence import OUTBOX_SCOPE, DeliveredFence
from tidegate.driver.gauges import Gauges
from tidegate.driver.notify import Notifier
from tidegate.driver.poison import PoisonWatch
from tidegate.driver.projector import Projector
from tidegate.driver.reconcile import Reconciler
from tidegate.driver.route import Router
from tidegate.driver.stats import StatsSampler
from tidegate.errors import ConfigError
from tidegate.metrics import DriverMetrics, count_dead_letter, serve
from tidegate.store.failures import misconfigured
from tidegate.store.migrate import migrate
from tidegate.store.pace import CALLBACKS, HOUSEKEEPING, PROJECTOR, RETRY, SENSITIVE, CommitPace
from tidegate.store.store import Store
from tidegate.supervise import Supervisor, until_done
from tidegate.urlpolicy import parse_nets
from tidegate.wire import ClientRecord, Heartbeat, decode_heartbeat
from tidegate.wire.clients import ClientSecrets

log = logging.getLogger(__name__)

# An executor whose heartbeats cannot be read has one set aside per this many seconds.
_HEARTBEAT_POISON_EVERY_S = 60.0
# Migrations and the client mirror, until the database answers (it may start after us).
SETUP_RETRY = Backoff(base_s=0.5, cap_s=10.0)
# Stopping: the loops get this long to end once cancelled, each closing step this long. A
# driver asked to stop is gone in a few seconds, however large the backlog.
STOP_LOOPS_S = 2.0
STOP_STEP_S = 1.0


class Driver:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = DriverMetrics()
        # One commit cap for everything this driver sends the database, whichever pool and
        # writer: each gets its own lane of it (weights and priority: mesh/store/pace.py).
        self.pace = CommitPace(settings.driver.projector_max_commits_per_s, on_wait=self._waited)
        self.store = Store(
            settings.connection.database_url,
            max_size=max(4, settings.driver.per_event_connections),
            name="tidegate-driver",
            pace=self.pace.lane(HOUSEKEEPING),
        )
        self.supervisor = Supervisor("driver")
        self.metrics_port: int | None = None
        self._gauged: set[str] = set()  # executors with an age gauge, removed when they go
        self._poisoned_at: dict[str, float] = {}  # executor key → when its heartbeat was set aside

    async def start(self) -> None:
        s = self.settings
        self.nc = await connect(s.connection.nats_url, "tidegate-driver")
        js = self.nc.jetstream()
        self.buckets: Buckets = await ensure_all(js, s.limits, notifier=True)
        await self.store.open(wait=False)
        if s.driver.metrics_port is not None:
            _, self.metrics_port = serve(self.metrics.registry, s.driver.metrics_port)
        self.publisher = Publisher(self.nc)
        # The per-event baseline is the classic engine's one transaction per state change,
        # uncapped by design (what the benchmark compares against).
        projector_lane = self.pace.lane(PROJECTOR) if s.driver.persist == "batch" else None
        self.projector = Projector(js, self.store.paced(projector_lane), s.driver, self.metrics)
        self.clients: KvMirror[ClientRecord] = KvMirror(
            self.buckets.clients, decode_client, name="clients"
        )
        self.secrets: KvMirror[ClientSecrets] = KvMirror(
            self.buckets.client_secrets, decode_secrets, name="client-secrets"
        )
        self.executors: KvMirror[Heartbeat] = KvMirror(
            self.buckets.executors,
            decode_heartbeat,
            name="executors",
            on_change=self._on_heartbeat,
            on_undecodable=self._poison_heartbeat,
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
            s.connection.database_url,
            min_size=0,
            max_size=16,
            name="tidegate-callbacks",
            pace=self.pace.lane(CALLBACKS),
        )
        await self.callback_store.open(wait=False)
        policy = RetryPolicy(
            base_s=d.retry_base_s,
            factor=d.retry_factor,
            cap_s=d.retry_cap_s,
            max_attempts=d.retry_max_attempts,
            max_age_s=d.retry_max_age_s,
        )
        self.outbox = Outbox(self.callback_store, policy)
        # The retry job's long transactions in a lane of their own (mesh/store/pace.py).
        self.retry_outbox = Outbox(self.callback_store.paced(self.pace.lane(RETRY)), policy)
        self.transports = Transports(
            self.nc,
            timeout_s=d.callback_timeout_s,
            allowed_nets=parse_nets(d.callback_allow_nets),
            secrets=self.secrets.get,
        )
        self.notifier = Notifier(
            js,
            self.store.paced(self.pace.lane(SENSITIVE)),  # its only writes: sensitive rows
            self.outbox,
            self.transports,
            self.clients.get,
            self.leases,
            self.metrics,
            fence=self.buckets.notify_fence,
            partitions=s.limits.notify_partitions,
            callback_concurrency=d.callback_concurrency,
            ack_wait_s=s.limits.notify_ack_wait_s,
        )
        sup = self.supervisor
        # The database may be down at start: routing must not wait for it, only projection.
        sup.start("database-setup", self._database_setup)
        sup.start("clients", self.clients.run)
        sup.start("client-secrets", self.secrets.run)
        sup.start("executors", self.executors.run)
        await self.clients.ready.wait()  # never reject a known client as unknown at start
        sup.start("route", router.run)
        sup.start("dispatch", dispatcher.run)
        self.reconciler = Reconciler(
            js,
            self.publisher,
            self.leases,
            lambda: list(self.executors.values.values()),
            self.clients.get,
            s.driver,
            s.limits,
            self.metrics,
            self.store,
        )
        sup.start("reconcile", self.reconciler.run)
        sup.start("project", self.projector.run)
        gauges = Gauges(js, lambda: list(self.executors.values.values()), self.metrics)
        sup.start("alert-gauges", gauges.run)
        sup.start("notify", self.notifier.run)
        # Client systems' reads and cancels (tg.api.<client>.…): a small pool of their own,
        # unpaced (reads are not the commits the cap protects), so no burst of them takes
        # the projector's connections.
        self.api_store = Store(
            s.connection.database_url, min_size=0, max_size=4, name="tidegate-client-api"
        )
        await self.api_store.open(wait=False)
        api = ClientApi(
            self.nc, self.api_store, self.buckets.cancel, self.clients.get, self.metrics
        )
        sup.start("client-api", api.run)
        self.poison = PoisonWatch(self.nc, js, count_dead_letter(self.metrics))
        sup.start("poison", self.poison.run)
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
        """Stop within a few seconds whatever the backlog: the loops are cancelled, and every
        message this driver holds goes back to JetStream at once (nak), for another driver
        (or this one's successor) to take now rather than after its ack wait."""
        started = asyncio.get_running_loop().time()
        self.scheduler.shutdown(wait=False)
        keep_late_deliveries(self.nc)
        await self.supervisor.stop(timeout=STOP_LOOPS_S)
        await self.publisher.close()
        handed = await hand_back(self.nc, timeout=STOP_STEP_S)
        for what, close in (
            ("callback transports", self.transports.close),
            ("callback database pool", self.callback_store.close),
            ("client API database pool", self.api_store.close),
            ("database pool", self.store.close),
        ):
            try:
                await asyncio.wait_for(close(), STOP_STEP_S)
            except Exception as exc:  # stopping anyway: say what was cut short
                log.warning("stopping: closing the %s failed or took too long (%r)", what, exc)
        # Not `drain`: it waits (30 s) for messages in queues nobody reads any more;
        # `hand_back` has flushed the acks and naks already.
        await self.nc.close()
        log.info(
            "driver stopped in %.1fs; %d messages handed back",
            asyncio.get_running_loop().time() - started,
            handed,
        )

    def _waited(self, writer: str, seconds: float) -> None:
        self.metrics.commit_turns.labels(writer=writer).inc()
        self.metrics.commit_wait.labels(writer=writer).inc(seconds)

    def _on_heartbeat(self, key: str, hb: Heartbeat | None) -> None:
        if hb is not None:
            self.projector.offer_heartbeat(hb)
        elif key in self._gauged:
            self.metrics.heartbeat_age.remove(key)
            self._gauged.discard(key)

    async def _poison_heartbeat(
        self, key: str, value: bytes, revision: int, exc: Exception
    ) -> None:
        """A heartbeat no driver can read is set aside once per revision (every driver sees
        it; the dead letters' dedup keeps one), at most once a minute per executor: a broken
        clock that writes one every interval must not flood the dead letters."""
        loop = asyncio.get_running_loop()
        last = self._poisoned_at.get(key)
        if last is not None and loop.time() - last < _HEARTBEAT_POISON_EVERY_S:
            return
        self._poisoned_at[key] = loop.time()
        await set_aside_raw(
            self.nc.jetstream(),
            subject=names.kv_subject(names.EXECUTORS_BUCKET, key),
            data=value,
            headers=None,
            stage="heartbeat",
            reason=f"undecodable heartbeat of {key}: {exc}",
            client=None,
            origin_id=f"{names.kv_stream(names.EXECUTORS_BUCKET)}:{revision}",
            stream_seq=revision,
            count=count_dead_letter(self.metrics),
        )

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
                await publish_client(self.buckets.registry, record)
            log.info("mirrored %d clients into the clients bucket", len(records))

        try:
            await until_done(
                once,
                what="database setup",
                backoff=SETUP_RETRY,
                give_up=lambda exc: misconfigured(exc) is not None,
            )
        except Exception as exc:
            advice = misconfigured(exc)
            if advice is None:
                raise
            # Loud and slower than a retry: the loop's restarts log it with the reason.
            raise ConfigError(f"database setup: {advice} ({exc})") from exc

    async def _retry_callbacks(self) -> None:
        try:
            stats = await retry_pass(
                self.retry_outbox,
                self.transports,
                self.clients.get,
                concurrency=self.settings.driver.callback_concurrency,
                fence=DeliveredFence(self.buckets.notify_fence, scope=OUTBOX_SCOPE),
            )
        except asyncio.CancelledError:
            # The driver is stopping (the scheduler cancels its running jobs): not an error
            # worth a traceback; the due callbacks stay in the outbox for the next pass.
            log.info("callback retry pass cut short: the driver is stopping")
            return
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
