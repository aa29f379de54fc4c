"""The Callbacks page's input: its query string (filter and keyset pages) and a bulk action's
confirmation, each refused with a sentence naming the field; and durations as shown."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tidegate.errors import TidegateError
from tidegate.store import callbacks as cb
from tidegate.wire import NAME_RE


class FormError(TidegateError):
    """A field the console cannot use; the message names it."""

    exit_code = 2


@dataclass(frozen=True)
class PageQuery:
    client: str | None = None
    after: int | None = None  # outbox keyset: the last id of the previous page
    dead_before: int | None = None  # dead letters keyset: the last id of the previous page


def client_of(values: Mapping[str, str]) -> str | None:
    text = (values.get("client") or "").strip()
    if not text:
        return None
    if not re.match(NAME_RE, text):
        raise FormError(f"client: {text[:80]!r} is not a client name (letters, digits, _ or -)")
    return text


def named_client(values: Mapping[str, str]) -> str:
    client = client_of(values)
    if client is None:
        raise FormError("client: name the client whose callbacks to act on")
    return client


def _count(values: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    text = (values.get(name) or "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text) or int(text) < minimum:
        raise FormError(f"{name}: {text[:40]!r} is not a whole number of at least {minimum}")
    return int(text)


def parse_query(query: Mapping[str, str]) -> PageQuery:
    return PageQuery(
        client=client_of(query),
        after=_count(query, "after", minimum=0),
        dead_before=_count(query, "dead_before", minimum=1),
    )


def parse_confirmation(form: Mapping[str, str]) -> cb.Scope | None:
    """The scope the operator confirmed, or None when the form only asks for the count."""
    confirm = _count(form, "confirm", minimum=0)
    if confirm is None:
        return None
    upto = _count(form, "upto", minimum=1)
    if confirm > 0 and upto is None:
        raise FormError("upto: a confirmation needs the newest id it counted")
    return cb.Scope(count=confirm, upto=upto)


def span(seconds: float) -> str:
    """A duration as an operator reads it: 4 s, 12 min, 3.5 h, 2 d."""
    s = abs(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
