"""The web console: a Litestar app of server-rendered pages (Jinja2 + htmx) and a JSON API.

The console must render while PostgreSQL or NATS is down (an outage is exactly when an operator
looks): it starts without either, every read is bounded in time, and a failed read is shown on
the page, never raised.

Access (`auth`, `sessions`, `security`): every page needs a login except `/login`, `/health`,
`/static/*` and `/schema`; sessions are server-side, in memory and NATS KV (not PostgreSQL);
every mutating request needs the CSRF token, and the operator role (`auth.operator_only`).
The JSON API under /api/v1 (`api`) also takes API tokens (`api_auth`), whose requests alone
are exempt from CSRF.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from litestar import Litestar, MediaType, Response, Router, get
from litestar.datastructures import State
from litestar.exceptions import (
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.middleware import DefineMiddleware
from litestar.plugins.htmx import HTMXPlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from litestar.template.config import TemplateConfig

from tidegate.config import Settings
from tidegate.console import (
    account,
    audit,
    auth,
    callbacks,
    clients,
    deadmessages,
    executors,
    overview,
    tasklog,
    tasks,
)
from tidegate.console.api import api_router, openapi_config
from tidegate.console.api_auth import BearerOrSession, CsrfUnlessBearer, TokenCache
from tidegate.console.api_errors import on_no_route
from tidegate.console.link import BusLink
from tidegate.console.security import (
    AccessConfig,
    LoginThrottle,
    csrf_config,
    csrf_secret,
    on_forbidden,
    on_not_authorized,
    security_headers,
)
from tidegate.console.sessions import STORE_NAME, SessionStore
from tidegate.console.submitter import Submitter
from tidegate.errors import ConfigError
from tidegate.store.store import Store

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
SHUTDOWN_STEP_S = 10.0
# At start, how long to wait for NATS before serving: a restarted console should find the
# sessions of those logged in (in KV) from its first request, yet start when NATS is down.
FIRST_CONNECT_WAIT_S = 2.0
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


async def database_reachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    try:
        async with await psycopg.AsyncConnection.connect(
            url, connect_timeout=max(1, int(timeout)), autocommit=True
        ) as conn:
            await asyncio.wait_for(conn.execute("SELECT 1"), timeout)
    except (psycopg.Error, OSError, TimeoutError):
        return False
    return True


async def nats_reachable(link: BusLink, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """The console's own connection answers a round trip now, not a minute ago."""
    nc = link.nc
    if nc is None or not nc.is_connected:
        return False
    try:
        await asyncio.wait_for(nc.flush(), timeout)
    except Exception:
        return False
    return True


@get("/health", media_type=MediaType.JSON, exclude_from_auth=True)
async def health(state: State) -> Response[dict[str, Any]]:
    settings: Settings = state.settings
    nats_ok, db_ok = await asyncio.gather(
        nats_reachable(state.link), database_reachable(settings.connection.database_url)
    )
    ok = nats_ok and db_ok
    return Response(
        {"status": "ok" if ok else "degraded", "nats": nats_ok, "database": db_ok},
        status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
    )


def templates_dir() -> Path:
    return Path(str(files("tidegate.templates")))


def htmx_dir() -> Path:
    return Path(str(files("js_lib_htmx").joinpath("static", "htmx")))


def create_app(settings: Settings, access: AccessConfig | None = None) -> Litestar:
    """The console; `access` changes its access rules (the defaults are the product's)."""
    access = access or AccessConfig()
    link = BusLink(settings.connection.nats_url)
    secret = access.csrf_secret or csrf_secret(settings.connection.data_dir)
    roster = auth.Roster()
    submitter = Submitter(link)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # wait=False and a background NATS link: the console starts while either is down.
        store = Store(settings.connection.database_url, min_size=1, max_size=4, name="console")
        await store.open(wait=False)
        link.start()
        app.state.store = store
        refresher = asyncio.create_task(
            roster.run(store, access.roster_refresh_s), name="console:roster"
        )
        await link.wait_connected(FIRST_CONNECT_WAIT_S)
        try:
            yield
        finally:
            refresher.cancel()
            # Each step bounded: a console asked to stop stops, even if a server hangs up
            # halfway through a goodbye.
            await asyncio.wait({refresher}, timeout=SHUTDOWN_STEP_S)
            for what, close in (
                ("the submit publisher", submitter.close),
                ("the NATS connection", link.close),
                ("the database pool", store.close),
            ):
                try:
                    await asyncio.wait_for(close(), SHUTDOWN_STEP_S)
                except TimeoutError:
                    log.warning(
                        "console: closing %s took over %.0fs; going on", what, SHUTDOWN_STEP_S
                    )

    static = [
        create_static_files_router(
            path="/static", directories=[templates_dir() / "static"], name="static"
        ),
        create_static_files_router(path="/static/htmx", directories=[htmx_dir()], name="htmx"),
    ]
    # The pages are not part of the API's OpenAPI document (/schema); /health is.
    pages = Router(
        path="/",
        include_in_schema=False,
        route_handlers=[
            *account.ROUTES,
            *overview.ROUTES,
            *clients.ROUTES,
            *tasks.ROUTES,
            *tasklog.ROUTES,
            *executors.ROUTES,
            *callbacks.ROUTES,
            *deadmessages.ROUTES,
            *audit.ROUTES,
        ],
    )
    return Litestar(
        route_handlers=[health, *static, pages, api_router()],
        state=State(
            {
                "settings": settings,
                "access": access,
                "link": link,
                "roster": roster,
                "throttle": LoginThrottle(
                    max_failures=access.login_max_failures, window_s=access.login_window_s
                ),
                "csrf_secret": secret,
                "tokens": TokenCache(
                    ttl_s=access.token_cache_s, grace_s=access.token_outage_grace_s
                ),
                "submitter": submitter,
            }
        ),
        lifespan=[lifespan],
        plugins=[HTMXPlugin()],
        template_config=TemplateConfig(directory=templates_dir(), engine=JinjaTemplateEngine),
        # Authentication first (a token, or the session), then CSRF, which needs to know which.
        middleware=[
            DefineMiddleware(BearerOrSession, session=auth.session_auth(access).middleware),
            DefineMiddleware(CsrfUnlessBearer, config=csrf_config(secret)),
        ],
        openapi_config=openapi_config(),
        stores={
            STORE_NAME: SessionStore(
                link, max_age_s=access.session_max_age_s, replicas=settings.limits.replicas
            )
        },
        before_send=[security_headers],
        exception_handlers={
            NotAuthorizedException: on_not_authorized,
            PermissionDeniedException: on_forbidden,
            NotFoundException: on_no_route,
            MethodNotAllowedException: on_no_route,
        },
    )


def check_tls_files(cert: str, key: str) -> None:
    """Fail at start, saying what to fix, rather than with uvicorn's traceback."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"the console cannot use TIDEGATE_CONSOLE_TLS_CERT={cert} with "
            f"TIDEGATE_CONSOLE_TLS_KEY={key} ({exc}): give a readable PEM certificate and "
            "its private key"
        ) from None


def serve_console(settings: Settings, *, host: str = "127.0.0.1", port: int = 8700) -> int:
    """Serve the console with uvicorn until SIGINT/SIGTERM; 1 if it could not start.

    With TIDEGATE_CONSOLE_TLS_CERT and _KEY it serves HTTPS itself; its cookies are then
    `Secure` (security.security_headers sees the `https` scheme uvicorn sets)."""
    tls = settings.console
    if tls.console_tls_cert:
        check_tls_files(tls.console_tls_cert, tls.console_tls_key)
    elif host not in LOOPBACK:
        log.warning(
            "the console listens on %s:%d in plain HTTP: set TIDEGATE_CONSOLE_TLS_CERT and "
            "TIDEGATE_CONSOLE_TLS_KEY, or put a TLS proxy in front of it "
            "(passwords and session cookies cross the network)",
            host,
            port,
        )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            log_level="info",
            ssl_certfile=tls.console_tls_cert or None,
            ssl_keyfile=tls.console_tls_key or None,
        )
    )
    server.run()
    return 0 if server.started else 1
