"""Connecting to NATS the way a long-lived component must."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.bus import natstls

log = logging.getLogger(__name__)


async def round_trip(nc: NATS, timeout: float) -> None:
    """Return once the server has processed every command this connection sent before the
    call (subscriptions, publishes, acks); raise if it does not answer within `timeout`.

    nats-py 2.16's `flush()` alone does not promise that: it writes its PING straight to the
    socket, ahead of the commands still queued for the client's flusher task, so its PONG can
    come back before the server has seen them. Handing the queue to the socket first puts the
    PING behind them on the same TCP stream."""
    async with asyncio.timeout(timeout):
        await nc._flush_pending(force_flush=True)
        await nc.flush(timeout=max(1, math.ceil(timeout)))


def servers(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222`: every server of a cluster, as TIDEGATE_NATS_URL may list
    them (nats-py wants a list). The client also learns the others from the first it reaches."""
    return [u.strip() for u in url.split(",") if u.strip()]


def redact(url: str) -> str:
    """The URL fit to log: a password in it replaced by `***` (endpoints.redact does more,
    but imports what the SDK alone does not install)."""
    return re.sub(r"(://[^:/@,]*:)[^@,]*@", r"\1***@", url)


def url_user(url: str) -> str | None:
    """The user named in the first server's URL (`nats://user:password@host`), if any (a
    URL with a token, `nats://token@host`, names none)."""
    first = servers(url)[:1]
    parts = urlsplit(first[0]) if first else None
    if parts is None or not parts.username or parts.password is None:
        return None
    return unquote(parts.username)


async def connect(url: str, name: str, **options: Any) -> NATS:
    """A connection that never gives up reconnecting (nats-py's default stops after ~2 min).

    A URL with a user in it connects with that user's own reply inbox (`names.inbox_prefix`):
    with per-user permissions nobody may subscribe to everyone's `_INBOX.>`."""
    user = url_user(url)
    if user is not None:
        options.setdefault("inbox_prefix", names.inbox_prefix(user))
    if options.get("tls") is None:  # TIDEGATE_NATS_TLS_*, unless the caller brought its own
        options["tls"] = natstls.from_env()

    async def on_error(exc: Exception) -> None:
        log.warning("nats (%s): %s", name, exc)

    nc = NATS()

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # our own close is not news
            log.warning("nats (%s): disconnected from %s; reconnecting", name, redact(url))

    async def on_reconnect() -> None:
        log.info("nats (%s): reconnected", name)

    await nc.connect(
        servers(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **options,
    )
    await natstls.require_tls(nc, url, options["tls"])
    return nc
