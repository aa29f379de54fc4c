"""`--workers`: how the slots are shared, the workers' ids, and which control keys each follows."""

from __future__ import annotations

import pytest

from tidegate.errors import ConfigError
from tidegate.executor.workers import WORKER_GROUP_ENV, split_slots, worker_group, worker_ids


@pytest.mark.parametrize(
    ("slots", "workers", "shares"),
    [
        (4, 1, [4]),
        (4, 2, [2, 2]),
        (5, 2, [3, 2]),
        (16, 3, [6, 5, 5]),
        (7, 7, [1] * 7),
        (10, 4, [3, 3, 2, 2]),
    ],
)
def test_slots_are_split_evenly_each_worker_getting_one_at_least(
    slots: int, workers: int, shares: list[int]
) -> None:
    assert split_slots(slots, workers) == shares


def test_every_split_keeps_the_total_and_differs_by_one_at_most() -> None:
    for slots in range(1, 40):
        for workers in range(1, slots + 1):
            shares = split_slots(slots, workers)
            assert len(shares) == workers and sum(shares) == slots
            assert min(shares) >= 1 and max(shares) - min(shares) <= 1


def test_more_workers_than_slots_is_refused() -> None:
    with pytest.raises(ConfigError, match="--workers 5 is more than --slots 4"):
        split_slots(4, 5)
    with pytest.raises(ConfigError):
        split_slots(4, 0)


def test_worker_ids_and_the_control_keys_they_follow() -> None:
    ids = worker_ids("exec-0", 3)
    assert ids == ["exec-0-w0", "exec-0-w1", "exec-0-w2"]
    env = {WORKER_GROUP_ENV: ",".join(ids)}
    assert worker_group("exec-0-w1", env) == ids
    # Not a worker (no group, or a group it is not in): its own key only.
    assert worker_group("exec-0", {}) == ["exec-0"]
    assert worker_group("other", env) == ["other"]
