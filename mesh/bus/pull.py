"""Pull "what is there now": wait for the first message, then take the rest without waiting.

nats-py's `fetch(n, timeout)` sends a lingering pull request, and the server holds it until
`n` messages arrived or the timeout passed: with fewer than `n` waiting, every fetch costs
the whole timeout. Routing, dispatching and executors want the opposite (latency), so they
pull through here; the projector, which wants to linger, keeps `fetch`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

_STATUS = "Status"

log = logging.getLogger(__name__)


async def pull(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages: the first within `wait` seconds (else none), then the rest
    that are available at once."""
    msgs = await first_message(sub, wait)
    if msgs and batch > 1:
        msgs.extend(await take_available(sub, batch - 1))
    return msgs


async def first_message(sub: JetStreamContext.PullSubscription, wait: float) -> list[Msg]:
    """One message as soon as there is one, or none after `wait` seconds."""
    try:
        return list(await sub.fetch(1, timeout=wait))
    except (nats.errors.TimeoutError, TimeoutError):
        return []


async def take_available(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """Up to `batch` messages that are there now, without waiting for more."""
    # A no-wait request without `expires` is answered at once: the messages there are, then
    # a status message (404/408) if it could not fill the batch.
    request = json.dumps({"batch": batch, "no_wait": True}).encode()
    await sub._nc.publish(sub._nms, request, sub._deliver)
    out: list[Msg] = []
    while len(out) < batch:
        try:
            msg = await sub._sub.next_msg(timeout=2.0)
        except (nats.errors.TimeoutError, TimeoutError):
            break
        if not msg.data and msg.headers and _STATUS in msg.headers:
            break
        out.append(msg)
    return out


async def ack_all(msgs: Iterable[Msg]) -> None:
    """Ack one by one: each ack is a buffered publish, and a task per ack (gather) costs
    more than the ack itself at flood rates."""
    for msg in msgs:
        await msg.ack()


async def settle_quietly(msgs: Iterable[Msg], action: str, **kwargs: float) -> None:
    """`nak`, `in_progress` or `term` each message; errors only logged (best effort)."""
    for msg in msgs:
        try:
            await getattr(msg, action)(**kwargs)
        except Exception as exc:
            log.warning("%s of %s failed: %s", action, msg.subject, exc)
