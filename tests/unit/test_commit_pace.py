"""The driver's shared commit cap (mesh/store/pace.py): never above the cap in any one-second
window, whoever asks; weighted fair use across writers; sensitive writes served first.

The pace runs on a virtual-time event loop: time moves only when every task waits for a timer,
so a loaded machine cannot make the figures noisy, and a test of a minute takes milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from tidegate.errors import ConfigError
from tidegate.store.pace import (
    CALLBACKS,
    HOUSEKEEPING,
    PROJECTOR,
    RETRY,
    SENSITIVE,
    WEIGHTS,
    Budget,
    CommitPace,
)
from tidegate.store.store import session_options

T = TypeVar("T")


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready to run."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        ready: Any = self._ready  # type: ignore[attr-defined]
        scheduled: Any = self._scheduled  # type: ignore[attr-defined]
        if not ready and scheduled:
            self._now = max(self._now, scheduled[0].when())
        super()._run_once()  # type: ignore[misc]


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await main()

    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(wrapped())


def most_in_any_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """The largest number of `times` inside one half-open window [t, t + window_s)."""
    ordered = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(ordered):
        j = max(j, i)
        while j < len(ordered) and ordered[j] < start + window_s:
            j += 1
        best = max(best, j - i)
    return best


def test_budget_from_a_rate() -> None:
    assert Budget.per_second(20.0) == Budget(count=20, window_s=1.0)
    assert Budget.per_second(20.7) == Budget(count=20, window_s=1.0)  # never above: round down
    assert Budget.per_second(0.5) == Budget(count=1, window_s=2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            Budget.per_second(bad)


def test_never_above_the_cap_in_any_one_second_window() -> None:
    """Four writers, each with several concurrent callers holding turns for random times:
    counted by grant and by end, no one-second window holds more than the cap; and the cap is
    used, not wasted (the run takes about turns / cap seconds)."""
    cap = 20
    per_worker = 30
    workers = 3
    rng = random.Random(7)
    granted: list[float] = []
    ended: list[float] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        pace = CommitPace(cap)

        async def worker(name: str) -> None:
            lane = pace.lane(name)
            for _ in range(per_worker):
                async with lane.turn():
                    granted.append(loop.time())
                    await asyncio.sleep(rng.choice((0.0, 0.001, 0.02, 0.3)))
                    ended.append(loop.time())
                await asyncio.sleep(rng.choice((0.0, 0.0, 0.05)))

        lanes = (SENSITIVE, CALLBACKS, PROJECTOR, HOUSEKEEPING)
        await asyncio.gather(*(worker(n) for n in lanes for _ in range(workers)))
        assert pace.in_flight == 0
        return loop.time()

    took = run(main)
    total = per_worker * workers * 4
    assert len(granted) == len(ended) == total
    assert most_in_any_window(granted) <= cap
    assert most_in_any_window(ended) <= cap
    # Full use: at the cap, `total` turns need (total / cap - 1) seconds at least; allow for
    # the turns that last 0.3 s, which hold their place in the window meanwhile.
    assert took <= total / cap * 1.5 + 1


def test_a_cap_below_one_per_second_spaces_every_turn() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        pace = CommitPace(0.5)
        lane = pace.lane(PROJECTOR)
        at: list[float] = []

        async def one() -> None:
            async with lane.turn():
                at.append(loop.time())

        await asyncio.gather(*(one() for _ in range(4)))
        return at

    at = run(main)
    assert [b - a for a, b in itertools.pairwise(at)] == [2.0, 2.0, 2.0]


def saturated_shares(seconds: float, lanes: Sequence[str]) -> dict[str, int]:
    """Every lane asks for turns all the time (several callers each) for `seconds`."""

    async def main() -> dict[str, int]:
        loop = asyncio.get_running_loop()
        pace = CommitPace(20)
        stop = loop.time() + seconds
        counts = dict.fromkeys(lanes, 0)

        async def worker(name: str) -> None:
            lane = pace.lane(name)
            while loop.time() < stop:
                async with lane.turn():
                    counts[name] += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(n) for n in lanes for _ in range(5)))
        return counts

    return run(main)


def test_writers_share_the_cap_by_weight_and_nobody_starves() -> None:
    lanes = (SENSITIVE, CALLBACKS, PROJECTOR, HOUSEKEEPING)
    counts = saturated_shares(60.0, lanes)
    total = sum(counts.values())
    assert total <= 20 * 60 + 20  # the cap, over the whole run
    weight_sum = sum(WEIGHTS[n] for n in lanes)
    for name in lanes:
        expected = total * WEIGHTS[name] / weight_sum
        assert abs(counts[name] - expected) <= 0.1 * expected + 2, counts
    assert counts[HOUSEKEEPING] > 0


def test_a_lone_writer_gets_the_whole_cap() -> None:
    counts = saturated_shares(30.0, (PROJECTOR,))
    assert 20 * 29 <= counts[PROJECTOR] <= 20 * 30 + 20


def test_a_sensitive_write_is_served_first_while_the_projector_saturates() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        pace = CommitPace(20)
        stop = loop.time() + 20
        waits: list[float] = []

        async def projector() -> None:
            lane = pace.lane(PROJECTOR)
            while loop.time() < stop:
                async with lane.turn():
                    await asyncio.sleep(0.005)

        async def sensitive() -> None:
            lane = pace.lane(SENSITIVE)
            await asyncio.sleep(2.0)
            while loop.time() < stop - 1:
                asked = loop.time()
                async with lane.turn():
                    waits.append(loop.time() - asked)
                await asyncio.sleep(0.7)

        await asyncio.gather(*(projector() for _ in range(10)), sensitive())
        return waits

    waits = run(main)
    assert len(waits) >= 10
    # The window is full of projector turns, so the sensitive one waits for the next slot to
    # free up, and takes it: never a whole window, never behind the projector's queue.
    assert max(waits) < 1.0


def test_long_transactions_of_one_writer_leave_room_for_the_others() -> None:
    """Callback retries hold their transaction while they send (seconds): however many, they
    hold no more than their share of the window, and a sensitive write still goes at once."""

    async def main() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        pace = CommitPace(20)
        for name in WEIGHTS:
            pace.lane(name)
        stop = loop.time() + 20
        waits: list[float] = []
        most = 0

        async def retry() -> None:
            nonlocal most
            lane = pace.lane(RETRY)
            while loop.time() < stop:
                async with lane.turn():
                    most = max(most, lane.in_flight)
                    await asyncio.sleep(3.0)

        async def sensitive() -> None:
            lane = pace.lane(SENSITIVE)
            await asyncio.sleep(1.0)
            while loop.time() < stop - 3:
                asked = loop.time()
                async with lane.turn():
                    waits.append(loop.time() - asked)
                await asyncio.sleep(0.3)

        await asyncio.gather(*(retry() for _ in range(30)), sensitive())
        return waits, most

    waits, most = run(main)
    assert most == 20 * WEIGHTS[RETRY] // sum(WEIGHTS.values())  # its weight's share
    assert len(waits) >= 20 and max(waits) <= 0.05  # one spacing at most


def test_an_idle_lane_saves_no_credit() -> None:
    """A writer idle for a long while does not come back with a burst that shuts the others out."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        pace = CommitPace(20)
        stop = loop.time() + 40
        late = {PROJECTOR: 0, HOUSEKEEPING: 0}

        async def worker(name: str, start: float) -> None:
            lane = pace.lane(name)
            await asyncio.sleep(start)
            while loop.time() < stop:
                async with lane.turn():
                    if loop.time() >= 30:
                        late[name] += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(
            *(worker(PROJECTOR, 0.0) for _ in range(3)),
            *(worker(HOUSEKEEPING, 30.0) for _ in range(3)),
        )
        return late[PROJECTOR], late[HOUSEKEEPING]

    projector, housekeeping = run(main)
    # 2:1 by weight from the moment the idle writer returns, not all to the newcomer.
    assert abs(projector - 2 * housekeeping) <= 0.1 * projector + 2, (projector, housekeeping)


def test_failed_and_cancelled_turns() -> None:
    """A turn that raised still counts (it may have committed); a waiter that gives up holds
    nothing."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pace = CommitPace(2)
        lane = pace.lane(CALLBACKS)
        with pytest.raises(RuntimeError):
            async with lane.turn():
                raise RuntimeError("the database said no")
        async with lane.turn():
            pass
        assert pace.in_flight == 0
        # The window is full (two turns just now): a third waits; cancel it.
        waiter = asyncio.ensure_future(pace.acquire(lane))
        await asyncio.sleep(0.5)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pace.in_flight == 0
        # The next turn comes when the first two leave the window, one second after them.
        asked = loop.time()
        async with lane.turn():
            assert loop.time() - asked == pytest.approx(0.5)

    run(main)


def test_session_options_set_utc_and_keep_the_callers() -> None:
    assert session_options("postgresql://u@h/db") == "-c TimeZone=UTC"
    mixed = session_options("host=h dbname=db options='-c search_path=x'")
    assert mixed == "-c search_path=x -c TimeZone=UTC"
