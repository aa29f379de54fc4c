"""The console's NATS connection, kept in the background.

The console must start, and keep rendering, while NATS is down (that is when an operator
looks): pages read `BusLink.js` and show "NATS unreachable" while it is None, instead of
failing to start or hanging on a connect.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tidegate.backoff import Backoff
from tidegate.bus.natsconn import connect

log = logging.getLogger(__name__)

FIRST_CONNECT = Backoff(base_s=0.5, cap_s=10.0)


class BusLink:
    def __init__(self, url: str, name: str = "tidegate-console") -> None:
        self.url = url
        self.name = name
        self.nc: NATS | None = None
        self._first_connect: asyncio.Event | None = None  # made on the running loop, in start()
        self._task: asyncio.Task[None] | None = None

    @property
    def js(self) -> JetStreamContext | None:
        """JetStream while connected, else None (the caller shows what it has)."""
        nc = self.nc
        return nc.jetstream() if nc is not None and nc.is_connected else None

    def start(self) -> None:
        self._first_connect = asyncio.Event()
        self._task = asyncio.create_task(self._connect(), name="console:nats")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to `timeout` for the first connection; False if NATS did not answer."""
        if self._first_connect is None:
            return self.nc is not None
        try:
            await asyncio.wait_for(self._first_connect.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _connect(self) -> None:
        failures = 0
        while self.nc is None:
            try:
                # After the first connect nats-py reconnects by itself, forever.
                self.nc = await connect(self.url, self.name, connect_timeout=2)
                if self._first_connect is not None:
                    self._first_connect.set()
            except Exception as exc:
                failures += 1
                delay = FIRST_CONNECT.delay(failures)
                log.warning("console: NATS not reachable (%s); trying again in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
