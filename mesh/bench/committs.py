"""Exact commit times of a run's write transactions, from PostgreSQL's commit timestamps.

The commit counter in `pg_stat_database` is published by each backend at most once a second
(measure.py), so a one-second window over its samples can hold up to two seconds of one
backend's commits: it cannot show that the commit cap held at every instant. With
`track_commit_timestamp` on (the benchmark's private PostgreSQL starts with it), the server
records when each transaction that wrote anything committed, by transaction id. The ids a
run assigned are the range between two reads of the next id to assign, so after the run every
write commit is known with its exact time, and the busiest second is counted exactly.

What it counts: every transaction of the cluster that wrote and committed during the run,
PostgreSQL's own autovacuum and autoanalyze apart. Those log their transaction id (the server
runs with `log_autovacuum_min_duration=0` and the id in each line's prefix), so they are
counted on their own (`autovacuum_xids`) and left out of the driver's figures. Read-only
transactions have no id and are not counted (the cap counts them too, so the cap's own figure
is at least this one). Rolled-back transactions have no commit time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import psycopg
from psycopg.rows import TupleRow

# Given to the benchmark's PostgreSQL at start (commit timestamps need a restart to change).
# No spaces or shell characters: pg_ctl hands these to a shell, joined by spaces.
PG_OPTIONS: Final = (
    "-c track_commit_timestamp=on",
    "-c log_autovacuum_min_duration=0",
    "-c log_line_prefix=%m@xid=%x@",
)
_AUTOVACUUM = re.compile(r"@xid=(\d+)@LOG:\s+automatic (?:aggressive )?(?:analyze|vacuum)")

XID_SPACE: Final = 2**32  # commit timestamps are kept by the 32-bit xid

Conn = psycopg.AsyncConnection[TupleRow]


async def next_xid(conn: Conn) -> int:
    """The next transaction id the cluster will assign; reading it assigns none."""
    cur = await conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def commit_times(conn: Conn, first: int, end: int) -> list[tuple[int, float]]:
    """(transaction id, commit time in epoch seconds) of each transaction with an id in
    [first, end) that committed, by time; ids that rolled back or never committed are left
    out."""
    cur = await conn.execute(
        "SELECT x, extract(epoch FROM ts)::float8 FROM ("
        "  SELECT x, pg_xact_commit_timestamp(((x %% %(space)s)::text)::xid) AS ts"
        "  FROM generate_series(%(first)s::bigint, %(end)s::bigint - 1) AS x"
        ") AS t WHERE ts IS NOT NULL ORDER BY ts",
        {"first": first, "end": end, "space": XID_SPACE},
    )
    return [(int(r[0]), float(r[1])) for r in await cur.fetchall()]


def autovacuum_xids(server_log: str) -> set[int]:
    """The transaction ids of autovacuum's and autoanalyze's runs in the server's log (32-bit;
    0, a run that wrote nothing transactional, is left out)."""
    return {int(m[1]) for m in _AUTOVACUUM.finditer(server_log)} - {0}


def busiest_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most of `times` (sorted) inside any half-open window [t, t + window_s)."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best
