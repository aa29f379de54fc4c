"""One driver's commit budget, shared by everything that commits on its database pools.

`Settings.driver.projector_max_commits_per_s` is a cap on the transactions one driver makes,
whoever makes them: the projector's batches, the notifier's sensitive group commits, the
callback outbox, the reconciler, retention. Each of them holds a `PaceLane` of one
`CommitPace` (through `Store.paced`), and every transaction waits for a turn of its lane.

The cap holds in every window of one second (for a cap below 1/s: one transaction per
1/cap seconds), on the times the database can count a commit: a turn is counted from the
moment it is granted until one second after it ended. Turns are also spread out, at most one
per 1/cap seconds, so a window's worth never lands at once. Proof sketch: take any window holding
`n` commits and the last turn granted among them; every other one either ended inside the
window before that grant (still counted then) or was still running (counted as in flight),
so the grant saw `n - 1` counted turns, and it is only made when fewer than `n_max` are.

Who goes first when several wait: weighted fair queueing over the lanes (start-time fair
queueing: a lane's virtual time advances by 1/weight per turn; the waiting lane with the
smallest goes next). Sensitive writes carry the largest weight: a sensitive client's
callbacks wait on them, and one group commit carries every lane's rows, so they are few and
urgent. The callback retry job has a lane of its own: its transactions stay open while it
sends (seconds), and a turn covers a whole transaction (`Store.transaction`), so in the
notifier's lane they would hold the turns its outbox writes need. The projector can wait: its
backlog waits in JetStream, and a batch that waits longer only grows. Nobody starves: a lane
with waiters is served at least in the ratio of its weight, whatever the others ask for. Nor
behind long transactions: a turn holds its place in the window from its grant to its end, so
no lane may hold more than its weight's share of the window at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

from tidegate.errors import ConfigError

# The writers of a driver, with their weights (see the module's docstring for why).
SENSITIVE: Final = "sensitive"
CALLBACKS: Final = "callbacks"
RETRY: Final = "retry"
PROJECTOR: Final = "projector"
HOUSEKEEPING: Final = "housekeeping"
WEIGHTS: Final[dict[str, float]] = {
    SENSITIVE: 8.0,
    CALLBACKS: 4.0,
    RETRY: 2.0,
    PROJECTOR: 2.0,
    HOUSEKEEPING: 1.0,
}

# Called with (lane name, seconds waited) after each turn is granted.
WaitObserver = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class Budget:
    """At most `count` transactions in any window of `window_s` seconds."""

    count: int
    window_s: float

    @classmethod
    def per_second(cls, rate: float) -> Budget:
        if not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"a commit cap must be a positive number per second, not {rate}")
        if rate >= 1:
            return cls(count=math.floor(rate), window_s=1.0)
        return cls(count=1, window_s=1.0 / rate)


class PaceLane:
    """One writer's share of a `CommitPace`."""

    def __init__(self, pace: CommitPace, name: str, weight: float) -> None:
        self.pace = pace
        self.name = name
        self.weight = weight
        self.vtime = 0.0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.turns = 0  # granted so far
        self.in_flight = 0  # granted and not yet ended

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold one turn for one transaction (commit or not: it is counted either way)."""
        await self.pace.acquire(self)
        try:
            yield
        finally:
            self.pace.release(self)


class CommitPace:
    def __init__(self, rate_per_s: float, *, on_wait: WaitObserver | None = None) -> None:
        self.budget = Budget.per_second(rate_per_s)
        self._on_wait = on_wait
        self._lanes: dict[str, PaceLane] = {}
        self._ended: deque[float] = deque()  # when recent turns ended (loop time)
        self._in_flight = 0
        self._vnow = 0.0  # the virtual time of the last grant
        # Turns are also spread out evenly (one per window / count): a full window's worth at
        # once would be a burst the database feels, and a stall until the window moves on.
        self._spacing = self.budget.window_s / self.budget.count
        self._next_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def lane(self, name: str, weight: float | None = None) -> PaceLane:
        """The lane `name` (made on first use; a known writer's weight by default)."""
        lane = self._lanes.get(name)
        if lane is None:
            w = WEIGHTS.get(name, 1.0) if weight is None else weight
            if w <= 0:
                raise ConfigError(f"lane {name!r}: a weight must be positive, not {w}")
            lane = self._lanes[name] = PaceLane(self, name, w)
        return lane

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self, lane: PaceLane) -> None:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        if not lane.waiters:
            # A lane that was idle starts at the present: no credit saved up while idle.
            lane.vtime = max(lane.vtime, self._vnow)
        fut: asyncio.Future[None] = loop.create_future()
        lane.waiters.append(fut)
        self._grant(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted and cancelled at once: the turn was never used.
                self._in_flight -= 1
                lane.in_flight -= 1
                self._grant(loop)
            raise
        if self._on_wait is not None:
            self._on_wait(lane.name, loop.time() - asked)

    def release(self, lane: PaceLane) -> None:
        loop = asyncio.get_running_loop()
        self._in_flight -= 1
        lane.in_flight -= 1
        self._ended.append(loop.time())
        self._grant(loop)

    def _free(self, now: float) -> int:
        # `ended + window <= now`, the very sum the timer below waits for: `now - window`
        # could round the other way and leave a turn counted at the instant it expires.
        window = self.budget.window_s
        while self._ended and self._ended[0] + window <= now:
            self._ended.popleft()
        return self.budget.count - len(self._ended) - self._in_flight

    def _grant(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while True:
            lane = self._next_lane()
            if lane is None:
                return  # nobody waits
            now = loop.time()
            if now < self._next_at:
                wake = self._next_at  # spread out: no burst of a whole window's turns
                break
            if self._free(now) <= 0:
                if not self._ended:
                    return  # every turn is in flight: the next release looks again
                wake = self._ended[0] + self.budget.window_s  # when the oldest leaves
                break
            lane.waiters.popleft().set_result(None)
            self._in_flight += 1
            lane.in_flight += 1
            lane.turns += 1
            self._vnow = lane.vtime
            lane.vtime += 1.0 / lane.weight
            self._next_at = now + self._spacing
        self._timer = loop.call_at(wake, self._grant, loop)

    def _next_lane(self) -> PaceLane | None:
        best: PaceLane | None = None
        total = sum(lane.weight for lane in self._lanes.values())
        for lane in self._lanes.values():
            while lane.waiters and lane.waiters[0].done():
                lane.waiters.popleft()
            if not lane.waiters:
                continue
            # A turn is counted from its grant, so a long transaction (a callback retry holds
            # one while it sends) keeps its place all along: no lane may hold more than its
            # weight's share of the window at once, and the others always find room.
            if lane.in_flight >= max(1, math.floor(self.budget.count * lane.weight / total)):
                continue
            if best is None or (lane.vtime, -lane.weight) < (best.vtime, -best.weight):
                best = lane
        return best
