"""A driver's cumulative counters, sampled on `tg.stats.<driver>`."""

from __future__ import annotations

from datetime import datetime

import msgspec
from msgspec import Struct


class DriverStats(Struct, frozen=True, kw_only=True):
    """One driver's cumulative counters since it started, published on `tg.stats.<driver>`.

    Counters, not rates: a lost or late sample costs resolution, never a count, and any
    reader can take differences over whatever span it likes. A driver that restarts starts
    from zero with a new `started_at`; readers treat a drop as a reset, never as negative.
    """

    driver: str
    started_at: datetime
    at: datetime
    seq: int  # samples stored before this one since start: 0 = counts begin at `started_at`
    every_s: float  # the sampling period, so a reader can tell a gap from the normal pace
    accepted: int  # submissions routed or rejected
    finished: int  # terminal events projected
    commits: int  # database commits of the projection (and of sensitive group commits)
    rows: int  # task rows those commits wrote
    callbacks_delivered: int  # at once or by an outbox retry
    callbacks_outboxed: int  # failed at once, written to the outbox


_driver_stats_decoder = msgspec.json.Decoder(DriverStats)


def decode_driver_stats(data: bytes) -> DriverStats:
    return _driver_stats_decoder.decode(data)
