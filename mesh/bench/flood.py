"""One mode's flood against a started stack: register the clients, start the driver and
executors, publish every task at once, wait until all are terminal, then read the figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import psycopg
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from tidegate import names
from tidegate.bench.measure import CommitMeter, Poller, peak_rate, table_stats
from tidegate.bench.model import COMMAND, POOL, BenchError, FloodConfig, ModeResult
from tidegate.bench.stack import Stack
from tidegate.bus.clients import publish_client
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import PersistMode, Settings
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, TaskSpec

log = logging.getLogger("tidegate.bench")

TASK_TIMEOUT_S: Final = 60.0  # inside the default short-class bound: one work consumer is fed
POLL_S: Final = 0.25
READY_TIMEOUT_S: Final = 90.0
IDLE_TIMEOUT_S: Final = 15.0
PROGRESS_S: Final = 5.0


def client_names(count: int) -> list[str]:
    return [f"bench{i:03d}" for i in range(count)]


def flood_specs(tasks: int, clients: int) -> list[list[TaskSpec]]:
    """Tasks dealt round-robin over the clients, so every client floods at once."""
    per_client: list[list[TaskSpec]] = [[] for _ in range(clients)]
    for i in range(tasks):
        per_client[i % clients].append(
            TaskSpec(key=f"flood-{i:07d}", argv=list(COMMAND), timeout_s=TASK_TIMEOUT_S)
        )
    return per_client


async def flood_stack(
    stack: Stack, cfg: FloodConfig, mode: PersistMode, result: ModeResult
) -> None:
    """Run the flood for `mode` on `stack`'s servers, filling in `result` as it goes."""
    settings = Settings.from_env(stack.env())
    nc = await connect(stack.nats_url, "tidegate-bench")
    try:
        js = nc.jetstream()
        await _register(stack, js, settings, cfg.clients)
        async with await psycopg.AsyncConnection.connect(stack.admin_url, autocommit=True) as mc:
            meter = CommitMeter(mc)
            baseline = await meter.settled()
            stack.spawn("driver", "driver", "--persist", mode)
            for i in range(cfg.executors):
                stack.spawn(
                    f"executor{i}",
                    "executor",
                    "--pool",
                    POOL,
                    "--slots",
                    str(cfg.slots),
                    "--executor-id",
                    f"bench-exec-{i}",
                )
            await _wait_ready(stack, js, cfg.executors)
            log.info("%s: driver and %d executors ready; flooding", mode, cfg.executors)
            await _run_flood(stack, js, cfg, mode, meter, result)
            stack.stop_children()
            stack.check_stopped()
            result.commits = await meter.settled() - baseline - result.poller_commits
        await table_stats(stack.database_url, result)
    finally:
        await nc.close()


async def _register(stack: Stack, js: JetStreamContext, settings: Settings, n: int) -> None:
    buckets = await ensure_all(js, settings.limits)
    await migrate(stack.database_url)
    async with Store(stack.database_url, max_size=1, name="tidegate-bench") as store:
        for name in client_names(n):
            await store.add_client(ClientRecord(name=name))
            stored = await store.get_client(name)
            assert stored is not None
            await publish_client(buckets.clients, stored)


async def _wait_ready(stack: Stack, js: JetStreamContext, executors: int) -> None:
    """Until the driver pulls submissions and events and every executor pulls work."""
    kv = await js.key_value(names.EXECUTORS_BUCKET)
    deadline = time.monotonic() + READY_TIMEOUT_S

    async def waiting(stream: str, consumer: str) -> int:
        try:
            info = await js.consumer_info(stream, consumer)
        except NotFoundError:
            return 0  # executors create their work consumers when they start
        return info.num_waiting or 0

    while True:
        stack.check_children()
        try:
            beating = len(await kv.keys())
        except NoKeysError:
            beating = 0
        if (
            beating >= executors
            and await waiting(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
            and await waiting(names.WORK_STREAM, names.work_consumer(POOL, "short"))
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"driver and executors not ready after {READY_TIMEOUT_S:.0f}s "
                f"({beating}/{executors} executors beating); see {stack.root / 'logs'}"
            )
        await asyncio.sleep(0.1)


async def _wait_projected(js: JetStreamContext) -> None:
    """Let the projector finish what is in flight, so its commits belong to this run."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.2)
    log.warning("the projector still had events after %.0fs; stopping anyway", IDLE_TIMEOUT_S)


async def _wait_terminal(
    stack: Stack, poller: Poller, want: int, started: float, timeout: float, mode: str
) -> float | None:
    """Seconds from `started` until `want` tasks are terminal; None at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = started + timeout
    next_note = loop.time() + PROGRESS_S
    while True:
        done = await poller.terminal()
        if done >= want:
            return round(loop.time() - started, 3)
        stack.check_children()
        if loop.time() > deadline:
            log.warning(
                "%s: deadline: %d of %d tasks terminal after %.0fs", mode, done, want, timeout
            )
            return None
        if loop.time() >= next_note:
            log.info("%s: %d/%d tasks terminal", mode, done, want)
            next_note += PROGRESS_S
        await asyncio.sleep(POLL_S)


async def _run_flood(
    stack: Stack,
    js: JetStreamContext,
    cfg: FloodConfig,
    mode: str,
    meter: CommitMeter,
    result: ModeResult,
) -> None:
    loop = asyncio.get_running_loop()
    specs = flood_specs(cfg.tasks, cfg.clients)
    clients = [await TidegateClient.connect(stack.nats_url, n) for n in client_names(cfg.clients)]
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(meter.sample(samples))
    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as pc:
            poller = Poller(pc)
            try:
                started = loop.time()
                batches = await asyncio.wait_for(
                    asyncio.gather(
                        *(c.submit_many(s) for c, s in zip(clients, specs, strict=True))
                    ),
                    timeout=60 + cfg.tasks / 1000,
                )
                result.submit_s = round(loop.time() - started, 3)
                receipts = [r for batch in batches for r in batch]
                result.submitted = len(receipts)
                result.duplicates = sum(r.duplicate for r in receipts)
                result.submit_per_s = round(result.submitted / result.submit_s, 1)
                log.info("%s: %d PubAcks in %.2fs", mode, result.submitted, result.submit_s)
                result.terminal_s = await _wait_terminal(
                    stack, poller, cfg.tasks, started, cfg.timeout_s, mode
                )
                if result.terminal_s is not None:
                    result.tasks_per_s = round(cfg.tasks / result.terminal_s, 1)
                    await _wait_projected(js)
            finally:
                result.poller_commits = poller.statements
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    result.peak_commits_per_s = round(peak_rate(samples), 1)
