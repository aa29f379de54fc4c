"""The gauges behind the alert rules, sampled from a real JetStream."""

from __future__ import annotations

import asyncio

from harness import FAST_ENV

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all, ensure_work_consumer
from tidegate.config import Settings
from tidegate.driver.gauges import Gauges
from tidegate.metrics import DriverMetrics
from tidegate.wire import Heartbeat, now


def _beat(executor: str, pool: str, *, cordoned: bool = False) -> Heartbeat:
    return Heartbeat(
        executor=executor,
        host="h",
        pid=1,
        pools=[pool],
        slots=4,
        running=[],
        load=0.0,
        at=now(),
        cordoned=cordoned,
    )


def _value(metrics: DriverMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_gauges_show_waiting_tasks_pools_streams_and_projection_lag(nats_url: str) -> None:
    limits = Settings.from_env(FAST_ENV).limits
    nc = await connect(nats_url, "test-gauges")
    try:
        js = nc.jetstream()
        await ensure_all(js, limits)
        await ensure_work_consumer(js, "gpu", "short", limits)
        # No driver runs: what is published stays where it is, as behind a stalled stage.
        await js.publish(names.submit_subject("alpha"), b"{}")
        await js.publish(names.submit_subject("alpha"), b"{}")
        await js.publish(names.ready_subject("beta", "gpu"), b"{}")
        await js.publish(names.work_subject("gpu", "short", "beta"), b"{}")
        await js.publish("tg.event.alpha", b"{}")
        metrics = DriverMetrics()
        beats = [_beat("e1", "default"), _beat("e2", "gpu", cordoned=True)]
        gauges = Gauges(js, lambda: beats, metrics)
        # Not a synchronisation: ages are measured from the stored time, so let them grow.
        await asyncio.sleep(1.2)
        await gauges.sample()

        alpha = _value(metrics, "tidegate_oldest_waiting_seconds", client="alpha")
        beta = _value(metrics, "tidegate_oldest_waiting_seconds", client="beta")
        assert alpha is not None and 1.0 <= alpha < 60
        assert beta is not None and 1.0 <= beta < 60
        # One ready and one not yet fetched; its only executor is cordoned.
        assert _value(metrics, "tidegate_pool_waiting_tasks", pool="gpu") == 2
        assert _value(metrics, "tidegate_pool_live_executors", pool="gpu") == 0
        assert _value(metrics, "tidegate_pool_live_executors", pool="default") == 1
        assert _value(metrics, "tidegate_pool_waiting_tasks", pool="default") == 0
        tasks_bytes = _value(metrics, "tidegate_stream_bytes", stream=names.TASKS_STREAM)
        assert tasks_bytes is not None and tasks_bytes > 0
        assert (
            _value(metrics, "tidegate_stream_max_bytes", stream=names.TASKS_STREAM)
            == limits.tasks_max_bytes
        )
        assert _value(metrics, "tidegate_stream_messages", stream=names.TASKS_STREAM) == 2
        assert _value(metrics, "tidegate_projection_pending_events") == 1
        lag = _value(metrics, "tidegate_projection_lag_seconds")
        assert lag is not None and 1.0 <= lag < 60

        # Once taken off the queues, nothing waits: the gauges drop back to 0.
        await js.purge_stream(names.TASKS_STREAM)
        await js.purge_stream(names.READY_STREAM)
        await js.purge_stream(names.EVENTS_STREAM)
        await gauges.sample()
        assert _value(metrics, "tidegate_oldest_waiting_seconds", client="alpha") == 0
        assert _value(metrics, "tidegate_oldest_waiting_seconds", client="beta") == 0
        assert _value(metrics, "tidegate_pool_waiting_tasks", pool="gpu") == 1  # work remains
        assert _value(metrics, "tidegate_projection_lag_seconds") == 0
    finally:
        await nc.drain()
