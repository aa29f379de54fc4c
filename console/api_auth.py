"""Who calls the JSON API: API tokens (`Authorization: Bearer …`) beside the pages' sessions.

- Under `/api/v1/`, a request with an `Authorization` header is authenticated by that token
  alone (never by a cookie it may also carry); one without is authenticated by its session, as
  the pages are. Elsewhere the header means nothing: tokens open the API, not the pages.
- CSRF: a request authenticated by a token is exempt, and only such a request. A browser
  attaches cookies to a forged cross-site request, never an `Authorization` header, so a
  token carries no ambient authority to borrow; a cookie session under `/api/v1/` is checked
  as every page is.
- A token is looked up by its SHA-256 in PostgreSQL, through `TokenCache`: one read per token
  per `AccessConfig.token_cache_s`, so a revoked token is refused within that long.
- An operator or viewer token becomes an `Operator` named `token:NAME`, so every guard of the
  pages applies to it unchanged; a client token becomes a `ClientCaller`, which the guards
  here confine to its own client's tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import DefineMiddleware, MiddlewareProtocol
from litestar.middleware.csrf import CSRFMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from tidegate.console.auth import ClientCaller, Operator, operator_only
from tidegate.console.security import TokenRefused, is_api_v1
from tidegate.errors import StoreError, TidegateError
from tidegate.store.store import Store
from tidegate.store.tokens import ApiToken, find_token, token_hash

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S: Final = 2.0
CACHE_MAX: Final = 10_000
TOKEN_PREFIX: Final = "token:"  # how the audit log names a token's holder


class TokensUnavailable(TidegateError):
    """The database did not answer and this token was not seen valid lately: it cannot be
    checked now (503); try again shortly."""


@dataclass(frozen=True, slots=True)
class _Known:
    token: ApiToken | None  # None: no token in use has this hash
    checked_at: float


class TokenCache:
    """Token lookups by hash, each trusted for `ttl_s`; bounded, oldest first out.

    Unknown tokens are remembered too, so a client retrying with a wrong token costs one read
    per `ttl_s`, not one per request. During a database outage a token seen valid within
    `grace_s` keeps working: nothing can be revoked while the database is down anyway, and HTTP
    submission needs only NATS.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        grace_s: float,
        max_entries: int = CACHE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.max_entries = max_entries
        self._clock = clock
        self._known: OrderedDict[str, _Known] = OrderedDict()

    async def lookup(self, store: Store, token: str) -> ApiToken | None:
        key = token_hash(token)  # never the token itself in memory longer than the request
        now = self._clock()
        known = self._known.get(key)
        if known is not None and now - known.checked_at < self.ttl_s:
            return known.token
        try:
            found = await asyncio.wait_for(find_token(store, token), LOOKUP_TIMEOUT_S)
        except (StoreError, TimeoutError, OSError) as exc:
            if (
                known is not None
                and known.token is not None
                and now - known.checked_at < self.grace_s
            ):
                return known.token
            log.warning("API token not checked: the database did not answer (%s)", exc or "timeout")
            raise TokensUnavailable(
                "the database is unreachable: this API token cannot be checked now; "
                "try again shortly"
            ) from None
        self._known.pop(key, None)
        self._known[key] = _Known(found, now)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)
        return found


def caller_of(token: ApiToken) -> Operator | ClientCaller:
    name = TOKEN_PREFIX + token.name
    if token.scope == "client" and token.client is not None:
        return ClientCaller(username=name, client=token.client)
    return Operator(username=name, role="operator" if token.scope == "operator" else "viewer")


def bearer_token(header: str) -> str:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise TokenRefused("the Authorization header must be `Bearer <token>`")
    return value.strip()


class BearerOrSession(MiddlewareProtocol):
    """The app's authentication: an API token under /api/v1/, else the session (`session` is
    the session middleware, built around the same inner app)."""

    def __init__(self, app: ASGIApp, session: DefineMiddleware) -> None:
        self.app = app
        self.by_session = session(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP and is_api_v1(scope["path"]):
            header = Headers.from_scope(scope).get("authorization")
            if header is not None:
                state = scope["litestar_app"].state
                cache: TokenCache = state.tokens
                found = await cache.lookup(state.store, bearer_token(header))
                if found is None:
                    raise TokenRefused("this API token is unknown or revoked")
                scope["user"] = caller_of(found)
                scope["auth"] = found  # what marks the request as token-authenticated
                await self.app(scope, receive, send)
                return
        await self.by_session(scope, receive, send)


def by_token(scope: Scope) -> bool:
    """Authenticated by an API token: only `BearerOrSession` puts an `ApiToken` there."""
    return isinstance(scope.get("auth"), ApiToken)


class CsrfUnlessBearer(CSRFMiddleware):
    """Litestar's CSRF check for every request except those authenticated by an API token."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if by_token(scope):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


# --- guards --------------------------------------------------------------------------------------

AnyConnection = ASGIConnection[Any, Any, Any, Any]


def staff_only(connection: AnyConnection, _: BaseRouteHandler) -> None:
    """Operators and viewers (sessions or tokens); a client's token is refused."""
    user = connection.user
    if isinstance(user, ClientCaller):
        raise PermissionDeniedException(user.refusal())
    if not isinstance(user, Operator):
        raise PermissionDeniedException("this needs an operator's or a viewer's login or token")


def clients_only(connection: AnyConnection, _: BaseRouteHandler) -> None:
    """Submitting: the task belongs to the token's client, so only a client's token may."""
    user = connection.user
    if not isinstance(user, ClientCaller):
        name = user.username if isinstance(user, Operator) else "?"
        what = "an operator" if isinstance(user, Operator) and user.may_change else "a viewer"
        raise PermissionDeniedException(
            f"{name} is {what}: tasks are submitted with a client's API token "
            "(`tidegate token add NAME --client CLIENT`), and belong to the token's client"
        )


def cancellers(connection: AnyConnection, handler: BaseRouteHandler) -> None:
    """A client's token (its own tasks: the route checks which), or the operator role."""
    if not isinstance(connection.user, ClientCaller):
        operator_only(connection, handler)


def own_client(user: Any, client: str | None) -> str | None:
    """The client a task filter may name: a client's token is held to its own."""
    if not isinstance(user, ClientCaller):
        return client
    if client is not None and client != user.client:
        raise PermissionDeniedException(user.refusal())
    return user.client


def check_own_task(user: Any, task_id: str) -> None:
    """Refuse another client's task before reading anything, so that the answer does not tell
    whether it exists."""
    if isinstance(user, ClientCaller) and not task_id.startswith(user.client + ":"):
        raise PermissionDeniedException(user.refusal())
