"""Pull "what is there now": wait for the first message, then take the rest without waiting.

nats-py's `fetch(n, timeout)` sends a lingering pull request, and the server holds it until
`n` messages arrived or the timeout passed: with fewer than `n` waiting, every fetch costs
the whole timeout. Routing, dispatching and executors want the opposite (latency), so they
pull through here; the projector, which wants to linger, keeps `fetch`.
"""

from __future__ import annotations

import json

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

_STATUS = "Status"


async def pull(sub: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages: the first within `wait` seconds (else none), then the rest
    that are available at once."""
    try:
        msgs = list(await sub.fetch(1, timeout=wait))
    except (nats.errors.TimeoutError, TimeoutError):
        return []
    if batch > 1:
        msgs.extend(await _available(sub, batch - 1))
    return msgs


async def _available(sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
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
