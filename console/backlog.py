"""The overview's backlog, pure: tasks per client and stage from the queue streams' subject
totals and the executors' heartbeats, the work queues per pool and class, and the pools."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nats.js.api import ConsumerInfo

from tidegate import names
from tidegate.wire import Heartbeat


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
