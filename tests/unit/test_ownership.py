"""What a component start changes on an existing stream or consumer, and what it leaves alone."""

from __future__ import annotations

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from tidegate.bus.ownership import BUCKET_OWNED, CONSUMER_OWNED, STREAM_OWNED, merge


def _ours(**more: object) -> StreamConfig:
    base = StreamConfig(
        name="TG_TASKS",
        subjects=["tg.submit.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        discard=DiscardPolicy.NEW,
        max_bytes=4 * 1024**3,
        storage=StorageType.FILE,
        duplicate_window=3600.0,
        num_replicas=1,
    )
    return base.evolve(**more)


def test_an_identical_stream_is_left_alone() -> None:
    result = merge(_ours(), _ours(), STREAM_OWNED)
    assert result.changed == {} and result.kept == {}


def test_operator_sizes_and_replicas_are_kept() -> None:
    server = _ours(max_bytes=10 * 1024**3, num_replicas=3, max_age=86400.0)
    result = merge(server, _ours(), STREAM_OWNED)
    assert result.changed == {}
    assert result.config.max_bytes == 10 * 1024**3
    assert result.config.num_replicas == 3
    assert result.config.max_age == 86400.0  # a field this version does not set at all
    assert result.kept == {
        "max_bytes": (10 * 1024**3, 4 * 1024**3),
        "num_replicas": (3, 1),
    }


def test_owned_fields_are_brought_to_this_version() -> None:
    server = _ours(discard=DiscardPolicy.OLD, duplicate_window=120.0, max_bytes=1024**3)
    result = merge(server, _ours(), STREAM_OWNED)
    assert result.changed == {
        "discard": (DiscardPolicy.OLD, DiscardPolicy.NEW),
        "duplicate_window": (120.0, 3600.0),
    }
    assert result.config.discard == DiscardPolicy.NEW
    assert result.config.duplicate_window == 3600.0
    assert result.config.max_bytes == 1024**3  # still the operator's


def test_unset_and_zero_are_the_same() -> None:
    server = _ours(max_msg_size=-0, discard_new_per_subject=False)
    ours = _ours(max_msg_size=None, discard_new_per_subject=None)
    assert merge(server, ours, STREAM_OWNED).changed == {}


def test_bucket_ttl_is_ours_its_size_the_operators() -> None:
    server = StreamConfig(
        name="KV_tg-executors",
        subjects=["$KV.tg-executors.>"],
        max_age=6.0,
        max_msgs_per_subject=1,
        max_bytes=1024**2,
        num_replicas=3,
        storage=StorageType.MEMORY,
    )
    ours = server.evolve(max_age=10.0, num_replicas=1, max_bytes=None)
    result = merge(server, ours, BUCKET_OWNED)
    assert result.changed == {"max_age": (6.0, 10.0)}
    assert result.config.num_replicas == 3 and result.config.max_bytes == 1024**2


def _consumer(**more: object) -> ConsumerConfig:
    base = ConsumerConfig(
        durable_name="route_alpha",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=20_000,
        filter_subject="tg.submit.alpha",
    )
    return base.evolve(**more)


def test_consumer_keeps_the_operators_in_flight_cap_and_takes_our_timings() -> None:
    server = _consumer(max_ack_pending=500, ack_wait=10.0, max_deliver=-1, name="route_alpha")
    result = merge(server, _consumer(), CONSUMER_OWNED)
    assert result.changed == {"ack_wait": (10.0, 30.0), "max_deliver": (-1, 20)}
    assert result.kept == {"max_ack_pending": (500, 20_000)}
    assert result.config.max_ack_pending == 500
    assert (result.config.ack_wait, result.config.max_deliver) == (30.0, 20)


def test_a_threshold_this_version_dropped_is_removed() -> None:
    server = _consumer(inactive_threshold=604800.0)
    result = merge(server, _consumer(), CONSUMER_OWNED)
    assert result.changed == {"inactive_threshold": (604800.0, None)}
    assert result.config.inactive_threshold is None
