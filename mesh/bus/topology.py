"""Create or update every stream, consumer and KV bucket, idempotently, at component start.

Any number of drivers and executors may run this at once: `add_stream`/`add_consumer` with the
same config are no-ops on the server, and a changed config is applied with an update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.config import Limits
from tidegate.errors import TopologyError
from tidegate.wire import TaskClass

log = logging.getLogger(__name__)

# Pending acks per consumer: the server-side cap on messages a consumer may hold unacked.
# The projector holds a whole batch (plus the next one) before it acks.
ROUTE_MAX_ACK_PENDING = 20_000
PROJECTOR_MAX_ACK_PENDING = 50_000
WORK_MAX_ACK_PENDING = 100_000
LEASE_TTL_S = 5.0  # a lease its holder stopped renewing (it died) frees itself this fast
# How long a consumer waits for an ack before it redelivers. Whoever holds messages longer
# (the projector during an outage, the notifier behind a slow endpoint) keeps them alive at a
# fraction of these; the work consumer's is a setting (`Limits.work_ack_wait_s`).
ROUTE_ACK_WAIT_S = 30.0
READY_ACK_WAIT_S = 30.0
PROJECTOR_ACK_WAIT_S = 30.0
NOTIFY_ACK_WAIT_S = 60.0
# The drivers' counter samples: the console charts the last hour, so older samples age out.
# Small by nature (a sample every few seconds per driver); the byte cap only guards against a
# runaway publisher, and the oldest go first when it is hit: a history, not a buffer.
STATS_MAX_AGE_S = 3600.0
STATS_MAX_BYTES = 64 * 1024**2
STATS_MAX_MSG_BYTES = 4096


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (e.g. new limits): apply ours.
        await js.update_stream(config)


async def _ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    # Without an explicit action the server creates or updates in place (ack wait, max ack
    # pending, ...); a change it cannot apply is refused, and an operator must decide.
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
        **more,
    )


def _stats_stream() -> StreamConfig:
    return StreamConfig(
        name=names.STATS_STREAM,
        subjects=[names.STATS_ALL],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=STATS_MAX_AGE_S,
        max_bytes=STATS_MAX_BYTES,
        max_msg_size=STATS_MAX_MSG_BYTES,
        storage=StorageType.FILE,
    )


def _durable(
    name: str, subject: str, *, ack_wait: float, max_ack_pending: int, **more: Any
) -> ConsumerConfig:
    """Every consumer: durable, explicit acks, from the start of its stream."""
    return ConsumerConfig(
        durable_name=name,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=subject,
        **more,
    )


async def ensure_streams(js: JetStreamContext, limits: Limits) -> None:
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
        ),
        _stream(names.READY_STREAM, names.READY_ALL, work_queue, limits.tasks_max_bytes, limits),
        _stream(names.WORK_STREAM, names.WORK_ALL, work_queue, limits.work_max_bytes, limits),
        # Interest retention: an event stays until every consumer (projector, notifier) acked.
        _stream(
            names.EVENTS_STREAM,
            names.EVENT_ALL,
            RetentionPolicy.INTEREST,
            limits.events_max_bytes,
            limits,
        ),
        _stats_stream(),
    ):
        await _ensure_stream(js, config)
    # A work-queue stream allows no overlapping consumers: the single all-clients route
    # consumer of earlier versions must go before the per-client ones can exist.
    try:
        await js.delete_consumer(names.TASKS_STREAM, names.LEGACY_ROUTE_CONSUMER)
    except NotFoundError:
        pass
    # Both created with the stream, before any event: interest retention keeps events only for
    # consumers that exist, and no callback may be lost while no notifier runs yet.
    for name, ack_wait in (
        (names.PROJECTOR_CONSUMER, PROJECTOR_ACK_WAIT_S),
        (names.NOTIFY_CONSUMER, NOTIFY_ACK_WAIT_S),
    ):
        await _ensure_consumer(
            js,
            names.EVENTS_STREAM,
            _durable(
                name, names.EVENT_ALL, ack_wait=ack_wait, max_ack_pending=PROJECTOR_MAX_ACK_PENDING
            ),
        )


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
    )
    await _ensure_consumer(js, names.WORK_STREAM, config)
    return durable


async def ensure_route_consumer(js: JetStreamContext, client: str) -> str:
    """One consumer per client on the submission stream, made when its first task arrives."""
    durable = names.route_consumer(client)
    config = _durable(
        durable,
        names.submit_subject(client),
        ack_wait=ROUTE_ACK_WAIT_S,
        max_ack_pending=ROUTE_MAX_ACK_PENDING,
        # A client that stops submitting leaves no consumer behind for long.
        inactive_threshold=7 * 24 * 3600.0,
    )
    await _ensure_consumer(js, names.TASKS_STREAM, config)
    return durable


async def ensure_ready_consumer(js: JetStreamContext, client: str, pool: str) -> str:
    """One consumer per client and pool: the dispatcher picks whose tasks go next."""
    durable = names.ready_consumer(client, pool)
    config = _durable(
        durable,
        names.ready_subject(client, pool),
        ack_wait=READY_ACK_WAIT_S,
        max_ack_pending=ROUTE_MAX_ACK_PENDING,
    )
    await _ensure_consumer(js, names.READY_STREAM, config)
    return durable


@dataclass(frozen=True)
class Buckets:
    executors: KeyValue
    clients: KeyValue
    cancel: KeyValue
    leases: KeyValue
    dispatch: KeyValue
    executor_control: KeyValue


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.create_key_value(config)
    except BadRequestError:
        # The bucket exists with other settings (say, a new heartbeat TTL): apply ours to
        # its stream, keeping the rest of the stream's configuration.
        kv = await js.key_value(config.bucket)
        info = await js.stream_info(names.kv_stream(config.bucket))
        marker = config.limit_marker_ttl
        await js.update_stream(
            info.config.evolve(
                max_age=config.ttl,
                max_msgs_per_subject=config.history,
                subject_delete_marker_ttl=marker,
            )
        )
        return kv


def _bucket(
    name: str, storage: StorageType, ttl: float | None = None, *, marks_expiry: bool = False
) -> KeyValueConfig:
    """Every bucket keeps one value per key. `marks_expiry` leaves a marker when a key ages
    out, so that watchers see an expired heartbeat or lease as a PURGE."""
    return KeyValueConfig(
        bucket=name,
        history=1,
        ttl=ttl,
        storage=storage,
        limit_marker_ttl=ttl if marks_expiry else None,
    )


async def ensure_buckets(js: JetStreamContext, limits: Limits) -> Buckets:
    memory, file = StorageType.MEMORY, StorageType.FILE
    heartbeat_ttl = limits.heartbeat_ttl_s
    return Buckets(
        executors=await _ensure_bucket(
            js, _bucket(names.EXECUTORS_BUCKET, memory, heartbeat_ttl, marks_expiry=True)
        ),
        clients=await _ensure_bucket(js, _bucket(names.CLIENTS_BUCKET, file)),
        cancel=await _ensure_bucket(js, _bucket(names.CANCEL_BUCKET, file, 7 * 24 * 3600)),
        leases=await _ensure_bucket(
            js, _bucket(names.LEASES_BUCKET, memory, LEASE_TTL_S, marks_expiry=True)
        ),
        dispatch=await _ensure_bucket(js, _bucket(names.DISPATCH_BUCKET, memory)),
        # An operator's cordon outlives the executor's restarts (and NATS's): file, no TTL.
        executor_control=await _ensure_bucket(js, _bucket(names.EXECUTOR_CONTROL_BUCKET, file)),
    )


async def ensure_sessions_bucket(js: JetStreamContext, max_age_s: float) -> KeyValue:
    """The console's login sessions, made by the console when it first needs it (no other
    component does). On file, so a NATS restart logs nobody out; an idle session's key ages
    out with the session."""
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.SESSIONS_BUCKET,
            history=1,
            ttl=max_age_s,
            storage=StorageType.FILE,
        ),
    )


async def ensure_all(js: JetStreamContext, limits: Limits) -> Buckets:
    await ensure_streams(js, limits)
    return await ensure_buckets(js, limits)
