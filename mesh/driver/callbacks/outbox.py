"""The callback outbox in PostgreSQL: failed callbacks waiting for a retry, and the dead letters.

A row is written only when a send failed, so a healthy system writes nothing here. Every
statement lives in `mesh/store/outbox.sql`. The retry job (`mesh.callbacks.retry`) works on
one client at a time through `Outbox.claim`, holding that client's advisory lock for one
transaction, which is what keeps any number of drivers from delivering out of order.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from importlib.resources import files
from typing import Any, Final

import msgspec
import psycopg
from psycopg.rows import TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool

from tidegate.driver.callbacks.payload import Callback, decode_one, encode_one
from tidegate.store.queries import parse
from tidegate.store.store import Store

Pool = AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]


@dataclass(frozen=True, slots=True)
class OutboxQueries:
    enqueue: str
    pending_clients: str
    due_clients: str
    lock_client: str
    claim_rows: str
    delete_delivered: str
    fail_one: str
    bury: str
    count_all: str
    count_client: str
    dead_letters_all: str
    dead_letters_client: str


def _load(text: str) -> OutboxQueries:
    parsed = parse(text)
    expected = {f.name for f in fields(OutboxQueries)}
    missing, extra = expected - parsed.keys(), parsed.keys() - expected
    empty = [name for name, sql in parsed.items() if not sql]
    if missing or extra or empty:
        raise ValueError(
            f"outbox.sql does not match OutboxQueries: missing {sorted(missing)}, "
            f"extra {sorted(extra)}, empty {empty}"
        )
    return OutboxQueries(**parsed)


Q: Final = _load(files("tidegate.store").joinpath("outbox.sql").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: float = 0.2  # ± this fraction of the delay, so a fleet of failures spreads out
    max_attempts: int = 20  # counting the first send, made by the notifier
    max_age_s: float = 24 * 3600

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and self.factor >= 1 and self.cap_s >= self.base_s):
            raise ValueError(f"retry policy needs base_s > 0, factor >= 1, cap_s >= base_s: {self}")
        if not (0 <= self.jitter < 1 and self.max_attempts >= 1 and self.max_age_s > 0):
            raise ValueError(
                f"retry policy needs 0 <= jitter < 1, max_attempts >= 1, max_age_s > 0: {self}"
            )


def next_delay(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """Seconds to wait after `attempts` failed attempts (1 = only the first send failed)."""
    try:
        raw = policy.base_s * policy.factor ** max(0, attempts - 1)
    except OverflowError:  # factor ** a few hundred: long past the cap anyway
        raw = math.inf
    delay = min(policy.cap_s, raw)
    return max(0.0, delay * (1 + rng.uniform(-policy.jitter, policy.jitter)))


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    task_id: str
    client: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    dead_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    event_id: str
    attempts: int
    last_error: str | None
    due: bool
    age_s: float
    callback: Callback


@dataclass
class Claim:
    """One client's rows, locked for one transaction; outcomes are written when it commits."""

    client: str
    rows: list[OutboxRow]
    delivered: list[int] = field(default_factory=list)
    failed: tuple[int, float, str] | None = None  # (row id, delay, error)
    buried: list[tuple[int, str | None, int]] = field(default_factory=list)  # (id, error, bump)

    def deliver(self, rows: Sequence[OutboxRow]) -> None:
        self.delivered.extend(r.id for r in rows)

    def fail(self, row: OutboxRow, error: str, delay_s: float) -> None:
        self.failed = (row.id, delay_s, error)

    def bury(self, row: OutboxRow, error: str | None, *, attempted: bool = False) -> None:
        self.buried.append((row.id, error, int(attempted)))


def _pool_of(pool_or_store: Pool | Store) -> Pool:
    if isinstance(pool_or_store, Store):
        # Store keeps its pool private; sharing it saves a second set of connections.
        return pool_or_store._pool
    return pool_or_store


class Outbox:
    """All database access for callbacks.

    Give it the driver's `Store` or a pool of autocommit connections (as `Store` makes them):
    single statements here rely on autocommit to be committed.
    """

    def __init__(self, pool_or_store: Pool | Store, policy: RetryPolicy) -> None:
        self._pool = _pool_of(pool_or_store)
        self.policy = policy
        self.rng = random.Random()

    async def enqueue(self, callbacks: Sequence[Callback], error: str) -> None:
        """Outbox failed callbacks, in the order given (the order they will be retried in)."""
        if not callbacks:
            return
        params = {
            "event_id": [c.event_id for c in callbacks],
            "task_id": [c.task_id for c in callbacks],
            "client": [c.client for c in callbacks],
            "state": [c.state for c in callbacks],
            "payload": [encode_one(c).decode() for c in callbacks],
            "delay_s": next_delay(self.policy, 1, self.rng),
            "error": error,
        }
        async with self._pool.connection() as conn:
            await conn.execute(Q.enqueue, params)

    async def pending_clients(self) -> set[str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(Q.pending_clients)
            return {str(c) for (c,) in await cur.fetchall()}

    async def due_clients(self) -> list[str]:
        async with self._pool.connection() as conn:
            max_age_s = float(self.policy.max_age_s)  # an int would not fit make_interval(secs)
            cur = await conn.execute(Q.due_clients, {"max_age_s": max_age_s})
            return [str(c) for (c,) in await cur.fetchall()]

    async def count(self, client: str | None = None) -> int:
        async with self._pool.connection() as conn:
            if client is None:
                cur = await conn.execute(Q.count_all)
            else:
                cur = await conn.execute(Q.count_client, {"client": client})
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def dead_letters(self, client: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Newest first."""
        query = Q.dead_letters_all if client is None else Q.dead_letters_client
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query, {"client": client, "limit": limit})
            rows = await cur.fetchall()
        return [msgspec.convert(r, DeadLetter) for r in rows]

    @asynccontextmanager
    async def claim(self, client: str, limit: int) -> AsyncIterator[Claim | None]:
        """Lock `client`'s oldest rows for one transaction; None if another driver has them.

        Outcomes recorded on the `Claim` are written just before the commit; an exception
        rolls everything back, so a callback is at worst delivered again, never lost.
        """
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(Q.lock_client, {"client": client})
            locked = await cur.fetchone()
            if not (locked and locked[0]):
                yield None
                return
            cur = await conn.execute(Q.claim_rows, {"client": client, "limit": limit})
            rows = [
                OutboxRow(rid, event_id, attempts, error, due, age_s, decode_one(payload))
                for rid, event_id, attempts, error, payload, due, age_s in await cur.fetchall()
            ]
            claim = Claim(client, rows)
            yield claim
            await self._settle(conn, claim)

    @staticmethod
    async def _settle(conn: psycopg.AsyncConnection[TupleRow], claim: Claim) -> None:
        if claim.delivered:
            await conn.execute(Q.delete_delivered, {"ids": claim.delivered})
        if claim.failed is not None:
            row_id, delay_s, error = claim.failed
            await conn.execute(Q.fail_one, {"id": row_id, "delay_s": delay_s, "error": error})
        if claim.buried:
            ids, errors, bumps = zip(*claim.buried, strict=True)
            await conn.execute(
                Q.bury, {"ids": list(ids), "errors": list(errors), "bumps": list(bumps)}
            )
