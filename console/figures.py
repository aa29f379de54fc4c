"""The overview's figures: backlog per stage, running tasks, callbacks and rates.

Everything comes from JetStream (per-subject totals of the queue streams, the work
consumers, the executors' heartbeats, the drivers' counter samples) and from the two small
callback tables, never from counting the tasks table: the page must stay cheap at midnight.

The pure functions (subject totals, heartbeats and samples in, figures out) are unit-tested;
`collect` reads the servers, each read bounded in time, and writes down what it could not
read instead of raising, so the page renders whatever is down.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from tidegate import names
from tidegate.bus.clients import decode_client
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


# --- pure: backlog ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClientFigures:
    """One client's tasks per stage; None where that stage could not be read."""

    client: str
    submitted: int | None  # accepted (PubAck), not routed yet: TG_TASKS
    ready: int | None  # routed, waiting for the client's turn, cap, rate or resume: TG_READY
    work: int | None  # in a pool's work queue, the running ones included: TG_WORK
    running: int | None  # in the executors' heartbeats
    paused: bool = False


@dataclass(frozen=True, kw_only=True)
class WorkFigures:
    pool: str
    task_class: str
    stored: int  # messages in TG_WORK for this pool and class
    delivered: int | None  # handed to an executor, not acked yet (None: consumers unknown)

    @property
    def waiting(self) -> int:
        return max(self.stored - (self.delivered or 0), 0)


@dataclass(frozen=True, kw_only=True)
class PoolFigures:
    pool: str
    executors: int
    slots: int
    running: int
    draining: int


def _add(into: dict[str, int], key: str, n: int) -> None:
    into[key] = into.get(key, 0) + n


def submitted_by_client(subjects: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for subject, n in subjects.items():
        _add(out, names.client_of_submit_subject(subject), n)
    return out


def ready_by_client(subjects: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for subject, n in subjects.items():
        parsed = names.parse_ready_subject(subject)
        if parsed is not None:
            _add(out, parsed[0], n)
    return out


def work_by_client(subjects: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for subject, n in subjects.items():
        parsed = names.parse_work_subject(subject)
        if parsed is not None:
            _add(out, parsed[2], n)
    return out


def running_by_client(heartbeats: Iterable[Heartbeat]) -> dict[str, int]:
    out: dict[str, int] = {}
    for hb in heartbeats:
        for task in hb.running:
            _add(out, task.client, 1)
    return out


def client_figures(
    *,
    submitted: Mapping[str, int] | None,
    ready: Mapping[str, int] | None,
    work: Mapping[str, int] | None,
    running: Mapping[str, int] | None,
    paused: Iterable[str] = (),
) -> list[ClientFigures]:
    """Clients with anything in some stage (per-client totals in), sorted by name."""
    stages = [s for s in (submitted, ready, work, running) if s is not None]
    clients = sorted({c for stage in stages for c, n in stage.items() if n})
    stopped = set(paused)

    def of(stage: Mapping[str, int] | None, client: str) -> int | None:
        return None if stage is None else stage.get(client, 0)

    return [
        ClientFigures(
            client=c,
            submitted=of(submitted, c),
            ready=of(ready, c),
            work=of(work, c),
            running=of(running, c),
            paused=c in stopped,
        )
        for c in clients
    ]


@dataclass(frozen=True, kw_only=True)
class StageTotals:
    """All clients' tasks per stage; None: that stage could not be read (not "none")."""

    submitted: int | None
    ready: int | None
    work: int | None
    running: int | None


def stage_totals(
    *,
    submitted: Mapping[str, int] | None,
    ready: Mapping[str, int] | None,
    work: Mapping[str, int] | None,
    running: Mapping[str, int] | None,
) -> StageTotals:
    def total(stage: Mapping[str, int] | None) -> int | None:
        return None if stage is None else sum(stage.values())

    return StageTotals(
        submitted=total(submitted), ready=total(ready), work=total(work), running=total(running)
    )


def work_figures(
    subjects: Mapping[str, int], consumers: Sequence[ConsumerInfo] | None
) -> list[WorkFigures]:
    """Per pool and class: stored in TG_WORK, of which delivered (from the work consumers)."""
    stored: dict[tuple[str, str], int] = {}
    for subject, n in subjects.items():
        parsed = names.parse_work_subject(subject)
        if parsed is not None:
            key = (parsed[0], parsed[1])
            stored[key] = stored.get(key, 0) + n
    delivered: dict[tuple[str, str], int] = {}
    for info in consumers or ():
        parsed = names.parse_work_subject(info.config.filter_subject or "")
        if parsed is not None:
            delivered[(parsed[0], parsed[1])] = info.num_ack_pending or 0
    return [
        WorkFigures(
            pool=pool,
            task_class=cls,
            stored=n,
            # No consumer for a pool and class: no executor of it ever pulled, none delivered.
            delivered=delivered.get((pool, cls), 0) if consumers is not None else None,
        )
        for (pool, cls), n in sorted(stored.items())
        if n
    ]


def pool_figures(heartbeats: Iterable[Heartbeat]) -> list[PoolFigures]:
    pools: dict[str, list[Heartbeat]] = defaultdict(list)
    for hb in heartbeats:
        for pool in hb.pools:
            pools[pool].append(hb)
    return [
        PoolFigures(
            pool=pool,
            executors=len(hbs),
            slots=sum(hb.slots for hb in hbs),
            running=sum(1 for hb in hbs for t in hb.running if t.pool == pool),
            draining=sum(hb.draining for hb in hbs),
        )
        for pool, hbs in sorted(pools.items())
    ]


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
