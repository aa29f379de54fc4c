"""The `demo` client `tidegate up` registers, and its optional stream of `echo` tasks."""

from __future__ import annotations

import asyncio
import logging
import time

from tidegate.client import TidegateClient
from tidegate.wire import TaskSpec

log = logging.getLogger("tidegate.up")

DEMO_CLIENT = "demo"
DEMO_INTERVAL_S = 5.0


async def demo_loop(nats_url: str, interval_s: float = DEMO_INTERVAL_S) -> None:
    """Submit `echo hello from tidegate` as client `demo` every few seconds, until cancelled."""
    run = time.strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:
        try:
            async with await TidegateClient.connect(nats_url, DEMO_CLIENT) as tg:
                while True:
                    n += 1
                    receipt = await tg.submit(
                        TaskSpec(
                            key=f"demo-{run}-{n}",
                            argv=["echo", "hello from tidegate"],
                            labels={"name": "demo"},
                            timeout_s=60,
                        )
                    )
                    log.info("demo: submitted %s", receipt.task_id)
                    await asyncio.sleep(interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("demo: submitting failed (%s); trying again in %.0fs", exc, interval_s)
            await asyncio.sleep(interval_s)
