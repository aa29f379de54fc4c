"""The dispatcher's pure rules: turns, room per pool, and the shared token bucket."""

from __future__ import annotations

from tidegate.driver.dispatch import RateState, refill, room_per_pool
from tidegate.driver.rounds import rotate


def test_rotation_changes_who_goes_first() -> None:
    items = ["a", "b", "c"]
    assert [rotate(items, t)[0] for t in range(4)] == ["a", "b", "c", "a"]
    assert sorted(rotate(items, 7)) == items
    assert rotate([], 3) == []


def test_room_follows_live_slots_with_a_floor_for_pools_without_executors() -> None:
    room = room_per_pool({"default": 8}, {"default": 10, "gpu": 3}, per_slot=4, minimum=16)
    assert room == {"default": 32 - 10, "gpu": 16 - 3}


def test_token_bucket_refills_at_the_rate_up_to_one_second_of_burst() -> None:
    assert refill(None, rate=20, at=100.0) == 20  # a fresh client may start a burst at once
    assert refill(RateState(0.0, 100.0), rate=20, at=100.5) == 10
    assert refill(RateState(0.0, 100.0), rate=20, at=160.0) == 20  # capped at the burst
    assert refill(RateState(0.0, 100.0), rate=0.5, at=101.0) == 0.5
    assert refill(RateState(0.0, 100.0), rate=0.5, at=104.0) == 1.0  # at least one task
    assert refill(RateState(5.0, 100.0), rate=20, at=99.0) == 5.0  # a clock step back adds none
