"""The client form (add and edit): every field a string from the browser, checked here.

Shared by the Clients page and the JSON API, so both refuse the same values with the same
words, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tidegate.errors import TidegateError, UsageError
from tidegate.signing import new_secret
from tidegate.store.store import ClientChanges
from tidegate.wire import (
    DEFAULT_CALLBACK_HELD_MAX,
    NAME_RE,
    ClientRecord,
    check_command_lists,
    command_list,
)

CSRF_FIELD = "_csrf_token"  # the form field Litestar's CSRF middleware reads


class ClientForm(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The add/edit form: every field a string from the browser, checked here, not trusted."""

    name: Annotated[str, Meta(pattern=NAME_RE)] | None = None
    sensitive: bool = False
    transport: str = "none"  # none | http | nats
    callback_url: Annotated[str, Meta(pattern=r"^https?://\S+$")] | None = None
    callback_secret: str | None = None
    new_secret: bool = False
    max_running: Annotated[int, Meta(ge=0)] | None = None
    max_submit_per_s: Annotated[float, Meta(gt=0)] | None = None
    default_pool: Annotated[str, Meta(pattern=NAME_RE)] = "default"
    callback_batch_max: Annotated[int, Meta(ge=1, le=1000)] = 1
    callback_held_max: Annotated[int, Meta(ge=1, le=1_000_000)] = DEFAULT_CALLBACK_HELD_MAX
    # Empty: the stream-wide TIDEGATE_CLIENT_BUFFER_MAX (also the ceiling, checked on save).
    buffer_max: Annotated[int, Meta(ge=1)] | None = None
    # Its command policy (`tidegate.wire.command_policy`); None: any. In the page, one entry a
    # line in a textarea, and a `no_shell` checkbox (absent from a post: shell stays allowed).
    allowed_executables: tuple[str, ...] | None = None
    allowed_cwds: tuple[str, ...] | None = None
    allow_shell: bool = True


# The page's textareas: one entry a line.
LIST_FIELDS = ("allowed_executables", "allowed_cwds")


class FormError(TidegateError):
    """A form field the console cannot use; the message names the field."""

    exit_code = 2


def parse_form(raw: Mapping[str, str]) -> ClientForm:
    # `_csrf_token` rides along in plain forms; the CSRF middleware has checked it already.
    values: dict[str, Any] = {
        k: v.strip() for k, v in raw.items() if v.strip() != "" and k != CSRF_FIELD
    }
    for flag in ("sensitive", "new_secret"):
        values[flag] = values.get(flag) in ("on", "true", "1")
    # A checkbox that refuses: left unticked (or left out by an older page), shell stays allowed.
    values["allow_shell"] = values.pop("no_shell", None) not in ("on", "true", "1")
    for field in LIST_FIELDS:
        if field in values:
            values[field] = values[field].splitlines()
    return form_from(values, strict=False)


def form_from(values: Mapping[str, Any], *, strict: bool = True) -> ClientForm:
    """A checked form from field values (strings from a browser: `strict=False`)."""
    try:
        form = msgspec.convert(values, ClientForm, strict=strict)
    except msgspec.ValidationError as exc:
        raise FormError(_field_message(str(exc))) from None
    # The rules across fields, which the struct's annotations cannot say.
    if form.transport not in ("none", "http", "nats"):
        raise FormError("callback transport must be none, http or nats")
    if form.transport == "http" and not form.callback_url:
        raise FormError("an HTTP callback needs a URL (http:// or https://)")
    executables = command_list(form.allowed_executables)
    cwds = command_list(form.allowed_cwds)
    try:
        check_command_lists(executables, cwds)
    except UsageError as exc:
        raise FormError(str(exc)) from None
    return msgspec.structs.replace(form, allowed_executables=executables, allowed_cwds=cwds)


def _field_message(text: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.max_running`": name the field plainly.
    where = text.rpartition("at `$.")
    if where[1]:
        return f"{where[2].rstrip('`')}: {where[0].removesuffix(' - ').strip()}"
    return text


def changes_of(form: ClientForm, current: ClientRecord | None) -> ClientChanges:
    changes = ClientChanges(
        sensitive=form.sensitive,
        callback_url=form.callback_url if form.transport == "http" else None,
        callback_nats=form.transport == "nats",
        max_running=form.max_running,
        max_submit_per_s=form.max_submit_per_s,
        default_pool=form.default_pool,
        callback_batch_max=form.callback_batch_max,
        callback_held_max=form.callback_held_max,
        buffer_max=form.buffer_max,
        allowed_executables=form.allowed_executables,
        allowed_cwds=form.allowed_cwds,
        allow_shell=form.allow_shell,
    )
    if form.transport == "http":
        secret = form.callback_secret or (current.callback_secret if current else None)
        if form.new_secret or not secret:
            secret = new_secret()
        changes["callback_secret"] = secret
    return changes
