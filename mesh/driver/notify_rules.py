"""Which events the notifier calls back, and which are too late to (mesh/driver/notify.py)."""

from __future__ import annotations

import logging
from collections import OrderedDict

from tidegate.wire import STATE_RANK, AnyEvent, ClientRecord

log = logging.getLogger(__name__)

_LATEST_MAX = 200_000


def wants_callback(event: AnyEvent, record: ClientRecord | None) -> bool:
    if record is None or not (record.callback_url or record.callback_nats):
        return False
    if event.state == "queued":
        return False  # the PubAck was the acceptance
    return event.terminal or event.sensitive


class LatestStates:
    """The newest (attempt, rank) called back per task (bounded), to drop late reports: an
    executor that was cut off may report attempt 1 after attempt 2 was called back."""

    def __init__(self, limit: int = _LATEST_MAX) -> None:
        self._limit = limit
        # Per run: a later run of a task id starts again at attempt 1, and is not stale.
        self._latest: OrderedDict[tuple[str, int], tuple[int, int]] = OrderedDict()

    def stale(self, event: AnyEvent) -> bool:
        key = (event.attempt, STATE_RANK[event.state])
        run = (event.task_id, event.run)
        last = self._latest.get(run)
        if last is not None and key < last:
            log.info("not calling back %s: attempt %d is stale", event.event_id, event.attempt)
            return True
        self._latest[run] = key
        self._latest.move_to_end(run)
        while len(self._latest) > self._limit:
            self._latest.popitem(last=False)
        return False
