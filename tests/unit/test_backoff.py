"""`Backoff`: the one rule behind every retry."""

from __future__ import annotations

import random

import pytest

from tidegate.backoff import Backoff
from tidegate.errors import ConfigError


def test_doubles_from_the_base_up_to_the_cap_without_jitter() -> None:
    b = Backoff(base_s=0.5, cap_s=4.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_the_factor_is_used() -> None:
    b = Backoff(base_s=1.0, cap_s=100.0, factor=3.0, jitter=0.0)
    assert [b.delay(n) for n in (1, 2, 3)] == [1.0, 3.0, 9.0]


def test_jitter_spreads_within_its_fraction_and_is_not_constant() -> None:
    b = Backoff(base_s=1.0, cap_s=60.0, jitter=0.2)
    rng = random.Random(7)
    delays = [b.delay(3, rng) for _ in range(500)]
    assert all(3.2 <= d <= 4.8 for d in delays)
    # Drivers that failed together must not retry in lockstep.
    assert max(delays) - min(delays) > 1.0


def test_the_cap_holds_with_jitter_too() -> None:
    b = Backoff(base_s=1.0, cap_s=10.0, jitter=0.2)
    assert all(b.delay(50, random.Random(i)) <= 12.0 for i in range(100))


def test_huge_failure_counts_do_not_overflow() -> None:
    assert Backoff(base_s=1.0, cap_s=5.0, jitter=0.0).delay(100_000) == 5.0


def test_zero_or_negative_failures_count_as_the_first() -> None:
    b = Backoff(base_s=0.2, cap_s=5.0, jitter=0.0)
    assert b.delay(0) == b.delay(1) == 0.2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": 0.0, "cap_s": 1.0},
        {"base_s": 2.0, "cap_s": 1.0},
        {"base_s": 1.0, "cap_s": 2.0, "factor": 0.5},
        {"base_s": 1.0, "cap_s": 2.0, "jitter": 1.0},
    ],
)
def test_nonsense_is_refused_with_a_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="backoff needs"):
        Backoff(**kwargs)
