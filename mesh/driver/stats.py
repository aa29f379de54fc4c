"""The driver's counters, sampled into the stats stream for the console's charts and rates.

Every driver publishes its own cumulative counters every few seconds; the stream keeps an
hour of them. Any console then computes the same rates from the same samples, and the
history survives a console restart without a database write per sample.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from datetime import datetime

from nats.js import JetStreamContext
from prometheus_client import Counter

from tidegate import names
from tidegate.metrics import DriverMetrics
from tidegate.wire import TERMINAL_STATES, DriverStats, encode, now

log = logging.getLogger(__name__)

LabelFilter = Callable[[Mapping[str, str]], bool]


def _every(_labels: Mapping[str, str]) -> bool:
    return True


def counter_total(counter: Counter, keep: LabelFilter = _every) -> int:
    """Sum of a counter's children whose labels `keep` accepts (all of them by default)."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            # Each child also exposes `_created` (a timestamp), which is no count.
            if sample.name.endswith("_total") and keep(sample.labels):
                total += sample.value
    return int(total)


def _result(result: str) -> LabelFilter:
    return lambda labels: labels.get("result") == result


def _terminal(labels: Mapping[str, str]) -> bool:
    return labels.get("state") in TERMINAL_STATES


def sample(
    metrics: DriverMetrics, *, driver: str, started_at: datetime, seq: int, every_s: float
) -> DriverStats:
    m = metrics
    return DriverStats(
        driver=driver,
        started_at=started_at,
        at=now(),
        seq=seq,
        every_s=every_s,
        accepted=counter_total(m.routed) + counter_total(m.rejected),
        finished=counter_total(m.events, _terminal),
        commits=counter_total(m.commits),
        rows=counter_total(m.rows),
        callbacks_delivered=counter_total(m.callbacks, _result("delivered"))
        + counter_total(m.retries, _result("delivered")),
        callbacks_outboxed=counter_total(m.callbacks, _result("outboxed")),
    )


class StatsSampler:
    """Publishes a sample every `every_s`; a failed publish is skipped, never retried: the
    next sample carries the same counts, only the resolution of the chart suffers."""

    def __init__(
        self, js: JetStreamContext, metrics: DriverMetrics, driver: str, every_s: float
    ) -> None:
        self._js = js
        self._metrics = metrics
        self.driver = driver
        self.every_s = every_s
        self.started_at = now()
        self.stored = 0  # samples the stream acknowledged
        self._subject = names.stats_subject(driver)
        self._failing = False

    async def publish_once(self) -> bool:
        stats = sample(
            self._metrics,
            driver=self.driver,
            started_at=self.started_at,
            seq=self.stored,
            every_s=self.every_s,
        )
        try:
            # Bounded by the period: a sample older than the next one is worthless.
            await self._js.publish(self._subject, encode(stats), timeout=max(1.0, self.every_s))
        except Exception as exc:
            # Once per outage, not every few seconds for as long as it lasts.
            if not self._failing:
                log.warning("stats: cannot publish driver counters (%s); skipping samples", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("stats: publishing driver counters again")
        self._failing = False
        self.stored += 1
        return True

    async def run(self) -> None:
        while True:
            await self.publish_once()
            await asyncio.sleep(self.every_s)
