"""The notifier: calls each client back with its tasks' states, in order, never losing one.

Clients are hashed into partitions (`Limits.notify_partitions`, one by default; the events
stream stores each client's events in its partition: mesh/names.py). One driver at a time holds
a partition's lease and consumes its durable consumer in order; a driver may hold several, the
live drivers share them out (each takes no more than its share: partitions / drivers, rounded
up), and the others take over a partition when its lease lapses (mesh/driver/notify_partition.py).
Per client, several callback requests are in flight at once (`callback_concurrency`, 16 by
default), laned by task (mesh/driver/notify_lanes.py, mesh/driver/task_lanes.py): a task's
states go out one request after another, in the order they happened, and never in two requests
at once; different tasks go concurrently. A client taking batches (`callback_batch_max`) gets
each request filled with what waits while its other requests are in flight. Order is per task,
not per client: two tasks' callbacks may arrive in either order. A client whose endpoint hangs
only holds up its own lanes.

- A sensitive event is written to the database (a small group commit) *before* its callback
  goes out, so a status query never lags a callback. The write happens in the client's lane:
  while PostgreSQL is down only sensitive clients wait, everyone else is still called back.
- A non-sensitive client hears of terminal states only, called back as soon as the event
  arrives; the projector writes it later, in its batches.
- A callback that fails goes to the outbox (the only per-callback write), and so does every
  later callback of that client, every task's, until the retry job has drained the outbox:
  order holds, and a failing endpoint is retried with backoff rather than hammered by
  `callback_concurrency` requests at once. (Requests already in flight finish; they are other
  tasks', a task being in one request at a time.)
  Which clients have outboxed callbacks is remembered here, so a client with none is called
  back without asking the database. If the database could not be read when this driver began
  to lead, every client is assumed to have some (order before speed) until it can be read.
- Each client may hold at most `callback_held_max` events in its lanes, waiting or in flight
  (its client record). A client whose endpoint is slower than its events arrive has what waits
  (of the tasks with nothing in flight; the others' follow once theirs is settled) moved, in
  order, to the outbox (acked, drained by the retry job at the endpoint's pace), so it never
  fills the events consumer's pending acks and stalls the others.
- A sensitive row is handed to the group commit as its event arrives (one commit for a whole
  pull, not one per request); its callback waits for that commit.

An event's message is acked only once its callback was delivered or written to the outbox.

Failover keeps order, per partition. The holder sends only while its lease is surely still its
own (a local deadline, checked before every request, a little inside the lease's TTL from the
last renewal), so a holder frozen past its lease sends nothing more when it wakes, and its other
partitions go on. What it holds of that partition goes back at once (nak) only if a renewal
shows the lease still its own; else it is left to the ack wait, since a late nak would hand the
next holder an older state after it sent a newer one. A task's state called back while an older
state of it may be unacked (here, or at an earlier holder in a term's first ack wait) is recorded
in a KV fence before the ack (mesh/driver/fence.py), and redelivered events are checked against
it, so the next holder never calls back an older state after a newer one. One fence serves every
partition: a task's events are all in its client's partition, and a task id names its client.

Changing the partition count moves a client's *later* events to its new partition while its
earlier ones are still called back from the old one, by a holder that may be another driver:
callbacks published around the change may arrive out of order. Change it while the events
stream is drained (or accept that window). Partition 0 keeps the consumer and lease names of the
single notifier of earlier versions, so the default needs no migration at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.lease import Leases
from tidegate.config import Limits
from tidegate.driver.callbacks.outbox import Outbox
from tidegate.driver.callbacks.transport import Transports
from tidegate.driver.fence import DeliveredFence
from tidegate.driver.notify_lanes import DEFAULT_CONCURRENCY, LeaseLost, fence_marks, held_max
from tidegate.driver.notify_partition import RENEW_S, Holdings, Partition, Shared
from tidegate.driver.notify_rules import LatestStates, wants_callback
from tidegate.metrics import DriverMetrics
from tidegate.store.store import Store
from tidegate.supervise import Supervisor
from tidegate.wire import ClientRecord

__all__ = [
    "LatestStates",
    "LeaseLost",
    "Notifier",
    "_fence_marks",
    "held_max",
    "wants_callback",
]

log = logging.getLogger(__name__)

_fence_marks = fence_marks  # its name before the lanes had their own module


class Notifier:
    def __init__(
        self,
        js: JetStreamContext,
        store: Store,
        outbox: Outbox,
        transports: Transports,
        clients: Callable[[str], ClientRecord | None],
        leases: Leases,
        metrics: DriverMetrics,
        *,
        fence: KeyValue | None = None,
        partitions: int = 1,
        callback_concurrency: int = DEFAULT_CONCURRENCY,
        ack_wait_s: float = Limits().notify_ack_wait_s,
    ) -> None:
        self._leases = leases
        self._holdings = Holdings(partitions=partitions)
        shared = Shared(
            js=js,
            store=store,
            outbox=outbox,
            transports=transports,
            clients=clients,
            leases=leases,
            metrics=metrics,
            delivered=DeliveredFence(fence),
            # One for all partitions: a task's events are all in its client's partition.
            latest=LatestStates(),
            holdings=self._holdings,
            concurrency=callback_concurrency,
            ack_wait_s=ack_wait_s,
        )
        self.partitions = [Partition(p, shared) for p in range(partitions)]

    @property
    def leading(self) -> bool:
        """Whether this driver sends the callbacks of at least one partition."""
        return any(p.leading for p in self.partitions)

    async def run(self) -> None:
        sup = Supervisor("notify")
        sup.start("members", self._membership)
        for partition in self.partitions:
            sup.start(f"partition-{partition.index}", partition.run)
        try:
            await sup.wait()
        finally:
            await sup.stop()

    async def _membership(self) -> None:
        """Say this driver is here, and count who else is: the partitions' fair share."""
        key = names.notify_member(self._leases.owner)
        while True:
            try:
                await self._leases.announce(key)
                members = await self._leases.count(names.NOTIFY_MEMBERS_ALL)
            except Exception as exc:  # keep the last count; the next round tries again
                log.warning("cannot count the notifier's drivers: %s", exc)
            else:
                if members != self._holdings.members:
                    log.info(
                        "%d drivers share %d notifier partitions",
                        members,
                        self._holdings.partitions,
                    )
                self._holdings.members = max(1, members)
            await asyncio.sleep(RENEW_S)
