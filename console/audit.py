"""The Audit page: who did what, newest first, paged, filtered by actor, action or target.

The audit log's reader (`tidegate.store.operators.list_actions`) pages by keyset and does not
filter, so filters are applied here over a bounded window of the log: a page scans at most
`SCAN_WINDOW` lines, and when that window ends before the page is full the page says how far
it looked and links on from there. The log grows by one line per operator change, so a window
covers weeks of it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

from litestar import Request, get
from litestar.datastructures import State
from litestar.response import Template
from litestar.types import ControllerRouterHandler

from tidegate.errors import StoreError, TidegateError
from tidegate.store.operators import AuditEntry, list_actions
from tidegate.store.store import Store

READ_TIMEOUT_S: Final = 3.0
PAGE_SIZE: Final = 50
SCAN_BATCH: Final = 500
SCAN_WINDOW: Final = 5000  # lines one filtered page reads at most
MAX_FILTER: Final = 200
UNREACHABLE: Final = "the database is unreachable: the audit log cannot be shown"


class FilterError(TidegateError):
    """A filter the page cannot use; the message names it."""

    exit_code = 2


@dataclass(frozen=True)
class AuditFilters:
    actor: str | None = None  # exactly this username (or "cli")
    action: str | None = None  # starts with this: "callback." finds every callback action
    target: str | None = None  # contains this, case-insensitively
    before: int | None = None  # keyset: the last id of the previous page

    @property
    def filtering(self) -> bool:
        return bool(self.actor or self.action or self.target)

    def matches(self, entry: AuditEntry) -> bool:
        return (
            (self.actor is None or entry.actor == self.actor)
            and (self.action is None or entry.action.startswith(self.action))
            and (self.target is None or self.target.casefold() in entry.target.casefold())
        )


@dataclass
class AuditPage:
    filters: AuditFilters
    entries: list[AuditEntry] = field(default_factory=list)
    next_before: int | None = None  # where the next page starts, if there is more
    scanned: int = 0
    window_ended: bool = False  # the scan stopped at SCAN_WINDOW, not at a full page
    error: str = ""
    detail: str = ""


def parse_filters(query: Mapping[str, str]) -> AuditFilters:
    values = {k: v.strip() for k, v in query.items() if isinstance(v, str) and v.strip()}
    for name in ("actor", "action", "target"):
        if len(values.get(name, "")) > MAX_FILTER:
            raise FilterError(f"{name}: at most {MAX_FILTER} characters")
    before = values.get("before")
    if before is not None and not re.fullmatch(r"[0-9]{1,18}", before):
        raise FilterError(f"before: {before[:40]!r} is not a page position (a line number)")
    return AuditFilters(
        actor=values.get("actor"),
        action=values.get("action"),
        target=values.get("target"),
        before=int(before) if before is not None else None,
    )


async def scan(store: Store, filters: AuditFilters) -> AuditPage:
    """One page of matching lines, reading the log newest first in batches."""
    page = AuditPage(filters=filters)
    cursor = filters.before
    if not filters.filtering:
        page.entries = await list_actions(store, limit=PAGE_SIZE, before_id=cursor)
        page.scanned = len(page.entries)
        if len(page.entries) == PAGE_SIZE:
            page.next_before = page.entries[-1].id
        return page
    while page.scanned < SCAN_WINDOW:
        limit = min(SCAN_BATCH, SCAN_WINDOW - page.scanned)
        batch = await list_actions(store, limit=limit, before_id=cursor)
        for entry in batch:
            page.scanned += 1
            cursor = entry.id
            if filters.matches(entry):
                page.entries.append(entry)
                if len(page.entries) == PAGE_SIZE:
                    page.next_before = cursor
                    return page
        if len(batch) < limit:
            return page  # the beginning of the log
    page.window_ended = True
    page.next_before = cursor
    return page


async def load_page(store: Store, raw: Mapping[str, str]) -> tuple[AuditPage, int]:
    """The page for a query string and its status: 422 for a bad filter; a database that does
    not answer is said on the page."""
    try:
        filters = parse_filters(raw)
    except FilterError as exc:
        return AuditPage(filters=AuditFilters(), error=str(exc)), 422
    try:
        return await asyncio.wait_for(scan(store, filters), READ_TIMEOUT_S), 200
    except (TimeoutError, StoreError, OSError) as exc:
        page = AuditPage(filters=filters, error=UNREACHABLE, detail=str(exc) or "no answer in time")
        return page, 200


def page_context(page: AuditPage) -> dict[str, Any]:
    f = page.filters
    kept = {"actor": f.actor, "action": f.action, "target": f.target}
    base = {k: v for k, v in kept.items() if v}
    return {
        "nav": "audit",
        "page": page,
        "first_query": urlencode(base),
        "next_query": urlencode({**base, "before": page.next_before})
        if page.next_before is not None
        else "",
    }


@get("/audit", name="audit")
async def audit_page(request: Request[Any, Any, Any], state: State) -> Template:
    page, status = await load_page(state.store, dict(request.query_params))
    return Template(
        "audit.html",
        context=page_context(page),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


ROUTES: list[ControllerRouterHandler] = [audit_page]
