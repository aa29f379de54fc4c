"""Connecting to NATS the way a long-lived component must."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)


def servers(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222`: every server of a cluster, as TIDEGATE_NATS_URL may list
    them (nats-py wants a list). The client also learns the others from the first it reaches."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def connect(url: str, name: str, **options: Any) -> NATS:
    """A connection that never gives up reconnecting (nats-py's default stops after ~2 min)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats (%s): %s", name, exc)

    nc = NATS()

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # our own close is not news
            log.warning("nats (%s): disconnected from %s; reconnecting", name, url)

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
    return nc
