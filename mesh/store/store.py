"""The PostgreSQL store: the task projection, clients, and partition retention.

A narrow interface over a connection pool; every statement lives in `queries.sql` or
`outbox.sql`. Connections run in autocommit so that a single statement is a single round trip
and a single commit; multi-statement work opens an explicit transaction (`Store.transaction`).
The query helpers (`execute`, `fetch_one`, `fetch_all`) are public so that the driver's other
tables (the callback outbox) share this pool without reaching into it. What a database error
means (retry or give up) is in failures.py; statements on one connection in session.py.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Self, Unpack

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from tidegate.errors import StoreError, UnknownClient, UsageError
from tidegate.store.failures import RowRefused, failing, missing_partition, permanent, unwritable
from tidegate.store.pace import PaceLane
from tidegate.store.queries import Q
from tidegate.store.rows import (
    ClientChanges,
    ClientHealth,
    TaskRecord,
    TaskRow,
    TaskSearch,
    coalesce,
    columns,
    task_record,
)
from tidegate.store.session import Params, Row, Session
from tidegate.wire import STATE_RANK, ClientRecord, TaskSpec

__all__ = [
    "ClientChanges",
    "Params",
    "Row",
    "RowRefused",
    "Session",
    "Store",
    "TaskRecord",
    "TaskRow",
    "permanent",
    "unwritable",
]

log = logging.getLogger(__name__)

_CLIENT_FIELDS = frozenset(ClientChanges.__optional_keys__ | ClientChanges.__required_keys__)

# How long a statement waits for a pooled connection before it fails (psycopg_pool's default
# is 30 s). While the database is down every wait ends here: shorter than every keep-alive of a
# component that holds JetStream messages meanwhile (projector, notifier: a third of their ack
# waits, 10 s and more), so a retry loop comes round, logs and keeps its messages alive, and a
# driver asked to stop is not held for half a minute.
POOL_WAIT_S = 5.0


class Store:
    """Everything Tidegate reads from and writes to PostgreSQL."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        name: str = "tidegate",
        pool_wait_s: float = POOL_WAIT_S,
        pace: PaceLane | None = None,
    ) -> None:
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name=name,
            timeout=pool_wait_s,
            kwargs={
                "autocommit": True,
                "application_name": name,
                "options": session_options(conninfo),
            },
        )
        # Days whose partition this Store has created or seen committed: skip the call. Shared
        # with the `paced` views of this Store (updated in place, never rebound).
        self._days: set[date] = set()
        # Every connection checkout (one statement in autocommit, or one transaction) waits
        # for a turn of this lane: one commit each, counted against the driver's commit cap.
        self._pace = pace

    def paced(self, lane: PaceLane | None) -> Store:
        """This Store (same pool, same partition cache) with every transaction taking a turn
        of `lane`; None: unpaced. Close only the original."""
        view = copy.copy(self)
        view._pace = lane
        return view

    async def open(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Open the pool; with `wait`, fail unless `min_size` connections come up in time."""
        with failing("open the database pool"):
            await self._pool.open(wait=wait, timeout=timeout)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- query helpers -----------------------------------------------------------------------
    # `what` names the operation in a StoreError (see `failing`). There is no way to splice a
    # value into the text: parameters always travel apart from the statement.

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._pace is None:
            yield
        else:
            async with self._pace.turn():
                yield

    @asynccontextmanager
    async def _session(self, what: str | None) -> AsyncIterator[Session]:
        with failing(what):
            async with self._turn(), self._pool.connection() as conn:
                yield Session(conn)

    @asynccontextmanager
    async def transaction(self, *, what: str | None = None) -> AsyncIterator[Session]:
        """One connection and one transaction: committed when the block ends, rolled back if
        it raises.

        The commit cap's turn is taken first and held until the transaction ends, as for a
        single statement: whoever waits for a turn holds nothing else. A transaction that
        waited for its turn at the commit, holding its connection and its row locks, could
        wait forever: seen at a cap of 3/s, a notifier term waiting for an outbox write's share
        lock held the callback lane's only turn in flight, and the outbox write waited for
        that turn. A long transaction (the callback retry job sends while it holds its claim)
        keeps its place in the window all along; the lanes' shares bound how much of the
        window one writer can hold (pace.py). A rolled-back transaction is counted too.
        """
        with failing(what):
            # Left in reverse: commit or rollback, the connection back to the pool, the turn.
            async with self._turn(), self._pool.connection() as conn, conn.transaction():
                yield Session(conn)

    async def execute(
        self, query: str, params: Params | None = None, *, what: str | None = None
    ) -> int:
        """One statement, committed on its own; returns the rows it changed (or returned)."""
        async with self._session(what) as session:
            return await session.execute(query, params)

    async def fetch_one(
        self, query: str, params: Params | None = None, *, what: str | None = None
    ) -> Row | None:
        """The first row as a dict by column name, or None."""
        async with self._session(what) as session:
            return await session.fetch_one(query, params)

    async def fetch_all(
        self,
        query: str,
        params: Params | None = None,
        *,
        what: str | None = None,
        prepare: bool | None = None,
    ) -> list[Row]:
        """`prepare=False` for a statement with optional filters (`%(x)s IS NULL OR …`): a
        prepared statement's generic plan cannot drop the absent ones and use an index."""
        async with self._session(what) as session:
            return await session.fetch_all(query, params, prepare=prepare)

    # --- the projection ----------------------------------------------------------------------

    async def upsert_tasks(self, rows: Sequence[TaskRow]) -> int:
        """Write a batch in one statement and one commit; returns the rows inserted or changed.

        Rows that would not move a task forward are skipped by the database, so the count can
        be lower than `len(rows)`. Database errors propagate (psycopg.Error): the caller keeps
        the batch and retries with backoff.
        """
        # Duplicate keys would make ON CONFLICT fail the whole batch ("cannot affect row a
        # second time") on every retry, a poison batch: fold them even if the caller forgot.
        # Key order makes concurrent writers lock rows in one order, so they cannot deadlock.
        batch = sorted(coalesce(rows), key=lambda r: (r.submitted_on, r.task_id, r.run))
        return await self._write(batch)

    async def upsert_task_one(self, row: TaskRow) -> int:
        """The same monotone upsert for a single row: one statement, one commit."""
        return await self._write([row])

    async def _write(self, batch: Sequence[TaskRow]) -> int:
        if not batch:
            return 0
        params = columns(batch)
        try:
            return await self._upsert(params, {r.submitted_on for r in batch})
        except psycopg.errors.CheckViolation as exc:
            if not missing_partition(exc):
                raise
            # Another driver's retention dropped a day we had cached; ensure it afresh once.
            log.warning("a cached partition is gone, re-creating: %s", exc)
            self._days.clear()
            return await self._upsert(params, {r.submitted_on for r in batch})

    async def _upsert(self, params: dict[str, list[Any]], days: set[date]) -> int:
        # Tomorrow's partition is made a day early: creating one takes an exclusive lock on
        # `tasks` and re-plans every session's statements, the last thing wanted at midnight.
        today = datetime.now(UTC).date()
        wanted = days | {d + timedelta(days=1) for d in days if d >= today}
        new_days = sorted(wanted - self._days)
        if not new_days:
            return await self.execute(Q.upsert_tasks, params)
        async with self.transaction() as tx:
            await tx.execute(Q.ensure_partitions, {"days": new_days})
            written = await tx.execute(Q.upsert_tasks, params)
        # Only after the commit: a rolled-back transaction took its new partition with it.
        self._days.update(new_days)
        return written

    async def ensure_partitions(self, days: Iterable[date]) -> None:
        """Create the partitions of `days` ahead of need (e.g. tomorrow's, before midnight)."""
        wanted = sorted(set(days))
        async with self.transaction(what="ensure_partitions") as tx:
            await tx.execute(Q.ensure_partitions, {"days": wanted})
        self._days.update(wanted)

    async def drop_partitions_before(self, day: date) -> int:
        """Retention: drop the daily partitions of every day before `day`; returns how many."""
        row = await self.fetch_one(
            Q.drop_partitions_before, {"day": day}, what="drop_partitions_before"
        )
        self._days.difference_update([d for d in self._days if d < day])
        return int(row["dropped"]) if row else 0

    # --- reading tasks -----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        row = await self.fetch_one(Q.get_task, {"task_id": task_id}, what="get_task")
        return None if row is None else task_record(row)

    async def search_tasks(self, search: TaskSearch) -> list[TaskRecord]:
        """One page of tasks, newest first, after `search.after` (keyset: no OFFSET)."""
        after_at, after_id = search.after or (None, None)
        params = {
            "client": search.client,
            "state": search.state,
            "pool": search.pool,
            "key_prefix": _like_prefix(search.key) if search.key else None,
            "since": search.since,
            "until": search.until,
            "after_at": after_at,
            "after_id": after_id,
            "limit": search.limit,
        }
        rows = await self.fetch_all(Q.search_tasks, params, what="search_tasks", prepare=False)
        return [task_record(r) for r in rows]

    async def task_runs(self, task_id: str) -> list[TaskRecord]:
        """Every run of a task id, latest first (a key reused after the dedup window, a retry)."""
        rows = await self.fetch_all(Q.task_runs, {"task_id": task_id}, what="task_runs")
        return [task_record(r) for r in rows]

    async def task_spec(self, task_id: str) -> TaskSpec | None:
        """The spec of the task's latest run that has one (what a retry submits again)."""
        row = await self.fetch_one(Q.task_spec, {"task_id": task_id}, what="task_spec")
        return None if row is None else msgspec.convert(row["spec"], TaskSpec)

    async def list_tasks(
        self, *, client: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[TaskRecord]:
        """Tasks newest first, optionally of one client and/or in one state."""
        if state is not None and state not in STATE_RANK:
            raise UsageError(f"unknown state {state!r}; one of {', '.join(STATE_RANK)}")
        if limit < 0:
            raise UsageError(f"limit must be 0 or more, not {limit}")
        if client is None:
            query = Q.list_tasks if state is None else Q.list_tasks_by_state
        else:
            query = Q.list_tasks_by_client if state is None else Q.list_tasks_by_client_state
        params = {"client": client, "state": state, "limit": limit}
        rows = await self.fetch_all(query, params, what="list_tasks")
        return [task_record(r) for r in rows]

    async def count_tasks_by_state(self, *, since: date | None = None) -> dict[str, int]:
        """Tasks per state (submitted on `since` or later, if given).

        Every known state is present, zeros included, so a gauge drops to 0 instead of
        vanishing. Without `since` this counts every partition: not for a hot scrape loop.
        """
        counts = dict.fromkeys(STATE_RANK, 0)
        rows = await self.fetch_all(
            Q.count_tasks_by_state, {"since": since}, what="count_tasks_by_state"
        )
        for row in rows:
            counts[str(row["state"])] = int(row["n"])
        return counts

    # --- clients -----------------------------------------------------------------------------

    async def add_client(self, client: ClientRecord) -> ClientRecord:
        """Register a client; returns it as stored (with its timestamps)."""
        params = msgspec.structs.asdict(client)
        for column in ("allowed_executables", "allowed_cwds"):  # psycopg: a list is an array
            if params[column] is not None:
                params[column] = list(params[column])
        row = await self.fetch_one(Q.add_client, params, what=f"add client {client.name!r}")
        if row is None:
            raise StoreError(
                f"client {client.name!r} already exists; change it with "
                f"`tidegate client set {client.name} ...`"
            )
        return msgspec.convert(row, ClientRecord)

    async def get_client(self, name: str) -> ClientRecord | None:
        row = await self.fetch_one(Q.get_client, {"name": name}, what="get_client")
        return None if row is None else msgspec.convert(row, ClientRecord)

    async def list_clients(self) -> list[ClientRecord]:
        rows = await self.fetch_all(Q.list_clients, what="list_clients")
        return [msgspec.convert(r, ClientRecord) for r in rows]

    async def client_health(self) -> dict[str, ClientHealth]:
        """Failures of the last hour and callback backlog, per client (the console)."""
        rows = await self.fetch_all(Q.client_health, what="client_health")
        return {r["client"]: msgspec.convert(r, ClientHealth) for r in rows}

    async def update_client(self, name: str, **changes: Unpack[ClientChanges]) -> ClientRecord:
        """Change some columns of a client; returns the client as stored afterwards."""
        unknown = changes.keys() - _CLIENT_FIELDS
        if unknown:
            raise StoreError(
                f"update client {name!r}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(_CLIENT_FIELDS))}"
            )
        # Naming one callback transport switches off the other instead of tripping the
        # clients_one_callback constraint; naming both leaves the choice to the caller.
        if changes.get("callback_url") is not None and "callback_nats" not in changes:
            changes["callback_nats"] = False
        if changes.get("callback_nats") and "callback_url" not in changes:
            changes["callback_url"] = None
        if not changes:
            current = await self.get_client(name)
            if current is None:
                raise UnknownClient(f"no client named {name!r}; add it with `tidegate client add`")
            return current
        try:
            valid = msgspec.convert(changes, ClientChanges)
        except msgspec.ValidationError as exc:
            raise StoreError(f"update client {name!r}: {exc}") from None
        row = await self.fetch_one(
            Q.update_client,
            {"name": name, "changes": msgspec.json.encode(valid).decode()},
            what=f"update client {name!r}",
        )
        if row is None:
            raise UnknownClient(f"no client named {name!r}; add it with `tidegate client add`")
        return msgspec.convert(row, ClientRecord)

    async def rotate_client_secret(self, name: str, secret: str, overlap_s: float) -> ClientRecord:
        """`secret` signs from now on, the one it replaces also for `overlap_s` more."""
        row = await self.fetch_one(
            Q.rotate_client_secret,
            {"name": name, "secret": secret, "overlap_s": overlap_s},
            what=f"rotate the secret of client {name!r}",
        )
        if row is None:
            raise UnknownClient(f"no client named {name!r}; add it with `tidegate client add`")
        return msgspec.convert(row, ClientRecord)


def session_options(conninfo: str) -> str:
    """The connection's `options` with the session time zone set to UTC at connect time.

    Times read back carry UTC whatever the server's zone, so the JSON shape is stable. Set in
    the startup packet rather than by a `SET` on each new connection: a `SET` is a transaction
    of its own, one the commit cap would have to count.
    """
    current = str(conninfo_to_dict(conninfo).get("options") or "")
    return f"{current} -c TimeZone=UTC".strip()


def _like_prefix(text: str) -> str:
    """`text` as a LIKE prefix pattern: its own % and _ match only themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
