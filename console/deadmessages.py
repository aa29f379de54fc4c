"""Message dead letters in the console: the section of the Callbacks page that lists what a
stage set aside (poison: an event dated 9999, a broken submission, a message delivered too many
times), one dead letter's page, and "re-drive"; and the same under the JSON API.

They live on the bus (`tidegate.bus.deadletters`), so this reads NATS, not the database: every
call is bounded in time and a NATS outage is said in words (503), never a 500. A re-drive is
an operator's change: CSRF-checked like every form, and written to the audit log.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery, JSONBody
from litestar.response import Template
from litestar.status_codes import HTTP_200_OK
from litestar.types import ControllerRouterHandler
from nats.js import JetStreamContext

from tidegate.bus import deadletters as dl
from tidegate.console.api_auth import staff_only
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.auth import operator_only
from tidegate.console.callbacks import Answer, audit_answer
from tidegate.errors import DeadLetterNotFound, RedriveRefused, TidegateError

READ_TIMEOUT_S: Final = 3.0
CHANGE_TIMEOUT_S: Final = 10.0
PAGE_SIZE: Final = 50
PREVIEW: Final = 160  # characters of a payload in the list
STAGES: Final = ("submit", "route", "ready", "work", "event", "heartbeat", "notify")
UNREACHABLE: Final = "NATS is unreachable: the message dead letters cannot be shown"
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
CHANGED: Final = {"HX-Trigger": "callbacks-changed"}
NO_STORE: Final = {"Cache-Control": "no-store"}


class FormError(TidegateError):
    """A query field the console cannot use; the message names it."""

    exit_code = 2


@dataclass(frozen=True)
class MessagesQuery:
    client: str | None = None
    stage: str | None = None
    before: int | None = None  # keyset: the last sequence of the previous page


@dataclass
class MessagesPage:
    query: MessagesQuery
    dead: list[dl.MessageDeadLetter] = field(default_factory=list)
    next_before: int | None = None
    error: str = ""
    detail: str = ""


def parse_query(raw: Mapping[str, str]) -> MessagesQuery:
    client = (raw.get("client") or "").strip() or None
    if client is not None and not re.fullmatch(r"[!-~]{1,200}", client):
        raise FormError(f"client: {client[:80]!r} is not a client name")
    stage = (raw.get("stage") or "").strip() or None
    if stage is not None and stage not in STAGES:
        raise FormError(f"stage: {stage[:40]!r} is not one of {', '.join(STAGES)}")
    before_text = (raw.get("before") or "").strip()
    before = None
    if before_text:
        if not re.fullmatch(r"[0-9]{1,18}", before_text) or int(before_text) < 1:
            raise FormError(f"before: {before_text[:40]!r} is not a sequence (1 or more)")
        before = int(before_text)
    return MessagesQuery(client=client, stage=stage, before=before)


def _js(request: Request[Any, Any, Any]) -> JetStreamContext | None:
    js: JetStreamContext | None = request.app.state.link.js
    return js


async def load_page(
    js: JetStreamContext | None, raw: Mapping[str, str]
) -> tuple[MessagesPage, int]:
    """The section for a query string, and its status (422 for a filter it cannot use)."""
    try:
        query = parse_query(raw)
    except FormError as exc:
        return MessagesPage(query=MessagesQuery(), error=str(exc)), 422
    page = MessagesPage(query=query)
    if js is None:
        page.error, page.detail = UNREACHABLE, "not connected"
        return page, 503
    try:
        page.dead = await asyncio.wait_for(
            dl.list_dead(
                js,
                stage=query.stage,
                client=query.client,
                limit=PAGE_SIZE,
                before=query.before,
            ),
            READ_TIMEOUT_S,
        )
    except (TimeoutError, OSError, Exception) as exc:  # nats' errors share no base with ours
        page.error, page.detail = UNREACHABLE, str(exc) or "no answer in time"
        return page, 503
    if len(page.dead) == PAGE_SIZE:
        page.next_before = page.dead[-1].seq
    return page, 200


def preview(payload: bytes, width: int = PREVIEW) -> str:
    text = " ".join(payload.decode(errors="replace").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _say(text: str, status: int = 200, kind: str = "ok") -> Answer:
    return Answer("callbacks_message.html", {"text": text, "kind": kind}, status)


async def redrive_one(js: JetStreamContext | None, seq: int, *, new_id: bool) -> Answer:
    """Re-drive one message dead letter; the answer says what happened, in words."""
    if js is None:
        return _say(f"{UNREACHABLE.split(':')[0]}: nothing was changed", 503, "error")
    try:
        before = await asyncio.wait_for(dl.show_dead(js, seq), READ_TIMEOUT_S)
        if before is None:
            raise DeadLetterNotFound(f"message dead letter {seq} is no longer there")
        done = await asyncio.wait_for(dl.redrive(js, seq, new_id=new_id), CHANGE_TIMEOUT_S)
    except DeadLetterNotFound as exc:
        return _say(f"{exc}: re-driven meanwhile, or aged out", 404, "notice")
    except RedriveRefused as exc:
        return _say(str(exc), 409, "notice")
    except TimeoutError:
        return _say(
            f"NATS did not answer within {CHANGE_TIMEOUT_S:.0f} s: reload the page to see "
            "whether the dead letter was re-driven",
            503,
            "error",
        )
    except Exception as exc:  # nats' own errors: said, not a 500
        return _say(f"NATS failed the re-drive ({exc}): nothing was changed", 503, "error")
    text = (
        f"message dead letter {seq} ({before.stage}, client {before.client or '?'}) is back on "
        f"{done.subject} as {done.stream} #{done.stream_seq}"
    )
    details = {
        "seq": seq,
        "stage": before.stage,
        "subject": done.subject,
        "stream": done.stream,
        "stream_seq": done.stream_seq,
        "new_id": new_id,
        "reason": before.reason[:200],
    }
    target = before.client or "?"
    return Answer(
        "callbacks_message.html",
        {"text": text, "kind": "ok"},
        200,
        ("message.redrive", target, details),
    )


def _new_id(values: Mapping[str, str]) -> bool:
    return (values.get("new_id") or "").strip().lower() in {"1", "true", "on", "yes"}


# --- pages ---------------------------------------------------------------------------------------


def _context(page: MessagesPage) -> dict[str, Any]:
    q = page.query
    base = {"client": q.client, "stage": q.stage}
    return {
        "page": page,
        "preview": preview,
        "stages": STAGES,
        "next": {**base, "before": page.next_before},
        "filters": {k: v for k, v in base.items() if v},
    }


@get("/callbacks/messages", name="callbacks_messages")
async def messages_section(request: Request[Any, Any, Any]) -> Template:
    page, status = await load_page(_js(request), dict(request.query_params))
    return Template(
        "callbacks_messages.html", context=_context(page), status_code=status, headers=NO_STORE
    )


@get("/callbacks/messages/{seq:int}", name="message_dead_letter")
async def message_page(request: Request[Any, Any, Any], seq: FromPath[int]) -> Template:
    js = _js(request)
    dead, error, status = None, "", 200
    if js is None:
        error, status = UNREACHABLE, 503
    else:
        try:
            dead = await asyncio.wait_for(dl.show_dead(js, seq), READ_TIMEOUT_S)
        except Exception as exc:
            error, status = f"{UNREACHABLE} ({exc or 'no answer in time'})", 503
        if dead is None and not error:
            error, status = f"no message dead letter {seq}: re-driven, aged out, or never was", 404
    context = {"nav": "callbacks", "dead": dead, "seq": seq, "error": error}
    return Template(
        "message_dead_letter.html", context=context, status_code=status, headers=NO_STORE
    )


@post("/callbacks/messages/{seq:int}/redrive", guards=[operator_only])
async def redrive_page(request: Request[Any, Any, Any], seq: FromPath[int], data: Form) -> Template:
    answer = await redrive_one(_js(request), seq, new_id=_new_id(data))
    headers = dict(CHANGED) if await audit_answer(request, answer) else {}
    return Template(
        template_name=answer.template,
        context=answer.context,
        status_code=answer.status,
        headers=headers,
    )


ROUTES: list[ControllerRouterHandler] = [messages_section, message_page, redrive_page]


# --- JSON API ------------------------------------------------------------------------------------


class MessageDeadLetterList(msgspec.Struct, frozen=True, kw_only=True):
    dead_letters: list[dl.MessageDeadLetterJson]  # newest first
    next_before: int | None  # `before` for the next page


class RedriveMessage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    new_id: bool = False  # publish under a new message id (see `tidegate dead-letters redrive`)


class MessageRedriven(msgspec.Struct, frozen=True, kw_only=True):
    message: str


@get(
    "/dead-letters/messages",
    guards=[staff_only],
    summary="Message dead letters (poison set aside by a stage), newest first",
    responses=errors(401, 403, 422, 503),
)
async def api_list(
    request: Request[Any, Any, Any],
    client: FromQuery[str | None] = None,
    stage: FromQuery[str | None] = None,
    before: FromQuery[int | None] = None,
) -> MessageDeadLetterList:
    raw = {
        k: str(v)
        for k, v in {"client": client, "stage": stage, "before": before}.items()
        if v is not None
    }
    page, status = await load_page(_js(request), raw)
    if page.error:
        raise ApiError(status, f"{page.error} ({page.detail})" if page.detail else page.error)
    return MessageDeadLetterList(
        dead_letters=[dl.MessageDeadLetterJson.of(d) for d in page.dead],
        next_before=page.next_before,
    )


@get(
    "/dead-letters/messages/{seq:int}",
    guards=[staff_only],
    summary="One message dead letter with its reason, headers and payload",
    responses=errors(401, 403, 404, 503),
)
async def api_show(request: Request[Any, Any, Any], seq: FromPath[int]) -> dl.MessageDeadLetterJson:
    js = _js(request)
    if js is None:
        raise ApiError(503, UNREACHABLE)
    try:
        dead = await asyncio.wait_for(dl.show_dead(js, seq), READ_TIMEOUT_S)
    except Exception as exc:
        raise ApiError(503, f"{UNREACHABLE} ({exc or 'no answer in time'})") from None
    if dead is None:
        raise ApiError(404, f"no message dead letter {seq}: re-driven, aged out, or never was")
    return dl.MessageDeadLetterJson.of(dead)


@post(
    "/dead-letters/messages/{seq:int}/redrive",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="Re-drive one message dead letter to its original subject",
    responses=errors(400, 401, 403, 404, 409, 503),
)
async def api_redrive(
    request: Request[Any, Any, Any], seq: FromPath[int], data: JSONBody[RedriveMessage]
) -> MessageRedriven:
    answer = await redrive_one(_js(request), seq, new_id=data.new_id)
    await audit_answer(request, answer)
    text = str(answer.context["text"])
    if answer.status >= 400:
        raise ApiError(answer.status, text)
    return MessageRedriven(message=text)


API_ROUTES: list[ControllerRouterHandler] = [api_list, api_show, api_redrive]
