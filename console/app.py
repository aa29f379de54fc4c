"""The web console (a first version): `/health`, and a page with task counts and the addresses.

There is no login yet, so `serve_console` is meant for loopback; it warns when bound elsewhere.
The page must render even while PostgreSQL is down (a database outage is exactly when an
operator looks), so every database read is bounded in time and its failure is shown, not raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import nats
import psycopg
import uvicorn
from litestar import Litestar, MediaType, Response, get
from litestar.datastructures import State
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from litestar.template.config import TemplateConfig

from tidegate.config import Settings
from tidegate.endpoints import OPERATOR_LOGIN, redact
from tidegate.store.store import Store

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
PAGE_DB_TIMEOUT_S = 3.0
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


async def nats_reachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """A fresh connection per check: it proves the server answers now, not a minute ago."""

    async def quiet(exc: Exception) -> None:
        pass  # a failed check is reported as `false`, not logged as an error

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                # max_reconnect_attempts=0 would retry the first connect forever (nats-py
                # 2.16); 1 means "one try", then NoServersError.
                url,
                name="tidegate-console-health",
                connect_timeout=timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            ),
            timeout * 2,
        )
    except Exception:
        return False
    await nc.close()
    return True


async def database_reachable(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    try:
        async with await psycopg.AsyncConnection.connect(
            url, connect_timeout=max(1, int(timeout)), autocommit=True
        ) as conn:
            await asyncio.wait_for(conn.execute("SELECT 1"), timeout)
    except (psycopg.Error, OSError, TimeoutError):
        return False
    return True


@get("/health", media_type=MediaType.JSON)
async def health(state: State) -> Response[dict[str, Any]]:
    settings: Settings = state.settings
    nats_ok, db_ok = await asyncio.gather(
        nats_reachable(settings.connection.nats_url),
        database_reachable(settings.connection.database_url),
    )
    ok = nats_ok and db_ok
    return Response(
        {"status": "ok" if ok else "degraded", "nats": nats_ok, "database": db_ok},
        status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
    )


@get("/", media_type=MediaType.HTML)
async def index(state: State) -> Template:
    settings: Settings = state.settings
    store: Store = state.store
    counts: dict[str, int] = {}
    error = ""
    try:
        counts = await asyncio.wait_for(store.count_tasks_by_state(), PAGE_DB_TIMEOUT_S)
    except TimeoutError:
        error = f"task counts unavailable: the database did not answer in {PAGE_DB_TIMEOUT_S:.0f}s"
    except Exception as exc:  # shown on the page: the console must outlive the database
        error = f"task counts unavailable: {exc}"
    conn = settings.connection
    return Template(
        template_name="index.html",
        context={
            "counts": counts,
            "total": sum(counts.values()),
            "error": error,
            "endpoints": {
                "NATS": redact(conn.nats_url),
                "database": redact(conn.database_url),
                "data directory": str(conn.data_dir.resolve()),
                "operator login": OPERATOR_LOGIN,
            },
        },
    )


def templates_dir() -> Path:
    return Path(str(files("tidegate.templates")))


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # wait=False: the console starts (and /health says so) while the database is down.
        store = Store(
            settings.connection.database_url, min_size=1, max_size=4, name="tidegate-console"
        )
        await store.open(wait=False)
        app.state.store = store
        try:
            yield
        finally:
            await store.close()

    return Litestar(
        route_handlers=[health, index],
        state=State({"settings": settings}),
        lifespan=[lifespan],
        template_config=TemplateConfig(directory=templates_dir(), engine=JinjaTemplateEngine),
    )


def serve_console(settings: Settings, *, host: str = "127.0.0.1", port: int = 8700) -> int:
    """Serve the console with uvicorn until SIGINT/SIGTERM; 1 if it could not start."""
    if host not in LOOPBACK:
        log.warning(
            "the console has no login yet: anyone who can reach %s:%d can use it", host, port
        )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")
    )
    server.run()
    return 0 if server.started else 1
