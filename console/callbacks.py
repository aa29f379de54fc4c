"""The Callbacks page: the callback outbox and the dead letters, with "retry now" and "re-drive".

What the buttons change is decided in `tidegate.store.callbacks`, which keeps the retry job's
per-client order. This module parses input (with callback_forms.py), bounds every database call
in time, turns every failure into a plain answer (a page notice, or 404/409/422/503 with a
sentence, never a 500) and writes an audit line for every change.

Bulk actions ask first: a POST without `confirm` answers a small form naming the count, whose
submit carries `confirm=N` and `upto` (the newest id counted); if the count changed meanwhile
the store refuses and the form is asked again with the fresh count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import urlencode

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath
from litestar.response import Template
from litestar.types import ControllerRouterHandler

from tidegate.console.auth import actor_of, operator_only
from tidegate.console.callback_forms import (
    FormError,
    PageQuery,
    client_of,
    named_client,
    parse_confirmation,
    parse_query,
    span,
)
from tidegate.errors import StoreError, TidegateError
from tidegate.store import callbacks as cb
from tidegate.store.operators import record_action
from tidegate.store.store import Store

log = logging.getLogger(__name__)

READ_TIMEOUT_S: Final = 3.0
# A change may wait for a retry pass to let go of its client (the store bounds that wait).
CHANGE_TIMEOUT_S: Final = 10.0
PAGE_SIZE: Final = 50
UNREACHABLE: Final = "the database is unreachable: the outbox cannot be shown"
# htmx refreshes the page's live part when an answer carries this event.
CHANGED: Final = {"HX-Trigger": "callbacks-changed"}
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
T = TypeVar("T")


@dataclass
class CallbacksPage:
    query: PageQuery
    summary: list[cb.ClientCallbacks] = field(default_factory=list)
    outbox: list[cb.OutboxEntry] = field(default_factory=list)
    dead: list[cb.DeadLetterEntry] = field(default_factory=list)
    next_after: int | None = None
    next_dead_before: int | None = None
    error: str = ""  # a page-wide problem (bad filter, database down), in words
    detail: str = ""


@dataclass
class Answer:
    """What a POST answers: a fragment, its status, and the audit line of a change made."""

    template: str
    context: dict[str, Any]
    status: int = 200
    audit: tuple[str, str, dict[str, Any]] | None = None  # (action, target, details)


# --- reading -------------------------------------------------------------------------------------


async def load_page(store: Store, query: PageQuery) -> CallbacksPage:
    page = CallbacksPage(query=query)
    try:
        page.summary, page.outbox, page.dead = await asyncio.wait_for(
            asyncio.gather(
                cb.summary(store),
                cb.list_outbox(store, client=query.client, after_id=query.after, limit=PAGE_SIZE),
                cb.list_dead_letters(
                    store, client=query.client, before_id=query.dead_before, limit=PAGE_SIZE
                ),
            ),
            READ_TIMEOUT_S,
        )
    except (TimeoutError, StoreError, OSError) as exc:
        page.error, page.detail = UNREACHABLE, str(exc) or "no answer in time"
        return page
    if len(page.outbox) == PAGE_SIZE:
        page.next_after = page.outbox[-1].id
    if len(page.dead) == PAGE_SIZE:
        page.next_dead_before = page.dead[-1].id
    return page


async def page_for(store: Store, raw: Mapping[str, str]) -> tuple[CallbacksPage, int]:
    """The page for a query string, and its status (422 for a filter it cannot use)."""
    try:
        query = parse_query(raw)
    except FormError as exc:
        return CallbacksPage(query=PageQuery(), error=str(exc)), 422
    return await load_page(store, query), 200


def _query(client: str | None, after: int | None = None, dead_before: int | None = None) -> str:
    pairs = {"client": client, "after": after, "dead_before": dead_before}
    return urlencode({k: v for k, v in pairs.items() if v is not None})


def page_context(page: CallbacksPage) -> dict[str, Any]:
    q = page.query
    links = {
        "live": _query(q.client, q.after, q.dead_before),
        "first_outbox": _query(q.client, None, q.dead_before),
        "next_outbox": _query(q.client, page.next_after, q.dead_before),
        "first_dead": _query(q.client, q.after, None),
        "next_dead": _query(q.client, q.after, page.next_dead_before),
    }
    return {"nav": "callbacks", "page": page, "span": span, "links": links}


# --- changing ------------------------------------------------------------------------------------


def _say(text: str, status: int = 200, kind: str = "ok") -> Answer:
    return Answer("callbacks_message.html", {"text": text, "kind": kind}, status)


class Unreachable(TidegateError):
    """The database did not answer before a change: nothing was changed."""


async def _change(store: Store, work: Callable[[], Awaitable[T]]) -> T:
    """Run a change once the database has answered, bounded in time. Checking first turns
    the usual outage into a certain "nothing was changed" instead of a timeout's "maybe"."""
    await _read(cb.ping(store))
    return await asyncio.wait_for(work(), CHANGE_TIMEOUT_S)


async def _read(work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        raise Unreachable(
            f"the database is unreachable: nothing was changed ({exc or 'no answer in time'})"
        ) from None


def _refused(exc: BaseException) -> Answer:
    """A change that was not made, in words, with the status that says why."""
    if isinstance(exc, cb.CallbackGone):
        return _say(str(exc), 404, "notice")
    if isinstance(exc, cb.CallbacksBusy):
        return _say(str(exc), 409, "notice")
    if isinstance(exc, FormError):
        return _say(str(exc), 422, "error")
    if isinstance(exc, Unreachable):
        return _say(str(exc), 503, "error")
    if isinstance(exc, TimeoutError):
        return _say(
            f"the database did not finish the change within {CHANGE_TIMEOUT_S:.0f} s: reload "
            "the page to see whether it was made",
            503,
            "error",
        )
    return _say(f"the database failed the change ({exc}): reload the page to see", 503, "error")


_FAILURES = (TidegateError, TimeoutError, OSError)


def _done(text: str, action: str, target: str, details: dict[str, Any]) -> Answer:
    return Answer(
        "callbacks_message.html", {"text": text, "kind": "ok"}, 200, (action, target, details)
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def retry_one(store: Store, row_id: int) -> Answer:
    try:
        done = await _change(store, lambda: cb.retry_now(store, row_id))
    except _FAILURES as exc:
        return _refused(exc)
    text = (
        f"callback #{row_id} ({done.task_id}, client {done.client}) is due now, with the "
        f"earlier callbacks of its client: {_plural(done.made_due, 'row')} moved up; the "
        "next retry pass sends them in order"
    )
    details = {"outbox_id": row_id, "task_id": done.task_id, "event_id": done.event_id}
    return _done(text, "callback.retry-now", done.client, {**details, "made_due": done.made_due})


async def retry_bulk(store: Store, form: Mapping[str, str]) -> Answer:
    client: str | None = None
    try:
        client = client_of(form)
        expect = parse_confirmation(form)
        if expect is None:
            scope = await _read(cb.outbox_scope(store, client=client))
            return _confirm("retry", client, scope)
        done = await _change(store, lambda: cb.retry_all_now(store, client=client, expect=expect))
    except cb.CountChanged as exc:
        return _confirm("retry", client, exc.scope, changed=True)
    except _FAILURES as exc:
        return _refused(exc)
    who = f"client {client}" if client else "every client"
    if expect.count == 0:
        return _say(f"the outbox of {who} is empty: nothing to retry", kind="notice")
    text = (
        f"{_plural(expect.count, 'callback')} of {who} are due now "
        f"({done.made_due} moved up, the rest were due already); the next retry pass sends "
        "each client's in order"
    )
    details = {"rows": expect.count, "upto": expect.upto, "made_due": done.made_due}
    return _done(text, "callback.retry-now-bulk", client or "*", details)


async def redrive_one(store: Store, dead_id: int) -> Answer:
    try:
        done = await _change(store, lambda: cb.redrive_dead_letter(store, dead_id))
    except _FAILURES as exc:
        return _refused(exc)
    where = f"outbox row #{done.first_id}" if done.first_id else "its waiting outbox row"
    text = (
        f"dead letter #{dead_id} ({done.task_id}) is back in the outbox as {where}, due now, "
        f"behind the callbacks of client {done.client} already waiting"
    )
    details = {"dead_letter_id": dead_id, "task_id": done.task_id, "event_id": done.event_id}
    return _done(text, "callback.redrive", done.client, {**details, "outbox_id": done.first_id})


async def redrive_bulk(store: Store, form: Mapping[str, str]) -> Answer:
    client: str | None = None
    try:
        client = named_client(form)
        expect = parse_confirmation(form)
        if expect is None:
            scope = await _read(cb.dead_letter_scope(store, client=client))
            return _confirm("redrive", client, scope)
        done = await _change(
            store, lambda: cb.redrive_dead_letters(store, client=client, expect=expect)
        )
    except cb.CountChanged as exc:
        return _confirm("redrive", client, exc.scope, changed=True)
    except _FAILURES as exc:
        return _refused(exc)
    if expect.count == 0:
        return _say(f"client {client} has no dead letters: nothing to re-drive", kind="notice")
    text = (
        f"{_plural(done.moved, 'dead letter')} of client {client} are back in the outbox, "
        "due now, behind its callbacks already waiting"
    )
    details = {"rows": done.moved, "upto": expect.upto, "queued": done.queued}
    return _done(text, "callback.redrive-bulk", client, details)


def _confirm(action: str, client: str | None, scope: cb.Scope, *, changed: bool = False) -> Answer:
    context = {"action": action, "client": client, "scope": scope, "changed": changed}
    return Answer("callbacks_confirm.html", context)


async def audit_answer(request: Request[Any, Any, Any], answer: Answer) -> bool:
    """Write the audit line of the change an answer reports; False if it reports none."""
    if answer.audit is None:
        return False
    action, target, details = answer.audit
    try:
        await record_action(
            request.app.state.store,
            actor=actor_of(request),
            action=action,
            target=target,
            details=details,
        )
    except Exception as exc:  # the change is made; a lost audit line is logged, not hidden
        log.warning("audit of %s on %s not recorded: %s", action, target, exc)
    return True


async def _answer(request: Request[Any, Any, Any], answer: Answer) -> Template:
    headers = dict(CHANGED) if await audit_answer(request, answer) else {}
    return Template(
        template_name=answer.template,
        context=answer.context,
        status_code=answer.status,
        headers=headers,
    )


# --- routes --------------------------------------------------------------------------------------

NO_STORE: Final = {"Cache-Control": "no-store"}


@get("/callbacks", name="callbacks")
async def callbacks_page(request: Request[Any, Any, Any], state: State) -> Template:
    page, status = await page_for(state.store, dict(request.query_params))
    return Template(
        "callbacks.html", context=page_context(page), status_code=status, headers=NO_STORE
    )


@get("/callbacks/live", name="callbacks_live")
async def callbacks_live(request: Request[Any, Any, Any], state: State) -> Template:
    page, status = await page_for(state.store, dict(request.query_params))
    return Template(
        "callbacks_live.html", context=page_context(page), status_code=status, headers=NO_STORE
    )


@post("/callbacks/outbox/{row_id:int}/retry", guards=[operator_only])
async def retry_row(request: Request[Any, Any, Any], row_id: FromPath[int]) -> Template:
    return await _answer(request, await retry_one(request.app.state.store, row_id))


@post("/callbacks/outbox/retry", guards=[operator_only])
async def retry_rows(request: Request[Any, Any, Any], data: Form) -> Template:
    return await _answer(request, await retry_bulk(request.app.state.store, data))


@post("/callbacks/dead/{dead_id:int}/redrive", guards=[operator_only])
async def redrive_row(request: Request[Any, Any, Any], dead_id: FromPath[int]) -> Template:
    return await _answer(request, await redrive_one(request.app.state.store, dead_id))


@post("/callbacks/dead/redrive", guards=[operator_only])
async def redrive_rows(request: Request[Any, Any, Any], data: Form) -> Template:
    return await _answer(request, await redrive_bulk(request.app.state.store, data))


ROUTES: list[ControllerRouterHandler] = [
    callbacks_page,
    callbacks_live,
    retry_row,
    retry_rows,
    redrive_row,
    redrive_rows,
]
