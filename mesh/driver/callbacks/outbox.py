"""The callback outbox in PostgreSQL: failed callbacks waiting for a retry, and the dead letters.

A row is written only when a send failed, so a healthy system writes nothing here. Every
statement lives in `mesh/store/outbox.sql`. The retry job (`mesh/driver/callbacks/retry.py`)
works on one client at a time through `Outbox.claim`, holding that client's advisory lock for
one transaction, which is what keeps any number of drivers from delivering out of order.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from tidegate.backoff import Backoff
from tidegate.driver.callbacks.payload import Callback, decode_one, encode_one
from tidegate.store.queries import Q
from tidegate.store.store import Session, Store


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: float = 0.2  # ± this fraction of the delay, so a fleet of failures spreads out
    max_attempts: int = 20  # counting the first send, made by the notifier
    max_age_s: float = 24 * 3600
    backoff: Backoff = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and self.factor >= 1 and self.cap_s >= self.base_s):
            raise ValueError(f"retry policy needs base_s > 0, factor >= 1, cap_s >= base_s: {self}")
        if not (0 <= self.jitter < 1 and self.max_attempts >= 1 and self.max_age_s > 0):
            raise ValueError(
                f"retry policy needs 0 <= jitter < 1, max_attempts >= 1, max_age_s > 0: {self}"
            )
        # Checked above first, so a bad policy is reported in the policy's own words.
        backoff = Backoff(
            base_s=self.base_s, cap_s=self.cap_s, factor=self.factor, jitter=self.jitter
        )
        object.__setattr__(self, "backoff", backoff)

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after `attempts` failed attempts (1 = only the first send failed)."""
        return self.backoff.delay(attempts, rng)


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


class Outbox:
    """All database access for callbacks, through the driver's `Store` (its pool, its
    autocommit single statements and its transactions)."""

    def __init__(self, store: Store, policy: RetryPolicy) -> None:
        self._store = store
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
            "delay_s": self.policy.delay(1, self.rng),
            "error": error,
        }
        await self._store.execute(Q.outbox_enqueue, params)

    async def pending_clients(self) -> set[str]:
        rows = await self._store.fetch_all(Q.outbox_pending_clients)
        return {str(r["client"]) for r in rows}

    async def due_clients(self) -> list[str]:
        max_age_s = float(self.policy.max_age_s)  # an int would not fit make_interval(secs)
        rows = await self._store.fetch_all(Q.outbox_due_clients, {"max_age_s": max_age_s})
        return [str(r["client"]) for r in rows]

    async def count(self, client: str | None = None) -> int:
        if client is None:
            row = await self._store.fetch_one(Q.outbox_count_all)
        else:
            row = await self._store.fetch_one(Q.outbox_count_client, {"client": client})
        return int(row["n"]) if row else 0

    async def dead_letters(self, client: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Newest first."""
        query = Q.dead_letters_all if client is None else Q.dead_letters_client
        rows = await self._store.fetch_all(query, {"client": client, "limit": limit})
        return [msgspec.convert(r, DeadLetter) for r in rows]

    @asynccontextmanager
    async def claim(self, client: str, limit: int) -> AsyncIterator[Claim | None]:
        """Lock `client`'s oldest rows for one transaction; None if another driver has them.

        Outcomes recorded on the `Claim` are written just before the commit; an exception
        rolls everything back, so a callback is at worst delivered again, never lost.
        """
        async with self._store.transaction() as tx:
            locked = await tx.fetch_one(Q.outbox_lock_client, {"client": client})
            if not (locked and locked["locked"]):
                yield None
                return
            found = await tx.fetch_all(Q.outbox_claim_rows, {"client": client, "limit": limit})
            rows = [
                OutboxRow(
                    id=r["id"],
                    event_id=r["event_id"],
                    attempts=r["attempts"],
                    last_error=r["last_error"],
                    due=r["due"],
                    age_s=r["age_s"],
                    callback=decode_one(r["payload"]),
                )
                for r in found
            ]
            claim = Claim(client, rows)
            yield claim
            await self._settle(tx, claim)

    @staticmethod
    async def _settle(tx: Session, claim: Claim) -> None:
        if claim.delivered:
            await tx.execute(Q.outbox_delete_delivered, {"ids": claim.delivered})
        if claim.failed is not None:
            row_id, delay_s, error = claim.failed
            await tx.execute(Q.outbox_fail_one, {"id": row_id, "delay_s": delay_s, "error": error})
        if claim.buried:
            ids, errors, bumps = zip(*claim.buried, strict=True)
            await tx.execute(
                Q.outbox_bury, {"ids": list(ids), "errors": list(errors), "bumps": list(bumps)}
            )
