"""Create or update every stream, consumer and KV bucket, idempotently, at component start.

Any number of drivers and executors may run this at once: `add_stream`/`add_consumer` with the
same config are no-ops on the server, and a changed config is applied with an update. The KV
buckets are made in buckets.py; `ensure_all` makes everything.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from tidegate import names
from tidegate.bus.buckets import LEASE_TTL_S as LEASE_TTL_S  # the notifier imports it from here
from tidegate.bus.buckets import Buckets, ensure_buckets
from tidegate.bus.ownership import CONSUMER_OWNED, STREAM_OWNED, merge, report
from tidegate.config import Limits
from tidegate.errors import TopologyError
from tidegate.wire import MAX_ATTEMPTS_LIMIT, TaskClass

log = logging.getLogger(__name__)

# Pending acks per consumer: the server-side cap on messages a consumer may hold unacked.
# The projector holds a whole batch (plus the next one) before it acks.
ROUTE_MAX_ACK_PENDING = 20_000
PROJECTOR_MAX_ACK_PENDING = 50_000
WORK_MAX_ACK_PENDING = 100_000
# How long a consumer waits for an ack before it redelivers. Whoever holds messages longer
# (the projector during an outage, the notifier behind a slow endpoint) keeps them alive at a
# fraction of these; the work consumer's is a setting (`Limits.work_ack_wait_s`).
ROUTE_ACK_WAIT_S = 30.0
# A client's route consumer is deleted by the server after this long without pulls
# (`DriverSettings.route_inactive_threshold_s`).
ROUTE_INACTIVE_THRESHOLD_S = 7 * 24 * 3600.0
READY_ACK_WAIT_S = 30.0
PROJECTOR_ACK_WAIT_S = 30.0
# The drivers' counter samples: the console charts the last hour, so older samples age out.
# Small by nature (a sample every few seconds per driver); the byte cap only guards against a
# runaway publisher, and the oldest go first when it is hit: a history, not a buffer.
STATS_MAX_AGE_S = 3600.0
STATS_MAX_BYTES = 64 * 1024**2
STATS_MAX_MSG_BYTES = 4096
# Deliveries before a route, ready, projector or notify message is set aside as a dead letter
# (`Limits.max_deliver` overrides it; the work consumer's bound follows attempts). Generous:
# with the keep-alives above, a healthy message is delivered once or twice even through an
# outage, while a message that crashes its stage every time is out of the way within minutes.
DEFAULT_MAX_DELIVER = 20
# A work message's deliveries: at most `MAX_ATTEMPTS_LIMIT` attempts (the most a task may ask
# for), plus this many graceful hand-backs (a drain or shutdown, an executor's own error before
# the process started), which are not attempts (executor/workmsg.py counts them). A message
# handed back more often than that is set aside as a dead letter like any other.
WORK_HANDBACK_ALLOWANCE = 20
WORK_MAX_DELIVER = MAX_ATTEMPTS_LIMIT + WORK_HANDBACK_ALLOWANCE


async def _ensure_stream(
    js: JetStreamContext, config: StreamConfig, owned: frozenset[str] = STREAM_OWNED
) -> None:
    try:
        await js.add_stream(config)  # a no-op when it exists exactly so
        return
    except APIError as exc:  # exists otherwise (400), or cannot be made (R3 on one server)
        try:
            info = await js.stream_info(config.name or "")
        except NotFoundError:
            raise TopologyError(
                f"cannot create stream {config.name}: {exc.description}"
                + (" (replicas need a NATS cluster)" if (config.num_replicas or 1) > 1 else "")
            ) from exc
    # It exists with other settings: bring ours to the fields Tidegate owns, and leave what an
    # operator tuned on the server (sizes, ages, replicas) as it is.
    result = merge(info.config, config, owned)
    report("stream", config.name or "", result)
    if result.changed:
        try:
            await js.update_stream(result.config)
        except BadRequestError as exc:
            raise TopologyError(
                f"cannot update stream {config.name} ({', '.join(result.changed)}): "
                f"{exc.description}"
            ) from exc


async def _ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    # Without an explicit action the server creates or updates in place; a change it cannot
    # apply is refused, and an operator must decide. An existing consumer keeps what an
    # operator tuned (max ack pending): only the fields Tidegate owns are brought up to date.
    try:
        info = await js.consumer_info(stream, config.durable_name or "")
    except NotFoundError:
        pass
    else:
        result = merge(info.config, config, CONSUMER_OWNED)
        report("consumer", f"{stream}/{config.durable_name}", result)
        if not result.changed:
            return
        config = result.config
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        raise TopologyError(
            f"cannot create or update consumer {config.durable_name!r} on {stream}: "
            f"{exc.description}. If it exists with settings that cannot change in place, "
            f"delete it (`nats consumer rm {stream} {config.durable_name}`) while no "
            "component runs"
        ) from exc


def _stream(
    name: str, subject: str, retention: RetentionPolicy, max_bytes: int, limits: Limits, **more: Any
) -> StreamConfig:
    """Every stream: file storage, publishers refused when full (never a silent drop), and the
    dedup window of `Nats-Msg-Id`."""
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=retention,
        discard=DiscardPolicy.NEW,
        max_bytes=max_bytes,
        storage=StorageType.FILE,
        duplicate_window=limits.duplicate_window_s,
        num_replicas=limits.replicas,
        **more,
    )


def _per_client_quota(limits: Limits) -> dict[str, Any]:
    """A subject per client (TASKS) or per client and pool (READY): a per-subject cap that
    refuses new messages is a per-client quota, so one client's backlog cannot take the room
    every client shares, and only that client's publishers are refused (`BufferFull`)."""
    return {"max_msgs_per_subject": limits.client_buffer_max, "discard_new_per_subject": True}


def _stats_stream(replicas: int) -> StreamConfig:
    return StreamConfig(
        name=names.STATS_STREAM,
        subjects=[names.STATS_ALL],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=STATS_MAX_AGE_S,
        max_bytes=STATS_MAX_BYTES,
        max_msg_size=STATS_MAX_MSG_BYTES,
        storage=StorageType.FILE,
        num_replicas=replicas,
    )


def _dead_stream(limits: Limits) -> StreamConfig:
    """Message dead letters: kept for `dead_max_age_s`, refused when full (a dead letter is
    data nobody looked at yet: never dropped to make room). One dedup window as the others,
    so a message set aside twice (two drivers, a retry after a lost PubAck) is stored once."""
    return _stream(
        names.DEAD_STREAM,
        names.DEAD_ALL,
        RetentionPolicy.LIMITS,
        limits.dead_max_bytes,
        limits,
        max_age=limits.dead_max_age_s,
    )


def _durable(
    name: str,
    subject: str,
    *,
    ack_wait: float,
    max_ack_pending: int,
    max_deliver: int = DEFAULT_MAX_DELIVER,
    **more: Any,
) -> ConsumerConfig:
    """Every consumer: durable, explicit acks, from the start of its stream, and a bounded
    number of deliveries: a message that reaches it is dead-lettered (`driver.poison`), never
    cycled forever."""
    return ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        filter_subject=subject,
        **more,
    )


async def ensure_streams(js: JetStreamContext, limits: Limits, *, notifier: bool = False) -> None:
    """The streams and the consumers every driver shares."""
    work_queue = RetentionPolicy.WORK_QUEUE
    for config in (
        _stream(
            names.TASKS_STREAM,
            names.SUBMIT_ALL,
            work_queue,
            limits.tasks_max_bytes,
            limits,
            max_msg_size=limits.max_task_bytes * 4,
            **_per_client_quota(limits),
        ),
        _stream(
            names.READY_STREAM,
            names.READY_ALL,
            work_queue,
            limits.tasks_max_bytes,
            limits,
            **_per_client_quota(limits),
        ),
        _stream(names.WORK_STREAM, names.WORK_ALL, work_queue, limits.work_max_bytes, limits),
        _stats_stream(limits.replicas),
        _dead_stream(limits),
    ):
        await _ensure_stream(js, config)
    # A work-queue stream allows no overlapping consumers: the single all-clients route
    # consumer of earlier versions must go before the per-client ones can exist.
    try:
        await js.delete_consumer(names.TASKS_STREAM, names.LEGACY_ROUTE_CONSUMER)
    except NotFoundError:
        pass
    await _ensure_event_stream(js, limits, notifier=notifier)


async def _ensure_event_stream(js: JetStreamContext, limits: Limits, *, notifier: bool) -> None:
    """The events stream and its consumers. Interest retention: an event stays until every
    consumer (projector, notifier partitions) acked it, so the consumers are created with the
    stream, before any event (no callback may be lost while no notifier runs yet), and the
    partitions' subject transform is changed only once every partition's consumer exists (an
    event stored for a partition no consumer reads would be dropped once projected).

    Only the drivers (`notifier`) apply their partition count to an existing stream and to
    existing notify consumers: an executor or a tool started without it must not undo it (a
    missing stream or consumer is still made, with `limits`' count)."""
    events = _stream(
        names.EVENTS_STREAM,
        names.EVENT_ALL,
        RetentionPolicy.INTEREST,
        limits.events_max_bytes,
        limits,
        subject_transform=_event_partitions(limits.notify_partitions),
    )
    await _ensure_stream(js, events, STREAM_OWNED - {"subject_transform"})
    consumers = [(names.PROJECTOR_CONSUMER, [names.EVENT_ALL], limits.projector_ack_wait_s)]
    for partition in reversed(range(limits.notify_partitions)):
        filters = names.notify_filters(partition, limits.notify_partitions)
        consumers.append((names.notify_consumer(partition), filters, limits.notify_ack_wait_s))
    for name, filters, ack_wait in consumers:
        config = _durable(
            name,
            filters[0],
            ack_wait=ack_wait,
            max_ack_pending=PROJECTOR_MAX_ACK_PENDING,
            max_deliver=limits.max_deliver,
        )
        if len(filters) > 1:
            config = dataclasses.replace(config, filter_subject=None, filter_subjects=filters)
        if notifier or name == names.PROJECTOR_CONSUMER or not await _exists(js, name):
            await _ensure_consumer(js, names.EVENTS_STREAM, config)
    if notifier:
        await _ensure_stream(js, events)  # now the transform (an event's partition) may change


async def _exists(js: JetStreamContext, consumer: str) -> bool:
    try:
        await js.consumer_info(names.EVENTS_STREAM, consumer)
    except NotFoundError:
        return False
    return True


def _event_partitions(partitions: int) -> SubjectTransform | None:
    """How the events stream stores a client's events in its notifier partition."""
    transform = names.event_partition_transform(partitions)
    return None if transform is None else SubjectTransform(src=transform[0], dest=transform[1])


async def ensure_work_consumer(
    js: JetStreamContext, pool: str, task_class: TaskClass, limits: Limits
) -> str:
    """The executors of one pool share one durable consumer per class."""
    durable = names.work_consumer(pool, task_class)
    config = _durable(
        durable,
        names.work_filter(pool, task_class),
        ack_wait=limits.work_ack_wait_s,
        max_ack_pending=WORK_MAX_ACK_PENDING,
        # Attempts, not deliveries, bound a task's runs (the executor counts them); this only
        # stops a message that is handed back without end.
        max_deliver=WORK_MAX_DELIVER,
    )
    await _ensure_consumer(js, names.WORK_STREAM, config)
    return durable


async def ensure_route_consumer(
    js: JetStreamContext,
    client: str,
    *,
    max_deliver: int = DEFAULT_MAX_DELIVER,
    inactive_threshold_s: float = ROUTE_INACTIVE_THRESHOLD_S,
) -> str:
    """One consumer per client on the submission stream, made when its first task arrives.

    A client that stops submitting leaves no consumer behind for long: the server deletes it
    after `inactive_threshold_s` without pulls. The router forgets an idle consumer well
    before that and makes it again (this call) when the client's next task arrives."""
    durable = names.route_consumer(client)
    config = _durable(
        durable,
        names.submit_subject(client),
        ack_wait=ROUTE_ACK_WAIT_S,
        max_ack_pending=ROUTE_MAX_ACK_PENDING,
        max_deliver=max_deliver,
        inactive_threshold=inactive_threshold_s,
    )
    await _ensure_consumer(js, names.TASKS_STREAM, config)
    return durable


async def ensure_ready_consumer(
    js: JetStreamContext, client: str, pool: str, *, max_deliver: int = DEFAULT_MAX_DELIVER
) -> str:
    """One consumer per client and pool: the dispatcher picks whose tasks go next."""
    durable = names.ready_consumer(client, pool)
    subject = names.ready_subject(client, pool)
    config = _durable(
        durable,
        subject,
        ack_wait=READY_ACK_WAIT_S,
        max_ack_pending=ROUTE_MAX_ACK_PENDING,
        max_deliver=max_deliver,
    )
    await _drop_legacy(js, names.READY_STREAM, names.legacy_ready_consumer(client, pool), subject)
    await _ensure_consumer(js, names.READY_STREAM, config)
    return durable


async def drop_legacy_ready_consumers(js: JetStreamContext) -> int:
    """Delete every ready consumer of the earlier naming (a driver does it at start; the
    ones on subjects with waiting tasks are also replaced at first use). Returns how many."""
    dropped = 0
    offset = 0
    while True:
        page = await js.consumers_info(names.READY_STREAM, offset=offset)
        if not page:
            return dropped
        offset += len(page)
        for info in page:
            parsed = names.parse_ready_subject(info.config.filter_subject or "")
            if parsed is None or info.name != names.legacy_ready_consumer(*parsed):
                continue
            try:
                await js.delete_consumer(names.READY_STREAM, info.name)
            except NotFoundError:
                continue  # another driver deleted it first
            log.info("deleted ready consumer %s: renamed by this version", info.name)
            dropped += 1


async def _drop_legacy(js: JetStreamContext, stream: str, legacy: str, subject: str) -> None:
    """Delete a consumer of an earlier naming that filters `subject`: a work-queue stream
    refuses a second consumer on it. Its unacked messages go back to the stream and are
    delivered again through the new consumer (dedup ids make a second hand-off a no-op).
    Only a consumer on exactly this subject goes: the legacy name alone is ambiguous."""
    try:
        info = await js.consumer_info(stream, legacy)
    except NotFoundError:
        return
    if info.config.filter_subject != subject:
        return
    log.info("deleting consumer %s on %s: renamed by this version", legacy, stream)
    try:
        await js.delete_consumer(stream, legacy)
    except NotFoundError:
        pass  # another component deleted it first


async def ensure_all(js: JetStreamContext, limits: Limits, *, notifier: bool = False) -> Buckets:
    """`notifier`: this component (a driver) applies `limits.notify_partitions` (see
    `_ensure_event_stream`)."""
    await ensure_streams(js, limits, notifier=notifier)
    return await ensure_buckets(js, limits)
