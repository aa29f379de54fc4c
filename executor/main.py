"""`tidegate executor`: one executor process, until SIGTERM/SIGINT or an operator's drain
(either way it drains, then exits 0). With `--workers` W > 1 this runs in each of W worker
processes, under the supervisor in workers.py."""

from __future__ import annotations

import asyncio
import logging

from tidegate.bus.clients import decode_client
from tidegate.bus.kvwatch import KvMirror
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Publisher
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.executor.agent import Executor
from tidegate.executor.control import ControlFollower
from tidegate.executor.logserver import LogServer
from tidegate.executor.spawn import use_pidfd_watcher
from tidegate.executor.taskenv import TaskLaunch, keep_environ_private
from tidegate.executor.tasklogs import make_private_root, prune_loop
from tidegate.executor.workers import worker_group
from tidegate.metrics import ExecutorMetrics, serve
from tidegate.supervise import Supervisor
from tidegate.wire import ClientRecord

log = logging.getLogger(__name__)


async def run_executor(settings: Settings, stop: asyncio.Event) -> None:
    conn, ex = settings.connection, settings.executor
    # Before anything else: a setting the executor cannot honour stops it here, not a task.
    launch = TaskLaunch.from_settings(settings)
    keep_environ_private()
    if ex.pidfd_watcher:
        use_pidfd_watcher(asyncio.get_running_loop())
    nc = await connect(conn.nats_url, f"tidegate-executor-{ex.pool}")
    js = nc.jetstream()
    buckets = await ensure_all(js, settings.limits)
    metrics = ExecutorMetrics()
    if ex.metrics_port is not None:
        serve(metrics.registry, ex.metrics_port)
    publisher = Publisher(nc)
    log_dir = conn.data_dir / "task-logs"
    make_private_root(log_dir)
    clients: KvMirror[ClientRecord] = KvMirror(buckets.clients, decode_client, name="clients")
    agent = Executor(
        js,
        publisher,
        buckets,
        ex,
        settings.limits,
        metrics,
        log_dir=log_dir,
        clients=clients.get,
        watch_cancels=True,
        launch=launch,
    )
    # A worker of `--workers` follows its siblings' control keys too: one drain drains all.
    control = ControlFollower(buckets.executor_control, agent, worker_group(agent.id))
    await control.load()
    sup = Supervisor(f"executor {agent.id}")
    sup.start("clients", clients.run)
    sup.start("control", control.run)
    sup.start("heartbeat", agent.heartbeat_loop)
    sup.start("prune-task-logs", lambda: prune_loop(log_dir, ex.task_log_retention_h))
    # Answers until the very end, drain included: a draining executor's tasks still run.
    logs = LogServer(nc, agent.id, log_dir, keep_hours=ex.task_log_retention_h)
    sup.start("task-log-server", logs.run)
    sup.start("cancels", agent.cancel_loop)
    sup.start("fetch-short", lambda: agent.fetch_loop("short"))
    sup.start("fetch-long", lambda: agent.fetch_loop("long"))
    log.info("executor %s serving pool %s with %d slots", agent.id, ex.pool, ex.slots)
    log.info("executor %s: %s", agent.id, launch.describe())
    await _first_of(stop, control.drain_requested)
    log.info("executor %s: stopping", agent.id)
    await agent.drain()
    if control.drain_requested.is_set():
        await control.mark_drained()
    await sup.stop()
    await agent.forget()
    await publisher.close()
    await nc.drain()


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
