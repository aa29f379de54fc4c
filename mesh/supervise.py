"""Named, supervised background loops: a crashing loop is logged and restarted, never silent."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tidegate.backoff import Backoff

log = logging.getLogger(__name__)

LoopFactory = Callable[[], Awaitable[None]]
T = TypeVar("T")

LOOP_RESTART = Backoff(base_s=0.1, cap_s=10.0)  # a crashed loop, again and again
RETRY = Backoff(base_s=0.1, cap_s=5.0)  # `until_done`: a server that is away for a while
_RECANCEL_S = 0.5  # stopping: a loop still running this long after its cancel gets another


class Supervisor:
    """Runs named loops; restarts a crashed loop with backoff, counts restarts per loop."""

    def __init__(self, owner: str, *, restart: Backoff = LOOP_RESTART) -> None:
        self.owner = owner
        self.restart = restart
        self.restarts: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def start(self, name: str, loop: LoopFactory) -> None:
        if name in self._tasks:
            raise ValueError(f"loop {name!r} already runs in {self.owner}")
        self.restarts[name] = 0
        self._tasks[name] = asyncio.create_task(
            self._guard(name, loop), name=f"{self.owner}:{name}"
        )

    async def _guard(self, name: str, loop: LoopFactory) -> None:
        crashes = 0
        while True:
            try:
                await loop()
                log.info("%s: loop %s finished", self.owner, name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    # Stopping: an error while a loop cleans up (say, a closed connection)
                    # is part of shutting down, not a crash to restart.
                    log.debug("%s: loop %s ended while stopping", self.owner, name, exc_info=True)
                    return
                self.restarts[name] += 1
                crashes += 1
                delay = self.restart.delay(crashes)
                log.exception(
                    "%s: loop %s crashed (restart #%d in %.1fs)",
                    self.owner,
                    name,
                    self.restarts[name],
                    delay,
                )
                await asyncio.sleep(delay)

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every loop; wait at most `timeout` for them to end."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(self._tasks.values())
        while pending:
            # Again and again: a cancellation can be lost (Python 3.11's `wait_for` swallows
            # one when its inner future completes at the same moment), and a loop that lost it
            # would run on, a driver "stopping" for as long as its backlog lasts.
            for task in pending:
                task.cancel()
            left = deadline - loop.time()
            if left <= 0:
                names = ", ".join(sorted(t.get_name() for t in pending))
                log.warning("%s: loops still running after %.1fs: %s", self.owner, timeout, names)
                break
            _, pending = await asyncio.wait(pending, timeout=min(left, _RECANCEL_S))
        self._tasks.clear()

    async def wait(self) -> None:
        """Return when every loop has finished (they normally run until stopped)."""
        if self._tasks:
            await asyncio.wait(self._tasks.values())


async def until_done(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff = RETRY,
    give_up: Callable[[Exception], bool] = lambda _exc: False,
    on_failure: Callable[[Exception], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds, backing off exponentially between failures.

    For work that must not be dropped while a server is away (a report, a database write):
    the caller waits, and JetStream keeps the backlog. An error for which `give_up` is true
    is raised at once instead: retrying cannot fix it.
    """
    failures = 0
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if give_up(exc):
                raise
            if on_failure is not None:
                on_failure(exc)
            failures += 1
            delay = backoff.delay(failures)
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
        await asyncio.sleep(delay)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`: a component then stops in its own order (drain first)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
