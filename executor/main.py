"""`tidegate executor`: one executor process, until SIGTERM/SIGINT (then it drains)."""

from __future__ import annotations

import asyncio
import logging
import signal

from executor.agent import Executor
from executor.tasklogs import prune_loop
from mesh.clients import decode_client
from mesh.config import Settings
from mesh.kvwatch import KvMirror
from mesh.metrics import ExecutorMetrics, serve
from mesh.natsconn import connect
from mesh.publish import Publisher
from mesh.store.rows import ClientRecord
from mesh.supervise import Supervisor
from mesh.topology import ensure_all

log = logging.getLogger(__name__)


async def run_executor(settings: Settings, stop: asyncio.Event) -> None:
    conn, ex = settings.connection, settings.executor
    nc = await connect(conn.nats_url, f"tidegate-executor-{ex.pool}")
    js = nc.jetstream()
    buckets = await ensure_all(js, settings.limits)
    metrics = ExecutorMetrics()
    if ex.metrics_port is not None:
        serve(metrics.registry, ex.metrics_port)
    publisher = Publisher(nc)
    log_dir = conn.data_dir / "task-logs"
    clients: KvMirror[ClientRecord] = KvMirror(buckets.clients, decode_client, name="clients")
    agent = Executor(
        js, publisher, buckets, ex, settings.limits, metrics,
        log_dir=log_dir, clients=clients.get,
    )  # fmt: skip

    async def watch_cancels() -> None:
        watcher = await buckets.cancel.watchall()
        async for entry in watcher:
            if entry is not None and entry.value:
                agent.on_cancel(entry.key, entry.value)

    sup = Supervisor(f"executor {agent.id}")
    sup.start("clients", clients.run)
    sup.start("heartbeat", agent.heartbeat_loop)
    sup.start("prune-task-logs", lambda: prune_loop(log_dir, ex.task_log_retention_h))
    sup.start("cancels", watch_cancels)
    sup.start("fetch-short", lambda: agent.fetch_loop("short"))
    sup.start("fetch-long", lambda: agent.fetch_loop("long"))
    log.info("executor %s serving pool %s with %d slots", agent.id, ex.pool, ex.slots)
    await stop.wait()
    log.info("executor %s: stopping", agent.id)
    await agent.drain()
    await sup.stop()
    await agent.forget()
    await publisher.close()
    await nc.drain()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
