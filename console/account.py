"""The login, logout and account pages, and `/api/session` (who this session is).

A login checks the password against the operators table (throttled per username and per
address), starts a session holding what auth.py's `Roster` checks later, and writes an audit
line; an operator changes their own password on the account page.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Final

import psycopg
from litestar import Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler

from tidegate.console.auth import Operator, audit, client_address, operator_only
from tidegate.console.security import (
    AccessConfig,
    LoginThrottle,
    safe_next,
    too_many_message,
)
from tidegate.console.sessions import start_session
from tidegate.errors import StoreError, UsageError
from tidegate.store import operators
from tidegate.store.store import Store

log = logging.getLogger(__name__)

DB_DOWN: Final = (
    "the database is unreachable: new logins are not possible until it is back; "
    "operators already logged in are not affected"
)
NOT_MIGRATED: Final = (
    "the database has no operators table yet: run `tidegate migrate` (or start a driver); "
    "no logins until then"
)
WRONG: Final = "wrong username or password"


def _login_page(
    *,
    username: str = "",
    target: str = "/",
    error: str = "",
    status: int = 200,
    headers: dict[str, str] | None = None,
    background: BackgroundTask | None = None,
) -> Template:
    return Template(
        template_name="login.html",
        context={"username": username, "next": target, "error": error, "nav": ""},
        status_code=status,
        headers=headers,
        background=background,
    )


@get("/login", exclude_from_auth=True)
async def login_page(request: Request[Any, Any, Any], next: str = "/") -> Response[Any]:
    target = safe_next(next)
    if request.session.get("username"):
        return Redirect(target, status_code=303)
    return _login_page(target=target)


@post("/login", exclude_from_auth=True)
async def login(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    form = await request.form()
    username = str(form.get("username") or "").strip()
    password = str(form.get("password") or "")
    target = safe_next(str(form.get("next") or ""))
    address = client_address(request)
    throttle: LoginThrottle = state.throttle
    keys = (f"user:{username}", f"addr:{address}")
    wait = throttle.wait_s(*keys)
    if wait > 0:
        log.warning("login as %r from %s refused: throttled for %.0fs", username, address, wait)
        return _login_page(
            username=username,
            target=target,
            error=too_many_message(wait),
            status=HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(math.ceil(wait))},
        )
    if not username or not password:
        error = "give a username and a password"
        return _login_page(username=username, target=target, error=error, status=400)
    access: AccessConfig = state.access
    store: Store = state.store
    try:
        found = await asyncio.wait_for(
            operators.get_credentials(store, username), access.login_db_timeout_s
        )
    except (StoreError, TimeoutError) as exc:
        log.warning("login as %r: the database is unreachable (%s)", username, exc or "timeout")
        not_migrated = isinstance(exc.__cause__, psycopg.errors.UndefinedTable)
        return _login_page(
            username=username,
            target=target,
            error=NOT_MIGRATED if not_migrated else DB_DOWN,
            status=HTTP_503_SERVICE_UNAVAILABLE,
        )
    if found is None:
        ok = await asyncio.to_thread(operators.verify_decoy, password)
    else:
        ok = await asyncio.to_thread(operators.verify_password, found.password_hash, password)
    if found is None or not ok:
        wait = throttle.fail(*keys)
        details: dict[str, Any] = {"address": address}
        error = WRONG
        if wait > 0:
            details["throttled_for_s"] = math.ceil(wait)
            error = f"{WRONG}; {too_many_message(wait)}"
        return _login_page(
            username=username,
            target=target,
            error=error,
            status=HTTP_401_UNAUTHORIZED,
            background=BackgroundTask(
                audit,
                store,
                actor="anonymous",
                action="login.failed",
                target=username,
                details=details,
            ),
        )
    throttle.forgive(f"user:{username}")
    if operators.needs_rehash(found.password_hash):
        try:
            await operators.rehash_password(store, username=username, password=password)
        except StoreError as exc:  # the old hash still works; try again at the next login
            log.warning("could not rehash the password of %r: %s", username, exc)
    await start_session(
        request,
        {
            "username": found.username,
            "role": found.role,
            "tag": operators.credential_tag(found.password_hash),
            "at": time.time(),
        },
    )
    return Redirect(
        target,
        status_code=303,
        background=BackgroundTask(
            audit,
            store,
            actor=found.username,
            action="login",
            target=found.username,
            details={"address": address},
        ),
    )


@post("/logout")
async def logout(request: Request[Operator, Any, Any], state: State) -> Response[Any]:
    me = request.user
    request.clear_session()
    return Redirect(
        "/login",
        status_code=303,
        background=BackgroundTask(
            audit,
            state.store,
            actor=me.username,
            action="logout",
            target=me.username,
            details={"address": client_address(request)},
        ),
    )


def _account_page(
    me: Operator, *, error: str = "", notice: str = "", status: int = 200
) -> Template:
    return Template(
        template_name="account.html",
        context={"me": me, "error": error, "notice": notice, "nav": "account"},
        status_code=status,
    )


@get("/account")
async def account_page(request: Request[Operator, Any, Any]) -> Template:
    return _account_page(request.user)


@post("/account/password", guards=[operator_only])
async def change_password(request: Request[Operator, Any, Any], state: State) -> Template:
    """An operator's own password. Viewers are read-only, this too: an operator sets theirs
    with `tidegate operator set-password NAME`."""
    me = request.user
    form = await request.form()
    current = str(form.get("current") or "")
    new, again = str(form.get("new") or ""), str(form.get("again") or "")
    address = client_address(request)
    throttle: LoginThrottle = state.throttle
    keys = (f"user:{me.username}", f"addr:{address}")
    wait = throttle.wait_s(*keys)
    if wait > 0:
        return _account_page(me, error=too_many_message(wait), status=HTTP_429_TOO_MANY_REQUESTS)
    if new != again:
        return _account_page(me, error="the two new passwords differ", status=HTTP_400_BAD_REQUEST)
    try:
        operators.check_password(new)
    except UsageError as exc:
        return _account_page(me, error=str(exc), status=HTTP_400_BAD_REQUEST)
    store: Store = state.store
    access: AccessConfig = state.access
    try:
        found = await asyncio.wait_for(
            operators.get_credentials(store, me.username), access.login_db_timeout_s
        )
        if found is None or not await asyncio.to_thread(
            operators.verify_password, found.password_hash, current
        ):
            throttle.fail(*keys)
            error = "the current password is wrong"
            return _account_page(me, error=error, status=HTTP_400_BAD_REQUEST)
        changed = await asyncio.wait_for(
            operators.set_password(store, username=me.username, password=new, actor=me.username),
            access.login_db_timeout_s,
        )
    except (StoreError, TimeoutError) as exc:
        log.warning("password change of %r failed: %s", me.username, exc or "timeout")
        error = "the database is unreachable: the password was not changed; try again later"
        return _account_page(me, error=error, status=HTTP_503_SERVICE_UNAVAILABLE)
    # This session goes on with the new password; the others of this operator end.
    request.set_session(
        {
            **request.session,
            "tag": operators.credential_tag(changed.password_hash),
            "at": time.time(),
        }
    )
    return _account_page(me, notice="password changed; your other sessions end within seconds")


@get("/api/session")
async def whoami(request: Request[Operator, Any, Any]) -> dict[str, str]:
    """Who this session is, for scripts and pages: {"username": ..., "role": ...}."""
    return {"username": request.user.username, "role": request.user.role}


ROUTES: list[ControllerRouterHandler] = [
    login_page,
    login,
    logout,
    account_page,
    change_password,
    whoami,
]
