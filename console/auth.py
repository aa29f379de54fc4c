"""Who is logged in, and what they may do: the session's operator, the guard (the login and
account pages are in account.py).

A session holds the operator's username and role (plus a tag of the password hash and the
login time), so a page needs no database read to know who asks: a logged-in operator keeps
working through a PostgreSQL outage. While the database answers, the `Roster` (the operators
table, re-read every few seconds) ends the sessions of an operator who was removed or whose
password changed, and applies a role change.

Roles: `viewer` reads everything; `operator` may also change things. Every route that changes
anything carries `guards=[operator_only]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.session.server_side import ServerSideSessionBackend
from litestar.security.session_auth import SessionAuth

from tidegate.console.security import AccessConfig
from tidegate.console.sessions import session_config
from tidegate.errors import StoreError
from tidegate.store import operators
from tidegate.store.operators import ROLES, Role, RosterEntry
from tidegate.store.store import Store

log = logging.getLogger(__name__)

# /schema: the OpenAPI document of the JSON API, which holds no data (see console/api.py).
OPEN_PATHS: Final = ["^/static/", "^/health$", "^/login$", "^/schema(/|$)"]


@dataclass(frozen=True, slots=True)
class Operator:
    """The logged-in operator, as `request.user`."""

    username: str
    role: Role

    @property
    def may_change(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True, slots=True)
class ClientCaller:
    """A client system calling the API with its token, as `request.user`: it may submit, read
    and cancel its own client's tasks, nothing else. (Operator and viewer tokens are
    `Operator`s named `token:NAME`, so every page guard treats them as the role they carry.)"""

    username: str  # token:NAME, as the audit log names it
    client: str

    def refusal(self) -> str:
        return (
            f"{self.username} is the API token of client {self.client}: it may submit, read "
            f"and cancel {self.client}'s own tasks, nothing else"
        )


# --- sessions checked against the operators table ------------------------------------------------


class Roster:
    """The operators table as last read; sessions are checked against it, never the database
    itself, so an outage leaves the last known roster (or none) and sessions keep working."""

    def __init__(self) -> None:
        self.entries: dict[str, RosterEntry] | None = None
        self.loaded_at = 0.0  # wall-clock time its read started

    def admit(self, session: dict[str, Any]) -> Operator | None:
        username, role = session.get("username"), session.get("role")
        tag, at = session.get("tag"), session.get("at")
        if not isinstance(username, str) or role not in ROLES or not isinstance(at, int | float):
            return None
        if self.entries is None or self.loaded_at < at:
            # Nothing read since this login: the login itself checked the database.
            return Operator(username=username, role=role)
        entry = self.entries.get(username)
        if entry is None or entry.tag != tag:
            return None  # removed, or the password changed since this login
        return Operator(username=username, role=entry.role)

    async def refresh(self, store: Store, timeout: float) -> None:
        started = time.time()
        rows = await asyncio.wait_for(operators.roster(store), timeout)
        self.entries = {r.username: r for r in rows}
        self.loaded_at = started

    async def run(self, store: Store, every_s: float) -> None:
        failing = False
        while True:
            try:
                await self.refresh(store, timeout=max(every_s, 2.0))
                failing = False
            except (StoreError, TimeoutError) as exc:
                if not failing:  # once per outage
                    log.warning(
                        "operator roster not refreshed (%s); sessions stand as they are", exc
                    )
                failing = True
            await asyncio.sleep(every_s)


async def retrieve_operator(
    session: dict[str, Any], connection: ASGIConnection[Any, Any, Any, Any]
) -> Operator | None:
    roster: Roster = connection.app.state.roster
    return roster.admit(session)


def session_auth(access: AccessConfig) -> SessionAuth[Operator, ServerSideSessionBackend]:
    return SessionAuth[Operator, ServerSideSessionBackend](
        session_backend_config=session_config(access.session_max_age_s),
        retrieve_user_handler=retrieve_operator,
        exclude=OPEN_PATHS,
    )


# --- what other modules use ----------------------------------------------------------------------


def operator_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for every route that changes something: a viewer gets 403, saying why."""
    user = connection.user
    if isinstance(user, ClientCaller):
        raise PermissionDeniedException(user.refusal())
    if not isinstance(user, Operator) or not user.may_change:
        name = user.username if isinstance(user, Operator) else "?"
        raise PermissionDeniedException(
            f"{name} is a viewer: viewers may look at everything but change nothing; "
            "this needs the operator role"
        )


def actor_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who to name in the audit log for this request: the logged-in operator's username, or
    `token:NAME` for an API token."""
    user = connection.scope.get("user")
    return user.username if isinstance(user, Operator | ClientCaller) else "anonymous"


def client_address(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    # Behind a proxy this is the proxy's address unless uvicorn trusts it to forward the
    # client's (--forwarded-allow-ips); the throttle then counts the proxy as one client.
    return connection.client.host if connection.client else "unknown"


async def audit(
    store: Store, *, actor: str, action: str, target: str, details: dict[str, Any]
) -> None:
    """Best effort: a lost line during an outage is logged, never shown as a failure."""
    try:
        await operators.record_action(
            store, actor=actor, action=action, target=target, details=details
        )
    except StoreError as exc:
        log.warning("audit: %s %s by %s not recorded: %s", action, target, actor, exc)
