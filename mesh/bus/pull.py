"""Pull "what is there now": wait for the first message, then take the rest without waiting.

nats-py's `fetch(n, timeout)` sends a lingering pull request, and the server holds it until
`n` messages arrived or the timeout passed: with fewer than `n` waiting, every fetch costs
the whole timeout. Routing, dispatching and executors want the opposite (latency), so they
pull through here; the projector, which wants to linger, keeps `fetch`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate.backoff import Backoff
from tidegate.bus.handback import TAKEN
from tidegate.bus.publish import ack_buffered

_STATUS = "Status"

log = logging.getLogger(__name__)

# A hand-off that failed (a full buffer, NATS busy) is retried later, ever more slowly: every
# hand-back counts a delivery towards the consumer's `max_deliver`, and with 20 deliveries this
# spreads them over about a quarter of an hour before the message is set aside as poison.
HANDOFF_RETRY = Backoff(base_s=2.0, cap_s=60.0)


async def pull(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages: the first within `wait` seconds (else none), then the rest
    that are available at once."""
    msgs = await first_message(sub, wait)
    if msgs and batch > 1:
        msgs.extend(await take_available(sub, batch - 1))
    return msgs


async def first_message(
    sub: JetStreamContext.PullSubscription, wait: float, *, wait_out_unavailable: bool = False
) -> list[Msg]:
    """One message as soon as there is one, or none after `wait` seconds.

    A 503 (no consumer leader answers: an election in a cluster, or the consumer is gone)
    raises, for a caller that makes the consumer again (the router); with
    `wait_out_unavailable` it is "nothing yet" after `wait` seconds instead, for a caller
    whose loop must not end there (an executor: ending it drops its subscription, and with it
    what the server already sent, which then waits out its ack wait)."""
    # Shielded: a cancel (the component stopping) must not lose a message nats-py's fetch has
    # already taken off its queue. The fetch ends by itself within `wait`; what it got is noted
    # for `hand_back` (which waits for such fetches), so it goes back at once.
    fetch = asyncio.ensure_future(sub.fetch(1, timeout=wait))
    TAKEN.watch(fetch)
    try:
        return list(await asyncio.shield(fetch))
    except (nats.errors.TimeoutError, TimeoutError):
        return []
    except nats.js.errors.ServiceUnavailableError:
        if not wait_out_unavailable:
            raise
        await asyncio.sleep(wait)
        return []


async def take_available(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """Up to `batch` messages that are there now, without waiting for more."""
    # Shielded as in `first_message`: nats-py's `next_msg` awaits a task of its own, and a
    # cancel landing after that task took a message off the queue but before our await
    # resumed would drop the message, which then waits out its ack wait (seen: one message of
    # a batch of 250 missing from a stopping driver's hand-back).
    take = asyncio.ensure_future(_take_available(sub, batch))
    TAKEN.watch(take, note_result=False)
    return list(await asyncio.shield(take))


async def _take_available(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    # A no-wait request without `expires` is answered at once: the messages there are, then
    # a status message (404/408) if it could not fill the batch.
    request = json.dumps({"batch": batch, "no_wait": True}).encode()
    await sub._nc.publish(sub._nms, request, sub._deliver)
    out: list[Msg] = []
    while len(out) < batch:
        msg = _next_queued(sub)
        if msg is None:
            try:
                msg = await sub._sub.next_msg(timeout=2.0)
            except (nats.errors.TimeoutError, TimeoutError):
                break
        if not msg.data and msg.headers and _STATUS in msg.headers:
            break
        TAKEN.add((msg,))  # noted as it comes: an error later must not lose it
        out.append(msg)
    return out


def _next_queued(sub: JetStreamContext.PullSubscription) -> Msg | None:
    """A message nats-py has already read, taken as `next_msg` would but without its task and
    timer per message (most of a message's cost at flood rates); None if none is queued."""
    inner = sub._sub
    # nats-py 2.x's queue of a subscription without a callback; without it, `next_msg` alone.
    queue: asyncio.Queue[Msg] | None = getattr(inner, "_pending_queue", None)
    if queue is None or queue.empty():
        return None
    msg = queue.get_nowait()
    inner._pending_size -= len(msg.data)
    queue.task_done()
    return msg


async def ack_all(msgs: Iterable[Msg]) -> None:
    """Ack each, buffered: one write into nats-py's buffer per ack, one flush for all (a task
    per ack, as with gather, would cost more than the ack itself at flood rates)."""
    await ack_buffered(msgs)


async def settle_quietly(msgs: Iterable[Msg], action: str, **kwargs: float) -> None:
    """`nak`, `in_progress` or `term` each message; errors only logged (best effort)."""
    for msg in msgs:
        try:
            await getattr(msg, action)(**kwargs)
        except Exception as exc:
            log.warning("%s of %s failed: %s", action, msg.subject, exc)


async def hand_back(msgs: Iterable[Msg], retry: Backoff = HANDOFF_RETRY) -> None:
    """Nak each message with a delay that grows with its deliveries so far."""
    for msg in msgs:
        try:
            await msg.nak(delay=retry.delay(msg.metadata.num_delivered or 1))
        except Exception as exc:
            log.warning("nak of %s failed: %s", msg.subject, exc)
