"""API tokens: the credentials of machine clients of the console's JSON API.

A token is 32 random bytes (URL-safe base64, prefixed `tg_` so that secret scanners and people
recognise it). Only its SHA-256 is stored: with that much entropy a plain hash cannot be
reversed by guessing, unlike a password, so no slow hash is needed and a lookup is one indexed
read. The token itself is shown once, by `tidegate token add`, and never again.

Every change writes its audit line in the same transaction as the change (actor "cli" from the
command line). The SQL is in `tokens.sql`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from typing import Final, Literal, get_args

import msgspec

from tidegate.errors import UnknownClient, UsageError
from tidegate.store.operators import record_in
from tidegate.store.queries import Q
from tidegate.store.store import Store

TokenScope = Literal["operator", "viewer", "client"]
SCOPES: Final[tuple[TokenScope, ...]] = get_args(TokenScope)
# The api_tokens table's CHECK, so a bad name is refused with a reason before any SQL.
NAME_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PREFIX: Final = "tg_"
TOKEN_BYTES: Final = 32
# A bearer value longer than this is no token of ours: refuse it before hashing.
MAX_TOKEN_LENGTH: Final = 200


class TokenExists(UsageError):
    """A token in use has that name already; revoke it first, or choose another name."""


class UnknownToken(UsageError):
    """No token in use has that name; `tidegate token list` shows them."""


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A token as `tidegate token list --json` prints it (never the token or its hash)."""

    name: str
    scope: TokenScope
    client: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiToken(msgspec.Struct, frozen=True, kw_only=True):
    """Who a valid bearer token speaks for: what the console's API checks requests against."""

    name: str
    scope: TokenScope
    client: str | None


def check_name(name: str) -> str:
    if not re.match(NAME_RE, name):
        raise UsageError(
            f"token name {name!r} is not valid: 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def generate_token() -> str:
    return PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def add_token(
    store: Store, *, name: str, scope: TokenScope, client: str | None, actor: str
) -> tuple[TokenRecord, str]:
    """Make a token; returns its record and the token itself (to be shown once)."""
    check_name(name)
    if (scope == "client") != (client is not None):
        raise UsageError(
            "a token is scoped to a client (--client NAME), or to --operator or --viewer"
        )
    token = generate_token()
    params = {"name": name, "token_hash": token_hash(token), "scope": scope, "client": client}
    async with store.transaction(what=f"add token {name!r}") as tx:
        if client is not None and await tx.fetch_one(Q.token_client_exists, params) is None:
            raise UnknownClient(
                f"no client {client!r} is registered: add it with `tidegate client add {client}`"
            )
        row = await tx.fetch_one(Q.token_add, params)
        if row is None:
            raise TokenExists(
                f"a token named {name!r} is in use already; revoke it first with "
                f"`tidegate token revoke {name}`, or choose another name"
            )
        details = {"scope": scope, "client": client}
        await record_in(tx, actor=actor, action="token.add", target=name, details=details)
    return msgspec.convert(row, TokenRecord), token


async def list_tokens(store: Store) -> list[TokenRecord]:
    rows = await store.fetch_all(Q.token_list, what="list tokens")
    return [msgspec.convert(r, TokenRecord) for r in rows]


async def revoke_token(store: Store, *, name: str, actor: str) -> TokenRecord:
    async with store.transaction(what=f"revoke token {name!r}") as tx:
        row = await tx.fetch_one(Q.token_revoke, {"name": name})
        if row is None:
            raise UnknownToken(f"no token in use is named {name!r}; see `tidegate token list`")
        record = msgspec.convert(row, TokenRecord)
        details = {"scope": record.scope, "client": record.client}
        await record_in(tx, actor=actor, action="token.revoke", target=name, details=details)
    return record


async def find_token(store: Store, token: str) -> ApiToken | None:
    """The token in use that `token` is, or None (unknown, malformed or revoked)."""
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None  # not one of ours: no query for it
    row = await store.fetch_one(
        Q.token_find, {"token_hash": token_hash(token)}, what="look up an API token"
    )
    return None if row is None else msgspec.convert(row, ApiToken)
