"""The per-task lanes of one client's callbacks (mesh/driver/task_lanes.py)."""

from __future__ import annotations

import random

import pytest

from tidegate.driver.task_lanes import TaskLanes

Item = tuple[str, int]  # (task, its n-th state)


def lanes(limit: int) -> TaskLanes[Item]:
    return TaskLanes(lambda item: item[0], limit=limit)


def test_a_task_goes_one_request_after_another_in_order() -> None:
    tl = lanes(4)
    tl.put(("a", 0))
    first = tl.take(1)
    assert first == [("a", 0)]
    tl.put(("a", 1))
    tl.put(("a", 2))
    # Its next states wait while its first is in flight, whatever the free room.
    assert tl.can_take() is False
    assert tl.take(10) == []
    tl.done(first)
    assert tl.take(1) == [("a", 1)]


def test_different_tasks_go_concurrently_up_to_the_limit_never_above() -> None:
    tl = lanes(3)
    for task in "abcde":
        tl.put((task, 0))
    taken = [tl.take(1) for _ in range(3)]
    assert [t[0][0] for t in taken] == ["a", "b", "c"]  # oldest first
    assert tl.in_flight == 3
    assert tl.take(1) == []  # at the limit
    tl.done(taken[1])
    assert tl.take(1) == [("d", 0)]
    assert tl.in_flight == 3


def test_a_request_is_filled_with_what_waits_a_task_whole_and_in_order() -> None:
    tl = lanes(2)
    for n in range(3):
        for task in "ab":
            tl.put((task, n))
    batch = tl.take(10)
    assert batch == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    tl.put(("a", 3))
    # `a` is in that request: its next state waits for it, even with room in a second one.
    assert tl.take(10) == []
    tl.done(batch)
    assert tl.take(10) == [("a", 3)]


def test_a_task_cut_by_the_request_size_sends_its_rest_after_it() -> None:
    tl = lanes(4)
    for n in range(5):
        tl.put(("a", n))
    tl.put(("b", 0))
    first = tl.take(3)
    assert first == [("a", 0), ("a", 1), ("a", 2)]
    assert tl.take(3) == [("b", 0)]  # not a's rest: a is busy
    tl.done(first)
    assert tl.take(3) == [("a", 3), ("a", 4)]


def test_take_idle_spills_waiting_tasks_not_the_busy_ones_and_counts_no_request() -> None:
    tl = lanes(1)
    tl.put(("a", 0))
    busy = tl.take(1)
    tl.put(("a", 1))
    tl.put(("b", 0))
    tl.put(("b", 1))
    assert tl.held == 4
    spilled = tl.take_idle()
    assert spilled == [("b", 0), ("b", 1)]  # a's next waits behind its request
    assert tl.in_flight == 1
    tl.put(("b", 2))
    tl.done(spilled, request=False)
    tl.done(busy)
    assert tl.take(5) == [("a", 1), ("b", 2)]  # by arrival, whoever was settled first
    assert tl.held == 2


def test_with_a_limit_of_one_items_go_in_arrival_order() -> None:
    tl = lanes(1)
    arrivals = [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("b", 1), ("a", 2)]
    for item in arrivals:
        tl.put(item)
    sent = []
    while batch := tl.take(1):
        sent += batch
        tl.done(batch)
    assert sent == arrivals


def test_drain_returns_everything_waiting() -> None:
    tl = lanes(1)
    tl.put(("a", 0))
    busy = tl.take(1)
    tl.put(("a", 1))
    tl.put(("b", 0))
    assert sorted(tl.drain()) == [("a", 1), ("b", 0)]
    assert tl.waiting == 0
    tl.done(busy)
    assert tl.take(1) == []


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        lanes(0)


@pytest.mark.parametrize("seed", range(20))
def test_random_schedules_keep_order_per_task_and_the_limit(seed: int) -> None:
    """Requests settle in random order; per task, states go out in order, one request of a
    task at a time, never more than `limit` requests in flight; every item exactly once."""
    rng = random.Random(seed)
    limit = rng.randint(1, 6)
    tl = lanes(limit)
    counts = {f"t{i}": 0 for i in range(15)}
    sent: list[Item] = []
    in_flight: list[list[Item]] = []
    peak = 0
    for _ in range(400):
        roll = rng.random()
        if roll < 0.45:
            task = rng.choice(list(counts))
            tl.put((task, counts[task]))
            counts[task] += 1
        elif roll < 0.75:
            batch = tl.take(rng.randint(1, 5))
            if batch:
                busy = {t for b in in_flight for t, _ in b}
                assert not busy & {t for t, _ in batch}, "a task in two requests at once"
                in_flight.append(batch)
                sent += batch
        elif in_flight:
            tl.done(in_flight.pop(rng.randrange(len(in_flight))))
        peak = max(peak, len(in_flight))
        assert len(in_flight) <= limit
    while in_flight or tl.waiting:
        for batch in in_flight:
            tl.done(batch)
        in_flight = []
        while batch := tl.take(3):
            in_flight.append(batch)
            sent += batch
    per_task: dict[str, list[int]] = {}
    for task, n in sent:
        per_task.setdefault(task, []).append(n)
    assert per_task == {t: list(range(c)) for t, c in counts.items() if c}
    assert peak <= limit
