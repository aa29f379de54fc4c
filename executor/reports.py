"""What an executor says about an attempt: the events it builds, published until JetStream
has them, and the heartbeat that shows what runs here."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, cast

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.backoff import Backoff
from tidegate.bus.lost import lose_unreadable
from tidegate.bus.publish import Outgoing, Publisher, unsendable
from tidegate.executor.workmsg import Slot
from tidegate.supervise import until_done
from tidegate.wire import (
    FINISHED_BY_STATE,
    AnyEvent,
    ClientRecord,
    Heartbeat,
    Running,
    RunningTask,
    encode,
    now,
)

# A terminal report waits for NATS as long as it takes (JetStream holds the work meanwhile).
REPORT_RETRY = Backoff(base_s=0.2, cap_s=5.0)


def finished_event(
    slot: Slot, state: str, *, executor: str, sensitive: bool, **fields: Any
) -> AnyEvent:
    """The terminal event `state` of the slot's attempt."""
    item = slot.item
    event = FINISHED_BY_STATE[state](
        task_id=item.task_id,
        client=item.client,
        key=item.spec.key,
        attempt=slot.attempt,
        submitted_at=item.submitted_at,
        executor=executor,
        sensitive=sensitive,
        run=item.run,
        **fields,
    )
    return cast(AnyEvent, event)


def running_event(slot: Slot, *, executor: str) -> Running:
    """`running`, sent to sensitive clients only: others see it through the heartbeats."""
    item = slot.item
    return Running(
        task_id=item.task_id,
        client=item.client,
        key=item.spec.key,
        attempt=slot.attempt,
        submitted_at=item.submitted_at,
        executor=executor,
        at=now(),
        started_at=slot.started_at,
        sensitive=True,
        run=item.run,
    )


async def report(publisher: Publisher, event: AnyEvent) -> None:
    """Publish an event until JetStream acknowledges it (a timeout is retried, same id)."""
    out = Outgoing(
        subject=names.event_subject(event.client),
        payload=encode(event),
        msg_id=event.event_id,
    )
    await until_done(
        partial(publisher.publish, out),
        what=f"reporting {event.event_id}",
        backoff=REPORT_RETRY,
        give_up=unsendable,
    )


WORK_STAGE = "work"  # the dead-letter stage of work messages that cannot be read


async def lose_undecodable(
    js: JetStreamContext,
    publisher: Publisher,
    msg: Msg,
    exc: Exception,
    clients: Callable[[str], ClientRecord | None],
    executor: str,
) -> None:
    """A work message that cannot be read can never run: its task (named by the message id)
    is lost with the reason, and the message is set aside as a dead letter, not retried."""
    parsed = names.parse_work_subject(msg.subject)
    client = parsed[2] if parsed is not None else None
    record = clients(client) if client is not None else None
    await lose_unreadable(
        js,
        publisher,
        msg,
        stage=WORK_STAGE,
        client=client,
        reason=f"undecodable work message on {msg.subject}: {exc}",
        attempt=msg.metadata.num_delivered,
        sensitive=bool(record and record.sensitive),
        executor=executor,
    )


def heartbeat(
    executor: str,
    *,
    pool: str,
    slots: int,
    running: Iterable[Slot],
    draining: bool,
    cordoned: bool,
) -> Heartbeat:
    """The executor's snapshot for its key in the executors bucket."""
    return Heartbeat(
        executor=executor,
        host=socket.gethostname(),
        pid=os.getpid(),
        pools=[pool],
        slots=slots,
        running=[
            RunningTask(
                task_id=s.item.task_id,
                client=s.item.client,
                key=s.item.spec.key,
                attempt=s.attempt,
                pool=s.item.pool,
                started_at=s.started_at,
                submitted_at=s.item.submitted_at,
                run=s.item.run,
            )
            for s in running
        ],
        load=os.getloadavg()[0],
        at=now(),
        draining=draining,
        cordoned=cordoned,
    )
