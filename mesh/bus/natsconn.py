"""Connecting to NATS the way a long-lived component must."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)


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
        url,
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
