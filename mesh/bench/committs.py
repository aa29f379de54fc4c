"""Exact commit times of a run's write transactions, from PostgreSQL's commit timestamps.

The commit counter in `pg_stat_database` is published by each backend at most once a second
(measure.py), so a one-second window over its samples can hold up to two seconds of one
backend's commits: it cannot show that the commit cap held at every instant. With
`track_commit_timestamp` on (the benchmark's private PostgreSQL starts with it), the server
records when each transaction that wrote anything committed, by transaction id. The ids a
run assigned are the range between two reads of the next id to assign, so after the run every
write commit is known with its exact time, and the busiest second is counted exactly.

What it counts: every transaction of the cluster that wrote and committed during the run,
whoever made it. The driver's writers are all of them but PostgreSQL's own autovacuum and
autoanalyze, counted apart (`maintenance_runs`) so a reader can tell. Read-only
transactions have no id and are not counted (the cap counts them too, so the cap's own figure
is at least this one). Rolled-back transactions have no commit time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import psycopg
from psycopg.rows import TupleRow

# Given to the benchmark's PostgreSQL at start (it needs a restart to change).
PG_OPTIONS: Final = ("-c track_commit_timestamp=on",)

XID_SPACE: Final = 2**32  # commit timestamps are kept by the 32-bit xid

Conn = psycopg.AsyncConnection[TupleRow]


async def next_xid(conn: Conn) -> int:
    """The next transaction id the cluster will assign; reading it assigns none."""
    cur = await conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def commit_times(conn: Conn, first: int, end: int) -> list[float]:
    """When each transaction with an id in [first, end) committed (epoch seconds, sorted);
    ids that rolled back or never committed are left out."""
    cur = await conn.execute(
        "SELECT extract(epoch FROM ts)::float8 FROM ("
        "  SELECT pg_xact_commit_timestamp(((x %% %(space)s)::text)::xid) AS ts"
        "  FROM generate_series(%(first)s::bigint, %(end)s::bigint - 1) AS x"
        ") AS t WHERE ts IS NOT NULL ORDER BY ts",
        {"first": first, "end": end, "space": XID_SPACE},
    )
    return [float(r[0]) for r in await cur.fetchall()]


async def maintenance_runs(conn: Conn) -> int:
    """Autovacuum and autoanalyze runs so far on the tables of the connected database."""
    cur = await conn.execute(
        "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)::bigint"
        " FROM pg_stat_all_tables"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def busiest_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The most of `times` (sorted) inside any half-open window [t, t + window_s)."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best
