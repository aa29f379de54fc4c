"""Sensitive transitions written before their callbacks: one group commit shared by every lane.

Each client's lane (mesh/driver/notify.py) hands its sensitive rows here and waits; a single
writer coalesces whatever all lanes handed in since its last commit into one statement. The
wait is per lane: while PostgreSQL is down only the lanes of sensitive clients wait, and the
notifier keeps reading events and calling non-sensitive clients back.

Each group commit takes a turn of the driver's commit cap (the `Store` it is given is paced:
mesh/store/pace.py), on the lane with the largest weight: while it waits, the lanes' rows pile
up into the next commit, so a capped database means larger group commits, not more of them.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from tidegate.metrics import DriverMetrics
from tidegate.store.rows import TaskRow, coalesce
from tidegate.store.store import Store, permanent
from tidegate.supervise import until_done

log = logging.getLogger(__name__)


class SensitiveWriter:
    def __init__(self, store: Store, metrics: DriverMetrics) -> None:
        self._store = store
        self._metrics = metrics
        self._pending: list[tuple[list[TaskRow], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def write(self, rows: list[TaskRow]) -> None:
        """Returns once `rows` are committed (or refused by the database for what they hold:
        a row it will never take must not hold back its client's callbacks forever)."""
        if not rows:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, done))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="notify:sensitive-writes")
        await done

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, done in self._pending:
            done.cancel()
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            # A lane stopped meanwhile (its future cancelled) no longer needs its rows.
            live = [(rows, done) for rows, done in batch if not done.done()]
            if live:
                await self._persist(coalesce(r for rows, _ in live for r in rows))
            for _, done in live:
                if not done.done():
                    done.set_result(None)

    async def _persist(self, rows: list[TaskRow]) -> None:
        try:
            await until_done(
                partial(self._store.upsert_tasks, rows),
                what="sensitive group commit",
                give_up=permanent,
                on_failure=lambda _exc: self._metrics.write_failures.inc(),
            )
        except Exception:
            # A row the database refuses must not hold back the others' callbacks.
            for row in rows:
                await self._persist_one(row)
            return
        self._metrics.commits.inc()
        self._metrics.rows.inc(len(rows))

    async def _persist_one(self, row: TaskRow) -> None:
        try:
            await until_done(
                partial(self._store.upsert_task_one, row),
                what="sensitive write",
                give_up=permanent,
            )
        except Exception as exc:
            self._metrics.refused_rows.inc()
            log.error("sensitive row of %s refused: %s", row.task_id, exc)
