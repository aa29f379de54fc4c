"""`lost`: the terminal state of a task that cannot go on, told with its reason.

A ready or work message that cannot be decoded never runs; left at that, its task would stay
`queued` forever. Its dedup id (`Nats-Msg-Id`) still names the task, so the task is reported
`lost` with the reason, and the message itself is set aside as a dead letter. The driver's
reconciler uses the same event for tasks stranded without a live executor.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.deadletters import Counter, set_aside
from tidegate.bus.publish import MSG_ID_HEADER, Outgoing, Publisher
from tidegate.wire import KEY_PATTERN, NAME_RE, Lost, encode, now, task_id

log = logging.getLogger(__name__)

_KEY = re.compile(KEY_PATTERN)


def task_of_msg_id(client: str | None, msg_id: str | None) -> tuple[str, int] | None:
    """(key, run) of the task a ready or work message's `Nats-Msg-Id` names, if it is one of
    `client`'s: `<client>:<key>`, or `<client>:<key>@<run>` once runs are known."""
    if not client or not msg_id or not re.match(NAME_RE, client):
        return None
    ref, sep, run_text = msg_id.rpartition("@")
    run = 0
    if sep and run_text.isdigit():
        msg_id, run = ref, int(run_text)
    prefix = f"{client}:"
    if not msg_id.startswith(prefix):
        return None
    key = msg_id[len(prefix) :]
    return (key, run) if _KEY.match(key) else None


def lost_event(
    *,
    client: str,
    key: str,
    run: int,
    attempt: int,
    submitted_at: datetime,
    reason: str,
    sensitive: bool,
    executor: str | None = None,
) -> Lost:
    at = now()
    return Lost(
        task_id=task_id(client, key),
        client=client,
        key=key,
        attempt=attempt,
        at=at,
        submitted_at=submitted_at,
        finished_at=at,
        reason=reason,
        sensitive=sensitive,
        run=run,
        executor=executor,
    )


def lost_message(event: Lost) -> Outgoing:
    return Outgoing(
        subject=names.event_subject(event.client),
        payload=encode(event),
        msg_id=event.event_id,
    )


async def lose_unreadable(
    js: JetStreamContext,
    publisher: Publisher,
    msg: Msg,
    *,
    stage: str,
    client: str | None,
    reason: str,
    attempt: int,
    sensitive: bool,
    count: Counter | None = None,
    executor: str | None = None,
) -> None:
    """A message that cannot be decoded: its task (when the message id names one) is `lost`
    with the reason, then the message is set aside as a dead letter.

    The event goes first: if it cannot be published, the message is handed back and comes
    again (the event's dedup id makes a second publish harmless); set aside first, a failed
    publish would leave the task without a terminal state.
    """
    task = task_of_msg_id(client, (msg.headers or {}).get(MSG_ID_HEADER))
    if client is not None and task is not None:
        key, run = task
        event = lost_event(
            client=client,
            key=key,
            run=run,
            attempt=attempt,
            # The message's own time: close to the submission, which it no longer tells.
            submitted_at=msg.metadata.timestamp or now(),
            reason=reason,
            sensitive=sensitive,
            executor=executor,
        )
        try:
            await publisher.publish(lost_message(event))
        except Exception as exc:
            log.error("cannot report %s lost (%s); handing its message back", event.task_id, exc)
            try:
                await msg.nak(delay=5.0)
            except Exception as nak_exc:  # it comes back after its ack wait anyway
                log.warning("nak of %s failed: %s", msg.subject, nak_exc)
            return
        log.error("task %s is lost: %s", event.task_id, reason)
    await set_aside(js, msg, stage=stage, reason=reason, client=client, count=count)
