"""Pure arithmetic of the flood's figures: spreads (p50/p95/p99), ratios to the raw ceilings,
rates over time, and how far the database lagged behind the callbacks. Unit-tested.

Percentiles are nearest-rank (`timing.percentile`): every figure is a value that was measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import msgspec

from tidegate.bench.timing import percentile


class Spread(msgspec.Struct, frozen=True, kw_only=True):
    """A distribution in milliseconds (or seconds, as the field using it says)."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float


def spread(values: Sequence[float], digits: int = 1) -> Spread | None:
    """p50/p95/p99/max of `values`; None when there are none."""
    if not values:
        return None
    return Spread(
        n=len(values),
        p50=round(percentile(values, 50), digits),
        p95=round(percentile(values, 95), digits),
        p99=round(percentile(values, 99), digits),
        max=round(max(values), digits),
    )


def ratio(value: float | None, ceiling: float | None, digits: int = 2) -> float | None:
    """`value / ceiling` (e.g. seconds to all terminal over the raw spawn time); None when
    either is missing or the ceiling is zero."""
    if value is None or not ceiling:
        return None
    return round(value / ceiling, digits)


def per_second(count: int, seconds: float | None, digits: int = 1) -> float | None:
    if not seconds or seconds <= 0:
        return None
    return round(count / seconds, digits)


def rates(samples: Sequence[tuple[float, int]]) -> list[tuple[float, float]]:
    """A counter's rate between consecutive samples, at each interval's end: (t, per second).

    Samples with no time between them (or a counter that went back) are skipped.
    """
    out: list[tuple[float, float]] = []
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t1 > t0 and c1 >= c0:
            out.append((t1, (c1 - c0) / (t1 - t0)))
    return out


def lags(first: Mapping[str, float], later: Mapping[str, float]) -> list[float]:
    """For every key in both: `later[key] - first[key]` (negative: `later` came first)."""
    return [later[k] - first[k] for k in first.keys() & later.keys()]


def share_count(share: float, total: int) -> int:
    """How many of `total` make up `share` (0 … 1), rounded, at least one when share > 0."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be within 0 … 1, not {share}")
    if share == 0.0 or total == 0:
        return 0
    return min(total, max(1, round(share * total)))
