"""A component start never resets what an operator set on the server; it does restore what
Tidegate owns."""

from __future__ import annotations

import nats
import pytest
from harness import Cluster, wait_for

from tidegate import names
from tidegate.bus.topology import ensure_all, ensure_streams
from tidegate.config import Limits, Settings
from tidegate.errors import TopologyError

OPERATOR_MAX_BYTES = 123 * 1024**2
OPERATOR_MAX_ACK_PENDING = 777


async def _async(check: bool) -> bool:
    return check


async def test_a_restarted_driver_keeps_the_operators_settings(cluster: Cluster) -> None:
    first = cluster.driver()

    async def up() -> bool:
        return "driver up" in first.log()

    await wait_for(up, timeout=60, what="the first driver up")
    assert first.stop() == 0

    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.TASKS_STREAM)
        assert info.config.max_bytes != OPERATOR_MAX_BYTES
        # The operator: a smaller buffer (`nats stream edit`), a tighter in-flight cap, and a
        # change to a field Tidegate owns (the dedup window its guarantees rest on).
        await js.update_stream(
            info.config.evolve(max_bytes=OPERATOR_MAX_BYTES, duplicate_window=60.0)
        )
        consumer = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        await js.add_consumer(
            names.EVENTS_STREAM,
            consumer.config.evolve(max_ack_pending=OPERATOR_MAX_ACK_PENDING, ack_wait=7.0),
        )

        second = cluster.driver()

        async def second_up() -> bool:
            return "driver up" in second.log()

        await wait_for(second_up, timeout=60, what="the second driver up")
        info = await js.stream_info(names.TASKS_STREAM)
        assert info.config.max_bytes == OPERATOR_MAX_BYTES, second.log()
        assert info.config.duplicate_window == Limits().duplicate_window_s
        consumer = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        assert consumer.config.max_ack_pending == OPERATOR_MAX_ACK_PENDING
        # Tidegate's own: brought back to the driver's setting.
        ours = Settings.from_env(cluster.env()).limits.projector_ack_wait_s
        assert consumer.config.ack_wait == ours
        assert f"keeping max_bytes={OPERATOR_MAX_BYTES}" in second.log()
    finally:
        await nc.close()


async def test_replicas_are_used_at_creation_and_kept_after(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        # A single server cannot hold three copies: creating R3 streams is refused, clearly.
        with pytest.raises(TopologyError, match="replicas need a NATS cluster"):
            await ensure_streams(js, Limits(replicas=3))
        await ensure_all(js, Limits())
        # Existing streams and buckets keep their replicas: asking for 3 changes nothing here.
        await ensure_all(js, Limits(replicas=3))
        for stream in (names.TASKS_STREAM, names.kv_stream(names.CLIENTS_BUCKET)):
            assert (await js.stream_info(stream)).config.num_replicas == 1
    finally:
        await nc.close()
