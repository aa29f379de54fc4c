"""One mode's flood against a started stack: register the clients, start the driver and
executors, publish every task at once, wait until all are terminal, then read the figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Final, TextIO

import psycopg
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from tidegate import names
from tidegate.bench import kinds
from tidegate.bench.committs import (
    XID_SPACE,
    autovacuum_xids,
    busiest_window,
    commit_times,
    next_xid,
)
from tidegate.bench.figures import lags, per_second, share_count, spread
from tidegate.bench.measure import CommitMeter, Poller, peak_rate, table_stats
from tidegate.bench.model import CALLED_BACK, COMMAND, POOL, BenchError, FloodConfig, ModeResult
from tidegate.bench.sink import CallbackSink
from tidegate.bench.stack import Stack
from tidegate.bench.timeline import Timeline, all_routed_at, route_waits
from tidegate.bench.usage import UsageMeter
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
CALLBACK_GRACE_S: Final = 30.0  # after the tasks' deadline, for the last callbacks
STOP_S: Final = 5.0
# Non-sensitive tasks: when the terminal row was written, to compare with its callback.
WRITTEN_SQL: Final = (
    "SELECT task_id, extract(epoch FROM updated_at)::float8 FROM tasks"
    " WHERE client = ANY(%s) AND state_rank = 3"
)


def client_names(count: int) -> list[str]:
    return [f"bench{i:03d}" for i in range(count)]


def driver_names(count: int) -> list[str]:
    """`driver` alone (as the report has always named it), else `driver0` … (summed in it)."""
    return ["driver"] if count == 1 else [f"driver{i}" for i in range(count)]


def sensitive_names(cfg: FloodConfig) -> frozenset[str]:
    """The first share of the clients are sensitive."""
    return frozenset(client_names(cfg.clients)[: share_count(cfg.sensitive_share, cfg.clients)])


def expected_callbacks(cfg: FloodConfig) -> tuple[int, int]:
    """(tasks of sensitive clients, callbacks the sink should receive in all)."""
    sensitive = sensitive_names(cfg)
    names_ = client_names(cfg.clients)
    per_client = flood_specs(cfg.tasks, cfg.clients)
    s_tasks = sum(len(s) for name, s in zip(names_, per_client, strict=True) if name in sensitive)
    n_tasks = cfg.tasks - s_tasks
    return s_tasks, s_tasks * len(CALLED_BACK[True]) + n_tasks * len(CALLED_BACK[False])


def flood_specs(tasks: int, clients: int) -> list[list[TaskSpec]]:
    """Tasks dealt round-robin over the clients, so every client floods at once."""
    per_client: list[list[TaskSpec]] = [[] for _ in range(clients)]
    for i in range(tasks):
        per_client[i % clients].append(
            TaskSpec(key=f"flood-{i:07d}", argv=list(COMMAND), timeout_s=TASK_TIMEOUT_S)
        )
    return per_client


async def flood_stack(
    stack: Stack,
    cfg: FloodConfig,
    mode: PersistMode,
    result: ModeResult,
    progress: TextIO | None = None,
) -> None:
    """Run the flood for `mode` on `stack`'s servers, filling in `result` as it goes."""
    settings = Settings.from_env(stack.env())
    sensitive = sensitive_names(cfg)
    nc = await connect(stack.nats_url, "tidegate-bench")
    try:
        async with CallbackSink(cfg.callback_latency_ms, sensitive) as sink:
            await _flood_with_sink(
                stack, nc.jetstream(), settings, cfg, mode, result, sink, progress
            )
    finally:
        await nc.close()


async def _flood_with_sink(
    stack: Stack,
    js: JetStreamContext,
    settings: Settings,
    cfg: FloodConfig,
    mode: PersistMode,
    result: ModeResult,
    sink: CallbackSink,
    progress: TextIO | None,
) -> None:
    result.sensitive_clients = len(sink.sensitive)
    result.sensitive_tasks, result.callbacks_expected = expected_callbacks(cfg)
    await _register(stack, js, settings, cfg.clients, sink)
    await kinds.install(stack.database_url)
    async with await psycopg.AsyncConnection.connect(stack.admin_url, autocommit=True) as mc:
        meter = CommitMeter(mc)
        baseline = await meter.settled()
        first_xid = await next_xid(mc)
        for name in driver_names(cfg.drivers):
            stack.spawn(name, "driver", "--persist", mode)
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
        usage = _usage_meter(stack)
        try:
            await _run_flood(stack, js, cfg, mode, meter, result, sink, usage, progress)
        finally:
            result.usage = usage.figures()
        stack.stop_children()
        stack.check_stopped()
        result.commits = await meter.settled() - baseline - result.poller_commits
        written = await commit_times(mc, first_xid, await next_xid(mc))
    autovacuum = autovacuum_xids(stack.pg.log_path.read_text(errors="replace"))
    ours = [t for xid, t in written if xid % XID_SPACE not in autovacuum]
    result.write_commits = len(ours)
    result.autovacuum_commits = len(written) - len(ours)
    result.peak_write_commits_1s = busiest_window(ours)
    result.commit_cap_per_s = settings.driver.projector_max_commits_per_s * cfg.drivers
    await table_stats(stack.database_url, result)
    result.writes_by_kind = await kinds.writes_by_kind(
        stack.database_url,
        sink.sensitive,
        {
            kinds.SENSITIVE: result.sensitive_tasks,
            kinds.NON_SENSITIVE: cfg.tasks - result.sensitive_tasks,
        },
    )
    await _callback_figures(stack, cfg, sink, result)


def _usage_meter(stack: Stack) -> UsageMeter:
    usage = UsageMeter(COMMAND[0])
    for child in stack.children:
        usage.add(child.name, child.proc.pid, runs_tasks=child.name.startswith("executor"))
    usage.add("nats-server", stack.nats.proc.pid if stack.nats.proc else None)
    usage.add("postgres", stack.postmaster_pid())
    usage.add("bench", os.getpid(), alone=True)
    return usage


async def _callback_figures(
    stack: Stack, cfg: FloodConfig, sink: CallbackSink, result: ModeResult
) -> None:
    result.callbacks_received = sink.received
    result.callback_duplicates = sink.duplicates
    result.callbacks_out_of_order = sink.out_of_order
    result.callbacks_by_state = dict(sink.states)
    result.callback_requests = sink.requests
    for sensitive, label in ((True, "sensitive"), (False, "non-sensitive")):
        s = spread(sink.latency_ms[sensitive])
        if s is not None:
            result.callback_latency_ms[label] = s
    relaxed = [c for c in client_names(cfg.clients) if c not in sink.sensitive]
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        cur = await conn.execute(WRITTEN_SQL, (relaxed,))
        written = {str(task): float(at) for task, at in await cur.fetchall()}
    lag_ms = [lag * 1000 for lag in lags(sink.terminal_at, written)]
    result.db_lag_ms = spread(lag_ms)


async def _register(
    stack: Stack, js: JetStreamContext, settings: Settings, n: int, sink: CallbackSink
) -> None:
    buckets = await ensure_all(js, settings.limits)
    await migrate(stack.database_url)
    async with Store(stack.database_url, max_size=1, name="tidegate-bench") as store:
        for name in client_names(n):
            record = ClientRecord(
                name=name, sensitive=name in sink.sensitive, callback_url=sink.url(name)
            )
            await store.add_client(record)
            stored = await store.get_client(name)
            assert stored is not None
            await publish_client(buckets.registry, stored)


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


class _Seen:
    """The poller's last count, for the timeline (which must not query the database itself)."""

    terminal = 0


async def _wait_terminal(
    stack: Stack,
    poller: Poller,
    seen: _Seen,
    want: int,
    started: float,
    timeout: float,
    mode: str,
    quiet: bool,
) -> float | None:
    """Seconds from `started` until `want` tasks are terminal; None at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = started + timeout
    next_note = loop.time() + PROGRESS_S
    while True:
        seen.terminal = done = await poller.terminal()
        if done >= want:
            return round(loop.time() - started, 3)
        stack.check_children()
        if loop.time() > deadline:
            log.warning(
                "%s: deadline: %d of %d tasks terminal after %.0fs", mode, done, want, timeout
            )
            return None
        if loop.time() >= next_note:
            if not quiet:  # the progress line says it already
                log.info("%s: %d/%d tasks terminal", mode, done, want)
            next_note += PROGRESS_S
        await asyncio.sleep(POLL_S)


async def _wait_callbacks(
    sink: CallbackSink, want: int, started: float, deadline: float, mode: str
) -> float | None:
    """Seconds from `started` until the last of `want` distinct callbacks; None at the
    deadline. Duplicates do not count: the figure is when every callback had arrived."""
    loop = asyncio.get_running_loop()
    log.info("%s: all terminal; waiting for %d callbacks (%d so far)", mode, want, len(sink.ids))
    while len(sink.ids) < want:
        if loop.time() > deadline:
            log.warning("%s: deadline: %d of %d callbacks received", mode, len(sink.ids), want)
            return None
        await asyncio.sleep(POLL_S)
    return round(max(sink.arrivals, default=started) - started, 3)


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the samplers; wait a little, never forever (a task that swallowed its
    cancellation in a client library must not keep the run from ending)."""
    for task in tasks:
        task.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=STOP_S)
    for task in stuck:
        log.warning("a sampler did not stop within %.0fs: %s", STOP_S, task.get_coro())


async def _run_flood(
    stack: Stack,
    js: JetStreamContext,
    cfg: FloodConfig,
    mode: str,
    meter: CommitMeter,
    result: ModeResult,
    sink: CallbackSink,
    usage: UsageMeter,
    progress: TextIO | None,
) -> None:
    loop = asyncio.get_running_loop()
    specs = flood_specs(cfg.tasks, cfg.clients)
    clients = [await TidegateClient.connect(stack.nats_url, n) for n in client_names(cfg.clients)]
    samples: list[tuple[float, int]] = []
    seen = _Seen()
    timeline = Timeline(
        js,
        mode,
        cfg.tasks,
        result.callbacks_expected,
        lambda: seen.terminal,
        lambda: sink.received,
        progress,
    )
    await timeline.start()
    sampler = asyncio.create_task(meter.sample(samples))
    background = [sampler, asyncio.create_task(usage.sample())]
    started = loop.time()
    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as pc:
            poller = Poller(pc)
            try:
                started = loop.time()
                background.append(asyncio.create_task(timeline.run()))
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
                if progress is None:
                    log.info("%s: %d PubAcks in %.2fs", mode, result.submitted, result.submit_s)
                result.terminal_s = await _wait_terminal(
                    stack,
                    poller,
                    seen,
                    cfg.tasks,
                    started,
                    cfg.timeout_s,
                    mode,
                    progress is not None,
                )
                if result.terminal_s is not None:
                    result.tasks_per_s = per_second(cfg.tasks, result.terminal_s)
                    result.callbacks_s = await _wait_callbacks(
                        sink,
                        result.callbacks_expected,
                        started,
                        started + cfg.timeout_s + CALLBACK_GRACE_S,
                        mode,
                    )
                    result.callbacks_per_s = per_second(
                        result.callbacks_expected, result.callbacks_s
                    )
                    await _wait_projected(js)
                    usage.sample_once()  # the last figures before the components stop
            finally:
                result.poller_commits = poller.statements
    finally:
        await _stop(background)
        timeline.finish()
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    result.peak_commits_per_s = round(peak_rate(samples), 1)
    result.commit_samples = [(round(t - started, 2), c) for t, c in samples]
    result.timeline = timeline.points
    result.routed_s = all_routed_at(timeline.points, cfg.tasks)
    result.route_wait_s = spread(route_waits(timeline.points, cfg.tasks))
