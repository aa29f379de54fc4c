"""Statements on one pooled connection (`Session`), and the shapes of their parameters and rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import TupleRow, dict_row

Params = Mapping[str, Any]
Row = dict[str, Any]


class Session:
    """Statements on one connection: inside `Store.transaction`, or one at a time."""

    def __init__(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        self._conn = conn

    async def execute(self, query: str, params: Params | None = None) -> int:
        """Run a statement; returns the rows it changed (or returned)."""
        cur = await self._conn.execute(query, params)
        return cur.rowcount

    async def fetch_one(self, query: str, params: Params | None = None) -> Row | None:
        cur = self._conn.cursor(row_factory=dict_row)
        await cur.execute(query, params)
        return await cur.fetchone()

    async def fetch_all(
        self, query: str, params: Params | None = None, *, prepare: bool | None = None
    ) -> list[Row]:
        cur = self._conn.cursor(row_factory=dict_row)
        await cur.execute(query, params, prepare=prepare)
        return await cur.fetchall()
