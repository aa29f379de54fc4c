"""An executor that cannot start a process (the host is out of file descriptors, for real) hands
the task back with a delay and pauses its fetching; the task then runs as attempt 1."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from typing import Any

from harness import FAST_ENV, wait_for
from nats.js.errors import NoKeysError, NotFoundError

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Publisher
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.executor.agent import Executor
from tidegate.executor.workmsg import PRESTART_RETRY
from tidegate.metrics import ExecutorMetrics
from tidegate.wire import TaskSpec, WorkItem, encode, now


async def test_a_launch_fault_is_handed_back_with_a_delay_not_spent(nats_url: str) -> None:
    settings = Settings.from_env(FAST_ENV)
    nc = await connect(nats_url, "test-prestart")
    try:
        js = nc.jetstream()
        buckets = await ensure_all(js, settings.limits)
        metrics = ExecutorMetrics()
        agent = Executor(
            js, Publisher(nc), buckets, settings.executor, settings.limits, metrics, log_dir=None
        )
        loops = [asyncio.create_task(agent.fetch_loop(c)) for c in names.TASK_CLASSES]
        item = WorkItem(
            task_id="alpha:fd",
            client="alpha",
            spec=TaskSpec(key="fd", argv=["/bin/true"]),
            pool=settings.executor.pool,
            task_class="short",
            submitted_at=now(),
        )

        async def handed_back() -> bytes | None:
            for key in await _keys(buckets.handbacks):
                entry = await buckets.handbacks.get(key)
                return entry.value
            return None

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            await js.publish(names.work_subject(item.pool, "short", "alpha"), encode(item))
            assert await wait_for(handed_back, timeout=20, what="the hand-back record") == b"1"
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        failed_at = time.monotonic()
        errors = metrics.registry.get_sample_value(
            "tidegate_executor_errors_total", {"handed_back": "true"}
        )
        assert errors == 1
        assert agent._paused_until > asyncio.get_running_loop().time()  # no fetch meanwhile

        async def finished() -> dict[str, Any] | None:
            try:
                msg = await js.get_msg(names.EVENTS_STREAM, subject="tg.event.alpha")
            except NotFoundError:
                return None
            assert msg.data is not None
            event: dict[str, Any] = json.loads(msg.data)
            return event if event["state"] == "succeeded" else None

        event = await wait_for(finished, timeout=30, what="the task to run after the delay")
        # Not at once: only after the hand-back's delay (base 1 s, less its jitter).
        assert time.monotonic() - failed_at >= PRESTART_RETRY.base_s * 0.8 - 0.3
        assert event["attempt"] == 1, event  # delivery 2, less one hand-back
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    finally:
        await nc.drain()


async def _keys(kv: Any) -> list[str]:
    try:
        return list(await kv.keys())
    except (NoKeysError, NotFoundError):
        return []
