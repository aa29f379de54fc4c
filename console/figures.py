"""The overview's figures: backlog per stage, running tasks, callbacks and rates.

Everything comes from JetStream (per-subject totals of the queue streams, the work
consumers, the executors' heartbeats, the drivers' counter samples) and from the two small
callback tables, never from counting the tasks table: the page must stay cheap at midnight.

The pure functions (subject totals, heartbeats and samples in, figures out; the backlog's are
in backlog.py) are unit-tested; `collect` reads the servers, each read bounded in time, and
writes down what it could not read instead of raising, so the page renders whatever is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from tidegate import names
from tidegate.bus.clients import decode_client
from tidegate.console.backlog import (
    ClientFigures,
    PoolFigures,
    StageTotals,
    WorkFigures,
    client_figures,
    pool_figures,
    ready_by_client,
    running_by_client,
    stage_totals,
    submitted_by_client,
    work_by_client,
    work_figures,
)
from tidegate.console.rates import (
    CHART_SPAN_S,
    Counter,
    Point,
    current_drivers,
    horizon,
    rate_over,
    rate_series,
)
from tidegate.console.sources import (
    READ_TIMEOUT_S,
    StatsHistory,
    bounded,
    kv_values,
    subject_totals,
)
from tidegate.store.queries import Q
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, DriverStats, Heartbeat, decode_heartbeat

T = TypeVar("T")

RATE_WINDOW_S = 30.0  # the "now" rates: averaged over the last this many seconds


# --- the snapshot ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CallbackFigures:
    pending: int  # in the outbox, waiting for a retry
    failing: int  # of those, retried and failed again
    dead: int  # exhausted their retries: callback dead letters


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Per second, summed over the drivers; None: no samples to tell."""

    accepted: float | None
    finished: float | None
    commits: float | None
    rows: float | None


@dataclass(frozen=True, kw_only=True)
class Chart:
    key: str
    title: str
    unit: str
    points: list[Point]


CHARTS: tuple[tuple[Counter, str], ...] = (
    ("accepted", "Accepted"),
    ("finished", "Finished"),
    ("commits", "Database commits"),
    ("callbacks_delivered", "Callbacks delivered"),
)


@dataclass(frozen=True, kw_only=True)
class Overview:
    at: datetime
    nats: bool  # some JetStream read answered
    database: bool  # the callback counts answered
    totals: StageTotals
    clients: list[ClientFigures]
    work: list[WorkFigures] | None
    pools: list[PoolFigures] | None
    callbacks: CallbackFigures | None
    rates: Rates
    charts: list[Chart]
    chart_start: float
    chart_end: float
    drivers: int  # drivers whose samples are current
    missing: list[str]  # what could not be read, and why


def rates_and_charts(samples: Sequence[DriverStats], now: float) -> tuple[Rates, list[Chart], int]:
    """Rates now, the charts' series and the number of drivers reporting, from the samples.

    Series end where every reporting driver has sampled (see `horizon`). With no driver
    reporting there is no rate to tell "now": None, not the last one seen.
    """
    end = horizon(samples) or now
    drivers = current_drivers(samples, now)

    def rate(counter: Counter) -> float | None:
        if not drivers:
            return None
        return rate_over(samples, counter, end=end, window_s=RATE_WINDOW_S)

    rates = Rates(
        accepted=rate("accepted"),
        finished=rate("finished"),
        commits=rate("commits"),
        rows=rate("rows"),
    )
    charts = [
        Chart(key=key, title=title, unit="/s", points=rate_series(samples, key, end=end))
        for key, title in CHARTS
    ]
    return rates, charts, drivers


# --- I/O: reading the servers, each read bounded -----------------------------------------------


async def callback_counts(store: Store) -> CallbackFigures:
    # One connection for the three: the console's pool is small and shared by every page.
    async with store.transaction(what="count callbacks") as session:
        pending = await session.fetch_one(Q.outbox_count_all)
        failing = await session.fetch_one(Q.outbox_count_failing)
        dead = await session.fetch_one(Q.dead_letters_count)
    return CallbackFigures(
        pending=int(pending["n"]) if pending else 0,
        failing=int(failing["n"]) if failing else 0,
        dead=int(dead["n"]) if dead else 0,
    )


@dataclass(frozen=True)
class _NatsReads:
    submitted: dict[str, int] | None = None
    ready: dict[str, int] | None = None
    work: dict[str, int] | None = None
    consumers: list[ConsumerInfo] | None = None
    heartbeats: dict[str, Heartbeat] | None = None
    clients: dict[str, ClientRecord] | None = None
    samples: list[DriverStats] | None = None


async def _read_nats(
    js: JetStreamContext, history: StatsHistory, now: float, missing: list[str], timeout: float
) -> _NatsReads:
    def b(read: Awaitable[T], what: str) -> Awaitable[T | None]:
        return bounded(read, what, missing, timeout)

    # Two gathers nested: the typed overloads of one stop at six awaitables.
    (submitted, ready, work), (consumers, heartbeats, clients, samples) = await asyncio.gather(
        asyncio.gather(
            b(subject_totals(js, names.TASKS_STREAM, names.SUBMIT_ALL), "submissions (TG_TASKS)"),
            b(subject_totals(js, names.READY_STREAM, names.READY_ALL), "ready queues (TG_READY)"),
            b(subject_totals(js, names.WORK_STREAM, names.WORK_ALL), "work queues (TG_WORK)"),
        ),
        asyncio.gather(
            b(js.consumers_info(names.WORK_STREAM), "work consumers"),
            b(kv_values(js, names.EXECUTORS_BUCKET, decode_heartbeat), "executor heartbeats"),
            b(kv_values(js, names.CLIENTS_BUCKET, decode_client), "clients (KV)"),
            b(history.refresh(js, now=now), "driver stats (TG_STATS)"),
        ),
    )
    return _NatsReads(submitted, ready, work, consumers, heartbeats, clients, samples)


async def collect(
    store: Store | None,
    js: JetStreamContext | None,
    history: StatsHistory,
    *,
    now: float | None = None,
    timeout: float = READ_TIMEOUT_S,
) -> Overview:
    """Every figure of the overview, read concurrently; what is down is listed in `missing`."""
    now = datetime.now(UTC).timestamp() if now is None else now
    missing: list[str] = []
    if js is None:
        missing.append("NATS: not connected; backlog, running tasks and rates are unknown")
    if store is None:
        missing.append("PostgreSQL: no store; callback counts are unknown")

    async def nats() -> _NatsReads:
        return _NatsReads() if js is None else await _read_nats(js, history, now, missing, timeout)

    async def database() -> CallbackFigures | None:
        if store is None:
            return None
        counts = callback_counts(store)
        return await bounded(counts, "PostgreSQL: callback counts", missing, timeout)

    n, callbacks = await asyncio.gather(nats(), database())
    beats = None if n.heartbeats is None else list(n.heartbeats.values())
    per_client = {
        "submitted": None if n.submitted is None else submitted_by_client(n.submitted),
        "ready": None if n.ready is None else ready_by_client(n.ready),
        "work": None if n.work is None else work_by_client(n.work),
        "running": None if beats is None else running_by_client(beats),
    }
    rates, charts, drivers = rates_and_charts(n.samples or [], now)
    if n.samples is not None and not drivers:
        missing.append(
            "driver stats: no driver has published its counters lately (none running, or "
            "older than this console); rates are unknown"
        )
    return Overview(
        at=datetime.fromtimestamp(now, UTC),
        nats=any(x is not None for x in (n.submitted, n.ready, n.work, n.heartbeats, n.samples)),
        database=callbacks is not None,
        totals=stage_totals(**per_client),
        clients=client_figures(
            **per_client, paused=[name for name, r in (n.clients or {}).items() if r.paused]
        ),
        work=None if n.work is None else work_figures(n.work, n.consumers),
        pools=None if beats is None else pool_figures(beats),
        callbacks=callbacks,
        rates=rates,
        charts=charts,
        chart_start=now - CHART_SPAN_S,
        chart_end=now,
        drivers=drivers,
        missing=missing,
    )
