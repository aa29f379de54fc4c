"""The one backoff rule behind every retry: reports, publishes, projector writes, the callback
outbox, restarts of loops and of component processes.

`base * factor ** (failures - 1)`, capped, then spread by ± `jitter` so that a fleet of drivers
that failed together (a database outage) does not retry in lockstep when it comes back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tidegate.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Backoff:
    base_s: float
    cap_s: float
    factor: float = 2.0
    jitter: float = 0.2  # ± this fraction of the delay

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.cap_s and self.factor >= 1 and 0 <= self.jitter < 1):
            raise ConfigError(
                f"backoff needs 0 < base_s <= cap_s, factor >= 1 and 0 <= jitter < 1: {self}"
            )

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1 for the first)."""
        try:
            raw = self.base_s * self.factor ** max(0, failures - 1)
        except OverflowError:  # factor ** a few thousand: long past the cap anyway
            raw = self.cap_s
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, min(raw, self.cap_s) * (1 + spread))
