"""Rates from the drivers' counter samples: pure functions, unit-tested without servers.

Each driver publishes cumulative counters (`DriverStats`); a rate is the difference between
consecutive samples of one driver, spread over the time between them and summed across
drivers. A restart resets a driver's counters: that is never a negative rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from tidegate.wire import DriverStats

Point = tuple[float, float]  # (unix time in seconds, value)
Counter = Literal[
    "accepted", "finished", "commits", "rows", "callbacks_delivered", "callbacks_outboxed"
]

CHART_SPAN_S = 3600.0
BUCKET_S = 20.0  # one chart point per this many seconds (180 over the hour)
ACTIVE_PERIODS = 3  # a driver silent for this many sampling periods no longer holds the edge


@dataclass(frozen=True)
class Increase:
    """A counter grew by `amount` somewhere in [start, end] (unix seconds)."""

    start: float
    end: float
    amount: float


def _ts(at: datetime) -> float:
    return at.timestamp()


def increases(samples: Iterable[DriverStats], counter: Counter) -> list[Increase]:
    """What each driver's counter added between consecutive samples.

    A drop, or a new `started_at`, is a restart: the counter restarted from zero, so the
    whole new value is the increase (since the restart), never a negative one. A driver's
    first sample after its start (seq 0) counts from its start; any other first sample in
    hand is only a baseline (what came before it is older than the history).
    """
    by_driver: dict[str, list[DriverStats]] = defaultdict(list)
    for s in samples:
        by_driver[s.driver].append(s)
    out: list[Increase] = []
    for series in by_driver.values():
        series.sort(key=lambda s: (s.at, s.seq))
        prev: DriverStats | None = None
        for s in series:
            value = float(getattr(s, counter))
            if prev is None:
                if s.seq == 0:
                    out.append(Increase(_ts(s.started_at), _ts(s.at), value))
            else:
                before = float(getattr(prev, counter))
                if s.started_at != prev.started_at or value < before:
                    start = max(_ts(prev.at), _ts(s.started_at))
                    out.append(Increase(start, _ts(s.at), value))
                else:
                    out.append(Increase(_ts(prev.at), _ts(s.at), value - before))
            prev = s
    return out


def spread(incs: Iterable[Increase], *, first: float, bucket_s: float, n: int) -> list[float]:
    """The increases summed into n buckets of `bucket_s` from `first`; each increase is
    spread evenly over its interval, so a gap between samples is averaged, not a spike."""
    totals = [0.0] * n
    end = first + n * bucket_s
    for inc in incs:
        if inc.amount == 0:
            continue
        if inc.end <= inc.start:  # no duration: it all happened at that instant
            i = math.floor((inc.end - first) / bucket_s)
            if 0 <= i < n:
                totals[i] += inc.amount
            continue
        lo, hi = max(inc.start, first), min(inc.end, end)
        if hi <= lo:
            continue
        per_s = inc.amount / (inc.end - inc.start)
        for i in range(math.floor((lo - first) / bucket_s), math.ceil((hi - first) / bucket_s)):
            b0 = first + i * bucket_s
            overlap = min(hi, b0 + bucket_s) - max(lo, b0)
            if overlap > 0 and 0 <= i < n:
                totals[i] += per_s * overlap
    return totals


def horizon(samples: Iterable[DriverStats]) -> float | None:
    """Up to when every active driver has reported: the oldest of the active drivers' latest
    samples. A chart that ran up to the newest sample would dip at its right edge while the
    other drivers' samples for that moment are still to come."""
    latest = latest_per_driver(samples)
    if not latest:
        return None
    newest = max(_ts(s.at) for s in latest.values())
    active = [
        _ts(s.at) for s in latest.values() if _ts(s.at) >= newest - ACTIVE_PERIODS * s.every_s
    ]
    return min(active)


def rate_series(
    samples: Sequence[DriverStats],
    counter: Counter,
    *,
    end: float,
    span_s: float = CHART_SPAN_S,
    bucket_s: float = BUCKET_S,
) -> list[Point]:
    """Rate per second in buckets aligned to `bucket_s` (the same buckets on every poll),
    summed across drivers, complete buckets up to `end`, from the first one with data."""
    incs = increases(samples, counter)
    if not incs:
        return []
    first = math.floor((end - span_s) / bucket_s) * bucket_s
    n = max(math.floor((end - first) / bucket_s), 0)
    totals = spread(incs, first=first, bucket_s=bucket_s, n=n)
    earliest = min(i.start for i in incs)
    return [
        (first + (i + 1) * bucket_s, total / bucket_s)
        for i, total in enumerate(totals)
        if first + (i + 1) * bucket_s > earliest
    ]


def rate_over(
    samples: Sequence[DriverStats], counter: Counter, *, end: float, window_s: float
) -> float | None:
    """The average rate over the last `window_s` before `end` (shorter if the history is)."""
    incs = increases(samples, counter)
    if not incs:
        return None
    start = max(end - window_s, min(i.start for i in incs))
    if end <= start:
        return None
    total = sum(spread(incs, first=start, bucket_s=end - start, n=1))
    return total / (end - start)


def latest_per_driver(samples: Iterable[DriverStats]) -> dict[str, DriverStats]:
    latest: dict[str, DriverStats] = {}
    for s in samples:
        if s.driver not in latest or s.at > latest[s.driver].at:
            latest[s.driver] = s
    return latest


def current_drivers(samples: Iterable[DriverStats], now: float) -> int:
    """Drivers that sampled within their last few periods: the ones alive and reporting."""
    return sum(
        1
        for s in latest_per_driver(samples).values()
        if _ts(s.at) >= now - ACTIVE_PERIODS * s.every_s
    )
