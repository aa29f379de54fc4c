"""Create or update every KV bucket, idempotently, at component start (the streams and
consumers: topology.py).

Every bucket keeps one value per key. A bucket that exists with other settings gets ours for
the fields that make it work (see `_ensure_bucket`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.bus.clients import RegistryBuckets
from tidegate.bus.ownership import BUCKET_OWNED, merge, report
from tidegate.config import Limits
from tidegate.errors import TopologyError

LEASE_TTL_S = 5.0  # a lease its holder stopped renewing (it died) frees itself this fast
NOTIFY_FENCE_TTL_S = 24 * 3600.0  # a callback redelivered later than this is not fenced
# Hand-back counts outlive their work message only by accident (an ack whose clean-up failed).
HANDBACKS_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Buckets:
    executors: KeyValue
    clients: KeyValue
    client_secrets: KeyValue
    cancel: KeyValue
    leases: KeyValue
    dispatch: KeyValue
    executor_control: KeyValue
    handbacks: KeyValue
    notify_fence: KeyValue

    @property
    def registry(self) -> RegistryBuckets:
        return RegistryBuckets(records=self.clients, secrets=self.client_secrets)


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.create_key_value(config)
    except APIError as exc:
        try:
            info = await js.stream_info(names.kv_stream(config.bucket))
        except NotFoundError:
            raise TopologyError(
                f"cannot create bucket {config.bucket}: {exc.description}"
                + (" (replicas need a NATS cluster)" if config.replicas > 1 else "")
            ) from exc
    # The bucket exists with other settings (say, a new heartbeat TTL): apply ours to the
    # fields that make it work (one value per key, its TTL), keep an operator's size and
    # replicas.
    ours = info.config.evolve(
        max_age=config.ttl,
        max_msgs_per_subject=config.history,
        subject_delete_marker_ttl=config.limit_marker_ttl,
        num_replicas=config.replicas,
        storage=config.storage,
        # The server refuses a dedup window longer than the TTL (nats-py caps it at creation).
        duplicate_window=min(info.config.duplicate_window or 120.0, config.ttl or 120.0),
    )
    result = merge(info.config, ours, BUCKET_OWNED)
    report("bucket", config.bucket, result)
    if result.changed:
        await js.update_stream(result.config)
    return await js.key_value(config.bucket)


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

    async def ensure(config: KeyValueConfig) -> KeyValue:
        return await _ensure_bucket(js, dataclasses.replace(config, replicas=limits.replicas))

    return Buckets(
        executors=await ensure(
            _bucket(names.EXECUTORS_BUCKET, memory, heartbeat_ttl, marks_expiry=True)
        ),
        clients=await ensure(_bucket(names.CLIENTS_BUCKET, file)),
        client_secrets=await ensure(_bucket(names.CLIENT_SECRETS_BUCKET, file)),
        cancel=await ensure(_bucket(names.CANCEL_BUCKET, file, 7 * 24 * 3600)),
        leases=await ensure(_bucket(names.LEASES_BUCKET, memory, LEASE_TTL_S, marks_expiry=True)),
        dispatch=await ensure(_bucket(names.DISPATCH_BUCKET, memory)),
        # An operator's cordon outlives the executor's restarts (and NATS's): file, no TTL.
        executor_control=await ensure(_bucket(names.EXECUTOR_CONTROL_BUCKET, file)),
        # On file: a hand-back must still not count as an attempt after a NATS restart.
        handbacks=await ensure(_bucket(names.HANDBACKS_BUCKET, file, HANDBACKS_TTL_S)),
        # The notifier's fence must outlive its holder (and a NATS restart): file, a day.
        notify_fence=await ensure(_bucket(names.NOTIFY_FENCE_BUCKET, file, NOTIFY_FENCE_TTL_S)),
    )


async def ensure_sessions_bucket(
    js: JetStreamContext, max_age_s: float, replicas: int = 1
) -> KeyValue:
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
            replicas=replicas,
        ),
    )
