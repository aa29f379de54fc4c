"""The callback outbox in PostgreSQL: failed callbacks waiting for a retry, and the dead letters.

A row is written only when a send failed, so a healthy system writes nothing here. Every
statement lives in `mesh/store/outbox.sql`. The retry job (`mesh/driver/callbacks/retry.py`)
works on one client at a time through `Outbox.claim`, holding that client's advisory lock for
one transaction, which is what keeps any number of drivers from delivering out of order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import psycopg

from tidegate.backoff import Backoff
from tidegate.driver.callbacks.payload import Callback, decode_one, encode_one
from tidegate.driver.callbacks.transport import clean_error
from tidegate.errors import TidegateError
from tidegate.store.queries import Q
from tidegate.store.store import Session, Store, permanent

log = logging.getLogger(__name__)

_ENQUEUE_SLICE = 1000


def unstorable(exc: BaseException) -> bool:
    """The data itself cannot be stored, so retrying the same write can never pass: a value
    the database refuses (SQLSTATE class 22/23/54) or one psycopg refuses before sending (a
    NUL in text: a DataError without SQLSTATE)."""
    if permanent(exc):
        return True
    cause = exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else exc
    return isinstance(cause, psycopg.DataError)


def _storable(callback: Callback) -> Callback:
    """The callback as the outbox can keep it: PostgreSQL's jsonb refuses a NUL character
    (`\\u0000`) in any string, which a task's log tail or reason may hold."""
    changes = {
        name: value.replace("\x00", "")
        for name in ("reason", "log_tail", "executor")
        if isinstance(value := getattr(callback, name), str) and "\x00" in value
    }
    return msgspec.structs.replace(callback, **changes) if changes else callback


@dataclass(frozen=True)
class Term:
    """The notifier partition and lease revision an outbox write is made under
    (migrations/0013_notify_terms.sql): refused once a later holder's term has begun."""

    partition: int
    revision: int


class TermPassed(TidegateError):
    """A later holder's term of this notifier partition has begun: this holder's lease is
    gone, and its outbox write is refused (nothing of it is stored)."""


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
        self.failed = (row.id, delay_s, clean_error(error))

    def bury(self, row: OutboxRow, error: str | None, *, attempted: bool = False) -> None:
        self.buried.append((row.id, None if error is None else clean_error(error), int(attempted)))


class Outbox:
    """All database access for callbacks, through the driver's `Store` (its pool, its
    autocommit single statements and its transactions)."""

    def __init__(self, store: Store, policy: RetryPolicy) -> None:
        self._store = store
        self.policy = policy
        self.rng = random.Random()

    async def enqueue(
        self, callbacks: Sequence[Callback], error: str, *, term: Term | None = None
    ) -> list[Callback]:
        """Outbox failed callbacks, in the order given (the order they will be retried in).

        Returns the callbacks that can never be stored (see `unstorable`): with the list
        refused as a whole, each is tried alone so that one bad callback costs only itself.
        A database that cannot be reached raises, for the caller to retry. Under a notifier
        `term`, each statement is refused (`TermPassed`) once a later term has begun.
        """
        if not callbacks:
            return []
        if len(callbacks) > _ENQUEUE_SLICE:
            # A slow client's spilled backlog: slices, in order (ids follow the inserts),
            # each a short statement that leaves the event loop to the other clients between.
            given_up: list[Callback] = []
            for i in range(0, len(callbacks), _ENQUEUE_SLICE):
                given_up += await self.enqueue(callbacks[i : i + _ENQUEUE_SLICE], error, term=term)
            return given_up
        try:
            await self._enqueue(callbacks, error, term)
            return []
        except Exception as exc:
            if not unstorable(exc) or len(callbacks) == 1:
                if unstorable(exc):
                    log.error("callback %s cannot be stored: %s", callbacks[0].event_id, exc)
                    return list(callbacks)
                raise
        refused: list[Callback] = []
        for callback in callbacks:  # in order: ids are handed out as they go in
            refused += await self.enqueue([callback], error, term=term)
        return refused

    async def _enqueue(self, callbacks: Sequence[Callback], error: str, term: Term | None) -> None:
        callbacks = [_storable(c) for c in callbacks]
        params = {
            "event_id": [c.event_id for c in callbacks],
            "task_id": [c.task_id for c in callbacks],
            "client": [c.client for c in callbacks],
            "state": [c.state for c in callbacks],
            "payload": [encode_one(c).decode() for c in callbacks],
            "delay_s": self.policy.delay(1, self.rng),
            "error": clean_error(error),
        }
        if term is None:
            await self._store.execute(Q.outbox_enqueue, params)
            return
        async with self._store.transaction(what="callback outbox") as tx:
            newest = await tx.fetch_one(Q.notify_term_share, {"partition": term.partition})
            if newest is not None and int(newest["revision"]) > term.revision:
                raise TermPassed(
                    f"notifier partition {term.partition}: a later term ({newest['holder']}, "
                    f"revision {newest['revision']}) has begun; revision {term.revision} may "
                    "no longer write the outbox"
                )
            await tx.execute(Q.outbox_enqueue, params)

    async def begin_term(self, term: Term, holder: str) -> set[str]:
        """A notifier term begins: recorded (waiting out the earlier term's writes in
        flight), then the clients with callbacks in the outbox, read after it."""
        params = {"partition": term.partition, "revision": term.revision, "holder": holder}
        await self._store.execute(Q.notify_term_begin, params, what="notifier term")
        return await self.pending_clients()

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
        failure: Exception | None = None
        async with self._store.transaction() as tx:
            locked = await tx.fetch_one(Q.outbox_lock_client, {"client": client})
            if not (locked and locked["locked"]):
                yield None
                return
            found = await tx.fetch_all(Q.outbox_claim_rows, {"client": client, "limit": limit})
            claim = Claim(client, [])
            for r in found:
                try:
                    callback = decode_one(r["payload"])
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    # Never sendable: dead-lettered at once, not retried on every pass.
                    claim.buried.append((r["id"], clean_error(f"unreadable payload: {exc}"), 0))
                    continue
                claim.rows.append(
                    OutboxRow(
                        id=r["id"],
                        event_id=r["event_id"],
                        attempts=r["attempts"],
                        last_error=r["last_error"],
                        due=r["due"],
                        age_s=r["age_s"],
                        callback=callback,
                    )
                )
            try:
                yield claim
            except Exception as exc:
                # Whatever went wrong after some rows were delivered, their deliveries are
                # committed: a rollback would send them again, and again on every pass.
                failure = exc
            await self._settle(tx, claim)
        if failure is not None:
            raise failure

    @staticmethod
    async def _settle(tx: Session, claim: Claim) -> None:
        if claim.delivered:
            await tx.execute(Q.outbox_delete_delivered, {"ids": claim.delivered})
        # The outcomes of failed rows behind a savepoint: a row the database would refuse
        # (it cannot, with errors cleaned, but a rule kept by one function alone is fragile)
        # costs its own bookkeeping, never the deliveries above.
        await tx.execute(Q.outbox_savepoint)
        try:
            await Outbox._settle_failures(tx, claim)
        except Exception as exc:
            if not unstorable(exc):
                raise
            log.error("outbox bookkeeping of %s refused (%s); kept as it was", claim.client, exc)
            await tx.execute(Q.outbox_rollback_savepoint)

    @staticmethod
    async def _settle_failures(tx: Session, claim: Claim) -> None:
        if claim.failed is not None:
            row_id, delay_s, error = claim.failed
            await tx.execute(Q.outbox_fail_one, {"id": row_id, "delay_s": delay_s, "error": error})
        if claim.buried:
            ids, errors, bumps = zip(*claim.buried, strict=True)
            await tx.execute(
                Q.outbox_bury, {"ids": list(ids), "errors": list(errors), "bumps": list(bumps)}
            )
