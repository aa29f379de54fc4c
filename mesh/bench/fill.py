"""Filling `tasks` for `tidegate bench console`: a million rows in a minute or two, all of it
computed by the server (INSERT … SELECT FROM generate_series), one statement per day partition.

Row `i` (0 … rows-1, oldest first) gets its values from `hashint8extended(i, salt)`: the same
rows on every run, no data sent over the wire, and independent draws per column (a salt each).
The mix is a production-like one: clients of uneven size (the first is about four times the
last), three pools, short and long tasks, argv and shell specs with an environment (some
secret-looking) and labels, terminal states mostly `succeeded`, and the newest few thousand
tasks still queued, dispatched or running, as after a top-of-the-hour flood.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import psycopg

from tidegate.bench.timing import DataFacts

DAY_S: Final = 86_400.0
MIN_TODAY_S: Final = 60.0  # just after midnight, today's rows still get a minute of their own
UNFINISHED_MAX: Final = 3_000  # the newest tasks, not terminal yet
UNFINISHED_SHARE: Final = 100  # … but at most one row in this many (a small run stays mostly done)

# Cumulative shares of the terminal states (the rest of 1.0 is `rejected`).
TERMINAL_MIX: Final = (
    ("succeeded", 0.935),
    ("failed", 0.980),
    ("timed_out", 0.985),
    ("cancelled", 0.992),
    ("lost", 0.995),
)
UNFINISHED_MIX: Final = (("queued", 0.35), ("dispatched", 0.45))  # the rest: `running`


@dataclass(frozen=True)
class DayFill:
    """One day partition's rows: global indexes first … first+count-1, evenly spread from
    `start` over `span_s` seconds."""

    day: date
    first: int
    count: int
    start: datetime
    span_s: float

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def plan_days(rows: int, days: int, now: datetime) -> list[DayFill]:
    """`rows` spread over the `days` calendar days (UTC) that end today, oldest first.

    Today's rows end at `now`, so no task is submitted in the future. The remainder of the
    division goes to the newest days.
    """
    if rows < 1 or days < 1:
        raise ValueError("rows and days must be 1 or more")
    today = now.astimezone(UTC).date()
    base, extra = divmod(rows, days)
    plan: list[DayFill] = []
    first = 0
    for k in range(days):
        day = today - timedelta(days=days - 1 - k)
        count = base + (1 if k >= days - extra else 0)
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        span = DAY_S if day < today else max((now - start).total_seconds(), MIN_TODAY_S)
        if day == today and span == MIN_TODAY_S:
            start = now - timedelta(seconds=MIN_TODAY_S)  # never past `now`
        if count:
            plan.append(DayFill(day=day, first=first, count=count, start=start, span_s=span))
        first += count
    return plan


def unfinished_from(rows: int) -> int:
    """Rows from this index on are the newest ones, still queued, dispatched or running."""
    return rows - min(UNFINISHED_MAX, rows // UNFINISHED_SHARE)


def fill_params(fill: DayFill, clients: Sequence[str], rows: int) -> dict[str, Any]:
    """The parameters of FILL_SQL for one day."""
    if not clients:
        raise ValueError("at least one client")
    return {
        "day": fill.day,
        "first": fill.first,
        "last": fill.last,
        "start": fill.start,
        "step_s": fill.span_s / fill.count,
        "clients": list(clients),
        "n_clients": len(clients),
        "unfinished_from": unfinished_from(rows),
    }


def _cases(column: str, mix: Sequence[tuple[str, float]], rest: str) -> str:
    arms = " ".join(f"WHEN {column} < {share} THEN '{state}'" for state, share in mix)
    return f"CASE {arms} ELSE '{rest}' END"


# Each `u_*` is uniform in [0, 1). Row i is submitted within [start + i·step, start + (i+1)·step)
# (i counted from the day's first row): rows are in time order, as a projection writes them.
FILL_SQL: Final = f"""
INSERT INTO tasks (
    task_id, client, key, submitted_on, submitted_at, pool, task_class, spec, priority, labels,
    max_attempts, state, state_rank, attempt, executor, exit_code, reason, log_tail,
    started_at, finished_at, updated_at)
SELECT
    d.client || ':' || d.key, d.client, d.key, %(day)s::date, d.submitted_at, d.pool,
    CASE WHEN d.timeout_s <= 300 THEN 'short' ELSE 'long' END,
    jsonb_build_object(
        'key', d.key,
        'argv', CASE WHEN u.u_shell >= 0.15 THEN jsonb_build_array(
            '/usr/bin/env', 'python3', '-m', 'jobs.' || d.team, '--part', mod(g.i, 64)::text,
            '--date', to_char(d.submitted_at, 'YYYY-MM-DD')) END,
        'shell', CASE WHEN u.u_shell < 0.15 THEN
            'cd /srv/' || d.team || ' && ./run.sh --part ' || mod(g.i, 64) || ' 2>&1' END,
        'env', CASE WHEN u.u_env < 0.3 THEN jsonb_build_object(
                    'RUN_ID', 'r' || g.i, 'DB_PASSWORD', md5(g.i::text), 'LANG', 'C.UTF-8')
                ELSE jsonb_build_object('RUN_ID', 'r' || g.i) END,
        'cwd', '/srv/' || d.team,
        'timeout_s', d.timeout_s,
        'pool', d.pool,
        'priority', d.priority,
        'labels', d.labels,
        'max_attempts', 3),
    d.priority, d.labels, 3,
    d.state,
    CASE d.state WHEN 'queued' THEN 0 WHEN 'dispatched' THEN 1 WHEN 'running' THEN 2 ELSE 3 END,
    CASE WHEN d.state = 'lost' THEN 3 WHEN u.u_retry < 0.01 THEN 2 ELSE 1 END,
    CASE WHEN d.state IN ('queued', 'dispatched', 'rejected') THEN NULL
         ELSE 'exec-' || mod(g.i, 12) END,
    CASE d.state WHEN 'succeeded' THEN 0
                 WHEN 'failed' THEN (ARRAY[1, 1, 1, 2, 127])[1 + mod(g.i, 5)::int] END,
    CASE d.state WHEN 'failed' THEN 'exit code ' || (ARRAY[1, 1, 1, 2, 127])[1 + mod(g.i, 5)::int]
                 WHEN 'timed_out' THEN 'timed out after ' || d.timeout_s || ' s'
                 WHEN 'cancelled' THEN 'cancelled by operator olga'
                 WHEN 'lost' THEN 'gave up: delivered 3 times, over its limit of 3'
                 WHEN 'rejected' THEN 'argv[0] is empty: it must name the program to run' END,
    CASE WHEN d.state = 'succeeded' THEN 'done: ' || mod(g.i, 9973) || ' records written' || chr(10)
         WHEN d.state IN ('failed', 'timed_out') THEN
            'Traceback (most recent call last):' || chr(10)
            || '  File "/srv/' || d.team || '/job.py", line ' || mod(g.i, 400) || chr(10)
            || 'ValueError: bad input row ' || mod(g.i, 100000) || chr(10) END,
    d.started_at,
    CASE WHEN d.state IN ('queued', 'dispatched', 'running') THEN NULL
         WHEN d.state = 'rejected' THEN d.submitted_at + interval '5 ms'
         WHEN d.state = 'timed_out' THEN d.started_at + make_interval(secs => d.timeout_s)
         ELSE d.started_at
              + make_interval(secs => least(0.2 * exp(9 * u.u_duration), d.timeout_s)) END,
    now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g(i)
CROSS JOIN LATERAL (SELECT
    (hashint8extended(g.i, 1) & 2147483647)::float8 / 2147483648 AS u_client,
    (hashint8extended(g.i, 2) & 2147483647)::float8 / 2147483648 AS u_state,
    (hashint8extended(g.i, 3) & 2147483647)::float8 / 2147483648 AS u_pool,
    (hashint8extended(g.i, 4) & 2147483647)::float8 / 2147483648 AS u_timeout,
    (hashint8extended(g.i, 5) & 2147483647)::float8 / 2147483648 AS u_duration,
    (hashint8extended(g.i, 6) & 2147483647)::float8 / 2147483648 AS u_shell,
    (hashint8extended(g.i, 7) & 2147483647)::float8 / 2147483648 AS u_env,
    (hashint8extended(g.i, 8) & 2147483647)::float8 / 2147483648 AS u_retry,
    (hashint8extended(g.i, 9) & 2147483647)::float8 / 2147483648 AS u_jitter
) AS u
CROSS JOIN LATERAL (SELECT
    c.client, c.key, c.team, c.submitted_at, c.state, c.timeout_s, c.priority,
    CASE WHEN u.u_pool < 0.7 THEN 'default' WHEN u.u_pool < 0.9 THEN 'etl' ELSE 'gpu' END AS pool,
    jsonb_build_object('workflow', 'wf-' || (g.i / 8), 'team', c.team) AS labels,
    CASE WHEN c.state IN ('queued', 'dispatched', 'rejected') THEN NULL
         ELSE c.submitted_at + make_interval(secs => 0.05 + 3 * u.u_jitter) END AS started_at
    FROM (SELECT
        -- power(u, 1.5): uneven clients, the first about four times the size of the last.
        (%(clients)s::text[])[1 + floor(%(n_clients)s * power(u.u_client, 1.5))::int] AS client,
        'wf-' || (g.i / 8) || '.node-' || mod(g.i, 8) AS key,
        (ARRAY['billing', 'search', 'ml', 'reports'])[1 + mod(g.i / 8, 4)::int] AS team,
        %(start)s::timestamptz
            + make_interval(secs => (g.i - %(first)s + u.u_jitter) * %(step_s)s) AS submitted_at,
        CASE WHEN g.i >= %(unfinished_from)s THEN {_cases("u.u_state", UNFINISHED_MIX, "running")}
             ELSE {_cases("u.u_state", TERMINAL_MIX, "rejected")} END AS state,
        CASE WHEN u.u_timeout < 0.6 THEN 300 WHEN u.u_timeout < 0.9 THEN 3600
             ELSE 14400 END AS timeout_s,
        CASE WHEN u.u_retry >= 0.95 THEN 10 ELSE 0 END AS priority
    ) AS c
) AS d
"""


async def fill_tasks(
    database_url: str, clients: Sequence[str], rows: int, days: int, *, now: datetime
) -> DataFacts:
    """Insert the rows day by day, then VACUUM (ANALYZE): a table of this age would long
    have been vacuumed, and hint bits set by the first page reads would be measured too."""
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for fill in plan_days(rows, days, now):
            await conn.execute("SELECT tg_ensure_partition(%s)", (fill.day,))
            await conn.execute(FILL_SQL, fill_params(fill, clients, rows))
        filled = time.monotonic()
        await conn.execute("VACUUM (ANALYZE) tasks")
        vacuumed = time.monotonic()
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM tasks),"
            " count(*), coalesce(sum(pg_total_relation_size(inhrelid)), 0)"
            " FROM pg_inherits WHERE inhparent = 'tasks'::regclass"
        )
        row = await cur.fetchone()
    assert row is not None
    return DataFacts(
        rows=int(row[0]),
        partitions=int(row[1]),
        table_mb=round(int(row[2]) / 1024**2, 1),
        fill_s=round(filled - started, 1),
        vacuum_s=round(vacuumed - filled, 1),
    )
