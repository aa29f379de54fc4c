"""What the console reads and changes in the callback outbox and the dead letters.

The retry job (the driver's `callbacks/retry.py`) sends a client's outbox rows in id order,
starting from its oldest row, and only when that row is due. Everything here keeps that rule:

- "retry now" makes a row due together with every earlier row of its client (the only way it
  can go now without overtaking them);
- "re-drive" moves dead letters back into the outbox as new rows (new ids: behind the
  client's waiting rows), due now, with their attempts and age reset and the same event id
  and payload, so the retry job delivers them like any other callback;
- every change holds the same per-client advisory lock the retry job takes, so no retry pass
  works on a client while the console changes it.

Bulk changes take the `Scope` the operator confirmed (how many rows, up to which id) and are
refused with `CountChanged` if that count no longer holds. The SQL is in `outbox.sql`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

import msgspec
import psycopg

from tidegate.errors import StoreError, TidegateError, UsageError
from tidegate.store.queries import Q
from tidegate.store.store import Params, Row, Session, Store

__all__ = [
    "CallbackGone",
    "CallbacksBusy",
    "ClientCallbacks",
    "CountChanged",
    "DeadLetterEntry",
    "OutboxEntry",
    "Redriven",
    "RetriedNow",
    "Scope",
    "dead_letter_scope",
    "list_dead_letters",
    "list_outbox",
    "outbox_scope",
    "ping",
    "redrive_dead_letter",
    "redrive_dead_letters",
    "retry_all_now",
    "retry_now",
    "show_dead_letter",
    "summary",
]

MAX_PAGE: Final = 500
# How long a change waits for a client the retry job is sending right now. A pass holds a
# client for at most its budget plus one send timeout; most are done in milliseconds.
LOCK_TIMEOUT_MS: Final = 4000


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event_id: str
    task_id: str
    client: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    age_s: float
    head_id: int  # the client's oldest row: nothing of the client goes before it
    wait_s: float  # until the head is next tried (<= 0: due), the earliest this row can go

    @property
    def behind(self) -> bool:
        return self.head_id != self.id


class DeadLetterEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event_id: str
    task_id: str
    client: str
    state: str
    attempts: int
    last_error: str | None  # why it was given up, with the endpoint's last answer
    created_at: datetime
    dead_at: datetime


class ClientCallbacks(msgspec.Struct, frozen=True, kw_only=True):
    client: str
    outbox: int
    due: int
    dead: int


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """What a bulk action would touch: `count` rows, none newer than id `upto`."""

    count: int
    upto: int | None  # None when there is nothing


class RetriedNow(msgspec.Struct, frozen=True, kw_only=True):
    client: str
    made_due: int  # rows whose next attempt moved to now (the others were due already)
    task_id: str | None = None  # for one row
    event_id: str | None = None


class Redriven(msgspec.Struct, frozen=True, kw_only=True):
    client: str
    moved: int  # dead letters taken out
    queued: int  # outbox rows made (fewer when an event was already waiting there)
    first_id: int | None  # the first new outbox row
    task_id: str | None = None  # for one dead letter
    event_id: str | None = None


class CallbackGone(UsageError):
    """The row is no longer there: delivered, dead-lettered or re-driven meanwhile."""


class CallbacksBusy(StoreError):
    """A retry pass held the client for longer than a change waits; nothing was changed."""


class CountChanged(TidegateError):
    """The rows a bulk action would touch are no longer the ones confirmed; `scope` is the
    fresh count, to confirm again. Nothing was changed."""

    def __init__(self, message: str, scope: Scope) -> None:
        super().__init__(message)
        self.scope = scope


# --- reading -------------------------------------------------------------------------------------


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise UsageError(f"limit must be 1 to {MAX_PAGE}, not {limit}")
    return limit


async def summary(store: Store) -> list[ClientCallbacks]:
    """Per client with anything waiting or dead: outbox rows, due rows, dead letters."""
    rows = await store.fetch_all(Q.callbacks_summary, what="summarise callbacks")
    return [msgspec.convert(r, ClientCallbacks) for r in rows]


async def list_outbox(
    store: Store, *, client: str | None = None, after_id: int | None = None, limit: int = 50
) -> list[OutboxEntry]:
    """Outbox rows in delivery order (id), after `after_id` (the last id of a previous page)."""
    params = {"client": client, "after_id": after_id or 0, "limit": _limit(limit)}
    rows = await store.fetch_all(
        Q.callbacks_outbox_page, params, what="list the callback outbox", prepare=False
    )
    return [msgspec.convert(r, OutboxEntry) for r in rows]


async def list_dead_letters(
    store: Store, *, client: str | None = None, before_id: int | None = None, limit: int = 50
) -> list[DeadLetterEntry]:
    """Dead letters newest first, before `before_id` (the last id of a previous page)."""
    params = {"client": client, "before_id": before_id, "limit": _limit(limit)}
    rows = await store.fetch_all(
        Q.callbacks_dead_page, params, what="list callback dead letters", prepare=False
    )
    return [msgspec.convert(r, DeadLetterEntry) for r in rows]


def _scope(row: Row | None) -> Scope:
    if row is None:
        return Scope(count=0, upto=None)
    count = int(row["n"])
    return Scope(count=count, upto=int(row["upto"]) if count else None)


async def _one(db: Store | Session, query: str, params: Params, what: str) -> Row | None:
    # Unprepared (optional filters), and fetch_one has no such switch.
    if isinstance(db, Store):
        rows = await db.fetch_all(query, params, what=what, prepare=False)
    else:
        rows = await db.fetch_all(query, params, prepare=False)
    return rows[0] if rows else None


async def outbox_scope(store: Store, *, client: str | None = None) -> Scope:
    """What "retry all now" (of `client`, or of everyone) would touch at this moment."""
    row = await _one(
        store, Q.callbacks_outbox_scope, {"client": client, "upto": None}, "count the outbox"
    )
    return _scope(row)


async def dead_letter_scope(store: Store, *, client: str) -> Scope:
    """What "re-drive all of `client`" would touch at this moment."""
    row = await _one(
        store, Q.callbacks_dead_scope, {"client": client, "upto": None}, "count dead letters"
    )
    return _scope(row)


async def ping(store: Store) -> None:
    """Raise StoreError unless the database answers: before a change, so that a change that
    cannot be made is refused as certainly not made, not as "maybe"."""
    await store.fetch_one(Q.callbacks_ping, what="reach the database")


# --- changing ------------------------------------------------------------------------------------


@asynccontextmanager
async def _locked(store: Store, what: str) -> AsyncIterator[Session]:
    """A transaction whose lock waits are bounded; a lock it could not get is CallbacksBusy."""
    try:
        async with store.transaction(what=what) as tx:
            await tx.execute(Q.callbacks_lock_timeout, {"timeout": f"{LOCK_TIMEOUT_MS}ms"})
            yield tx
    except StoreError as exc:
        if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
            raise CallbacksBusy(
                f"{what}: a retry pass is sending these callbacks right now; nothing was "
                "changed, try again in a few seconds"
            ) from exc
        raise


async def _lock_clients(tx: Session, clients: Iterable[str]) -> None:
    await tx.execute(Q.callbacks_lock_clients, {"clients": sorted(set(clients))})


async def _confirmed(tx: Session, query: str, client: str | None, expect: Scope, what: str) -> bool:
    """Whether there is work, after checking that the confirmed count still holds (rows up to
    the confirmed id; newer rows are not the operator's concern). CountChanged if not."""
    if expect.upto is not None and expect.count > 0:
        params = {"client": client, "upto": expect.upto}
        if _scope(await _one(tx, query, params, what)).count == expect.count:
            return True
    fresh = _scope(await _one(tx, query, {"client": client, "upto": None}, what))
    if expect.count == 0 and fresh.count == 0:
        return False
    raise CountChanged(
        f"{what}: the rows changed since {expect.count} were confirmed; {fresh.count} now",
        fresh,
    )


async def retry_now(store: Store, row_id: int) -> RetriedNow:
    """Make outbox row `row_id` due now, with the earlier rows of its client (they go first)."""
    what = f"retry callback #{row_id} now"
    async with _locked(store, what) as tx:
        row = await tx.fetch_one(Q.callbacks_outbox_row, {"id": row_id})
        if row is None:
            raise _gone_from_outbox(row_id)
        client = str(row["client"])
        await _lock_clients(tx, [client])
        # Again under the lock: a pass may have delivered or buried it while we waited.
        if await tx.fetch_one(Q.callbacks_outbox_row, {"id": row_id}) is None:
            raise _gone_from_outbox(row_id)
        made_due = await tx.execute(Q.callbacks_retry_now, {"clients": [client], "upto": row_id})
    return RetriedNow(
        client=client, made_due=made_due, task_id=row["task_id"], event_id=row["event_id"]
    )


def _gone_from_outbox(row_id: int) -> CallbackGone:
    return CallbackGone(
        f"callback #{row_id} is no longer in the outbox: delivered or dead-lettered meanwhile"
    )


async def retry_all_now(store: Store, *, client: str | None, expect: Scope) -> RetriedNow:
    """Make due now every outbox row (of `client`, or of every client) up to `expect.upto`,
    if there are still `expect.count` of them; else CountChanged with the fresh scope."""
    who = client or "every client"
    what = f"retry the outbox of {who} now"
    async with _locked(store, what) as tx:
        if client is None:
            pending = await tx.fetch_all(Q.outbox_pending_clients)
            clients = [str(r["client"]) for r in pending]
        else:
            clients = [client]
        await _lock_clients(tx, clients)
        if not await _confirmed(tx, Q.callbacks_outbox_scope, client, expect, what):
            return RetriedNow(client=who, made_due=0)
        made_due = await tx.execute(
            Q.callbacks_retry_now, {"clients": clients, "upto": expect.upto}
        )
    return RetriedNow(client=who, made_due=made_due)


async def redrive_dead_letter(store: Store, dead_id: int) -> Redriven:
    """Move one dead letter back into the outbox, behind its client's waiting rows."""
    what = f"re-drive dead letter #{dead_id}"
    async with _locked(store, what) as tx:
        row = await tx.fetch_one(Q.callbacks_dead_row, {"id": dead_id})
        if row is None:
            raise _gone_from_dead(dead_id)
        client = str(row["client"])
        await _lock_clients(tx, [client])
        result = await _redrive(tx, client, dead_id, dead_id)
        if result.moved == 0:  # re-driven by someone else while we waited for the lock
            raise _gone_from_dead(dead_id)
    return msgspec.structs.replace(result, task_id=row["task_id"], event_id=row["event_id"])


async def show_dead_letter(store: Store, dead_id: int) -> tuple[DeadLetterEntry, Any] | None:
    """One dead letter and the callback payload it holds (JSON), None if there is none."""
    row = await store.fetch_one(Q.callbacks_dead_one, {"id": dead_id}, what="show a dead letter")
    if row is None:
        return None
    payload = row.pop("payload")
    return msgspec.convert(row, DeadLetterEntry), payload


def _gone_from_dead(dead_id: int) -> CallbackGone:
    return CallbackGone(f"dead letter #{dead_id} is no longer there: re-driven meanwhile")


async def redrive_dead_letters(store: Store, *, client: str, expect: Scope) -> Redriven:
    """Move `client`'s dead letters up to `expect.upto` back into the outbox, if there are
    still `expect.count` of them; else CountChanged with the fresh scope."""
    what = f"re-drive the dead letters of {client}"
    async with _locked(store, what) as tx:
        await _lock_clients(tx, [client])
        # Under the lock no retry pass buries rows of this client, so the count holds.
        if not await _confirmed(tx, Q.callbacks_dead_scope, client, expect, what):
            return Redriven(client=client, moved=0, queued=0, first_id=None)
        return await _redrive(tx, client, 0, expect.upto or 0)


async def _redrive(tx: Session, client: str, first: int, last: int) -> Redriven:
    row = await tx.fetch_one(Q.callbacks_redrive, {"client": client, "first": first, "last": last})
    if row is None:  # the statement always answers one row; this is for the type checker
        return Redriven(client=client, moved=0, queued=0, first_id=None)
    first_id = row["first_id"]
    return Redriven(
        client=client,
        moved=int(row["moved"]),
        queued=int(row["queued"]),
        first_id=None if first_id is None else int(first_id),
    )
