"""The figures of a flood: the database's commit counter, terminal tasks, rows written.

How far the figures can be trusted:

- Tidegate's tables live in a database of their own (`tidegate`). The commit sampler reads
  `pg_stat_database` over a connection to the `postgres` database, so sampling costs the
  measured database nothing. The completion poller has to query `tasks` itself: it rolls each
  read back, so it adds no commit, and nothing is subtracted from `commits` or from the peak
  (`poller_commits` is 0).
- PostgreSQL publishes a backend's counters at most once a second (an idle backend's up to
  10 s late), but always when the backend exits. Totals are therefore read after the driver
  and executors have exited, against a baseline read before they started: `commits` covers the
  driver's whole life, start-up included (a few dozen), and autovacuum's few transactions.
- For the same reason one 0.5 s sample can hold a whole second of a backend's commits, so the
  peak rate is taken over 1 s windows (two samples), never over a single sample. It can still
  err high: a window can see one backend publish twice (a second and a bit apart), and so hold
  up to two seconds of that backend's commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Final

import psycopg
from psycopg.rows import TupleRow

from tidegate.bench.model import ModeResult
from tidegate.bench.stack import DB_NAME
from tidegate.wire import TERMINAL_STATES

SAMPLE_S: Final = 0.5
PEAK_WINDOW_S: Final = 1.0
SETTLE_TIMEOUT_S: Final = 5.0

Conn = psycopg.AsyncConnection[TupleRow]


def peak_rate(samples: Sequence[tuple[float, int]], window_s: float = PEAK_WINDOW_S) -> float:
    """Highest counter rate over any span of at least `window_s` between two samples.

    With fewer samples than one window the whole span is used, so a short run still gets a rate.
    """
    if len(samples) < 2:
        return 0.0
    best = 0.0
    spanned = False
    j = 0
    for i, (t0, c0) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t0 < window_s:
            j += 1
        if j == len(samples):
            break
        t1, c1 = samples[j]
        best = max(best, (c1 - c0) / (t1 - t0))
        spanned = True
    if not spanned:
        (t0, c0), (t1, c1) = samples[0], samples[-1]
        best = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
    return best


class CommitMeter:
    """The `tidegate` database's commit counter, read from the `postgres` database."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def read(self) -> int:
        # Autocommit: each read is its own transaction, hence a fresh statistics snapshot.
        cur = await self._conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB_NAME,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def settled(self) -> int:
        """The counter once exited backends have published theirs (two equal reads)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last = await self.read()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            current = await self.read()
            if current == last:
                break
            last = current
        return last

    async def sample(self, into: list[tuple[float, int]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            into.append((loop.time(), await self.read()))
            await asyncio.sleep(SAMPLE_S)


class Poller:
    """Counts terminal tasks without adding a commit to the measured database: each read runs
    in a transaction that is rolled back (counted in `xact_rollback`, never in `xact_commit`),
    so neither the total nor any one-second peak has anything of the benchmark's to subtract,
    and nothing of the driver's can be subtracted by mistake."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.reads = 0
        self.commits = 0  # the poller's own commits in the measured database: none

    @property
    def statements(self) -> int:
        """What a caller subtracts from the commit counter: the poller's commits (none)."""
        return self.commits

    async def terminal(self) -> int:
        self.reads += 1
        async with self._conn.transaction(force_rollback=True):
            cur = await self._conn.execute("SELECT count(*) FROM tasks WHERE state_rank = 3")
            row = await cur.fetchone()
        return int(row[0]) if row else 0


async def table_stats(database_url: str, result: ModeResult) -> None:
    """Rows written and final states, read after the components have exited."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables"
            " WHERE relid IN (SELECT inhrelid FROM pg_inherits"
            "                 WHERE inhparent = 'tasks'::regclass)"
        )
        row = await cur.fetchone()
        result.rows_written = int(row[0]) if row else 0
        cur = await conn.execute("SELECT state, count(*) FROM tasks GROUP BY state")
        states = {str(s): int(n) for s, n in await cur.fetchall()}
    result.succeeded = states.get("succeeded", 0)
    result.terminal = sum(n for s, n in states.items() if s in TERMINAL_STATES)
    result.completed = result.terminal == result.tasks
    if result.tasks:
        result.rows_per_task = round(result.rows_written / result.tasks, 3)
        if result.commits is not None:
            result.commits_per_task = round(result.commits / result.tasks, 4)
