"""Handing JetStream messages back at once when a component stops.

A message a stopping component took but never settled would otherwise wait out its consumer's
ack wait (30 s or more) before another component gets it; under a backlog that is thousands of
tasks standing still. Every message pulled is noted here, and `hand_back` naks those still
unsettled, and those delivered but not read yet, so they are redelivered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tidegate.bus.natsconn import round_trip

log = logging.getLogger(__name__)

_ACK_PREFIX = "$JS.ACK."
# The longest a stage waits for a first message (the notifier, the projector): a fetch left
# running by a cancelled caller ends within it.
_LONGEST_PULL_WAIT_S = 1.0


def _settled(msg: Msg) -> bool:
    # nats-py marks a message once it was acked, nak'ed or terminated (not for in_progress).
    return bool(msg._ackd)


class Taken:
    """The messages this process pulled; settled ones are forgotten as it goes."""

    def __init__(self, prune_at: int = 10_000) -> None:
        self._msgs: list[Msg] = []
        self._prune_at = prune_at
        self._floor = prune_at
        self.fetches: set[asyncio.Future[list[Msg]]] = set()

    def add(self, msgs: Iterable[Msg]) -> None:
        self._msgs.extend(msgs)
        if len(self._msgs) > self._prune_at:
            self._msgs = [m for m in self._msgs if not _settled(m)]
            # Amortised: a process holding many messages on purpose is not scanned each time.
            self._prune_at = max(self._floor, 2 * len(self._msgs))

    def watch(self, fetch: asyncio.Future[list[Msg]], *, note_result: bool = True) -> None:
        """A fetch in flight: `hand_back` waits for it, and its messages are noted when it
        ends (unless it notes them itself), even if whoever awaited it was cancelled."""
        self.fetches.add(fetch)
        fetch.add_done_callback(self._fetched if note_result else self.fetches.discard)

    def _fetched(self, fetch: asyncio.Future[list[Msg]]) -> None:
        self.fetches.discard(fetch)
        if not fetch.cancelled() and fetch.exception() is None:
            self.add(fetch.result())

    def unsettled(self) -> list[Msg]:
        self._msgs = [m for m in self._msgs if not _settled(m)]
        return list(self._msgs)


TAKEN = Taken()


def _queued(subs: Iterable[Subscription]) -> list[Msg]:
    """JetStream messages delivered to these subscriptions that nobody has read (a pull
    answered after its caller was cancelled), taken out of their queues."""
    found: list[Msg] = []
    for sub in subs:
        queue = sub._pending_queue
        while not queue.empty():
            msg = queue.get_nowait()
            queue.task_done()
            if msg.reply and msg.reply.startswith(_ACK_PREFIX):
                found.append(msg)
    return found


def keep_late_deliveries(nc: NATS) -> None:
    """Call before a stopping component's loops are cancelled. A loop that ends unsubscribes
    (its `finally`), and nats-py then drops whatever is still on its way to that subscription:
    answers to its last pull, which the server would hold until their ack wait. From now on a
    subscription stays known to the connection, so those land in its queue for `hand_back`."""
    nc._remove_sub = lambda sid, max_msgs=0: None  # type: ignore[method-assign]


async def hand_back(nc: NATS, *, timeout: float = 1.0) -> int:
    """Nak every message taken and not settled, and every one delivered but unread; returns
    how many. For a component that stops: call it once its loops have ended, as the last
    thing before closing the connection (it ends every subscription of `nc`)."""
    subs = list(nc._subs.values())
    # The server is told to stop delivering first: a pull request of ours still waiting there
    # would otherwise take a nak'ed message straight back to this stopping process. Locally
    # the subscriptions stay until the flush's PONG, so that what the server sent before it
    # (answers to pulls already made) lands in their queues rather than being dropped.
    for sub in subs:
        with contextlib.suppress(Exception):
            await nc._send_unsubscribe(sub._id)
    with contextlib.suppress(Exception):
        await round_trip(nc, timeout)
    if TAKEN.fetches:  # pulls that outlived their cancelled callers end within their wait
        await asyncio.wait(set(TAKEN.fetches), timeout=timeout + _LONGEST_PULL_WAIT_S)
    handed = 0
    for msg in TAKEN.unsettled() + _queued(subs):
        if _settled(msg):
            continue
        with contextlib.suppress(Exception):  # disconnected: the ack wait does it instead
            await msg.nak()
            handed += 1
    with contextlib.suppress(Exception):
        await round_trip(nc, timeout)
    return handed
