"""The executor's pipeline on a real nats-server and real processes: work published straight to
the work stream (no driver, no database), terminal events read back from the events stream.

- a flood of no-op tasks: every task reported exactly once, every work message acked (the
  rate is printed, never asserted; TIDEGATE_TEST_EXEC_FLOOD sets the count for a measurement);
- SIGKILL in the middle of a flood: a work message that is gone (acked) always has its
  terminal event stored, and every task finishes after another executor takes over;
- a cancel stored before its task starts stops it from running, read from the watched mirror
  of the cancel bucket (no KV read per task).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import FAST_ENV, Cluster, wait_for
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tidegate import names
from tidegate.bus.cancel import request_cancel
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.executor.agent import Executor
from tidegate.metrics import ExecutorMetrics
from tidegate.wire import TaskSpec, WorkItem, encode, now

CLIENT = "alpha"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url, "test-exec-throughput")
    await ensure_all(conn.jetstream(), Settings.from_env({}).limits)
    yield conn
    await conn.drain()


def _item(key: str, spec: TaskSpec | None = None) -> WorkItem:
    return WorkItem(
        task_id=f"{CLIENT}:{key}",
        client=CLIENT,
        spec=spec or TaskSpec(key=key, argv=["/bin/true"]),
        pool="default",
        task_class="short",
        submitted_at=now(),
        run=1,
    )


async def _publish(nc: NATS, items: list[WorkItem]) -> dict[str, int]:
    """Publish work messages; the stream sequence of each task's message."""
    outs = [
        Outgoing(
            subject=names.work_subject(i.pool, i.task_class, i.client),
            payload=encode(i),
            msg_id=names.run_msg_id(i.task_id, i.run),
        )
        for i in items
    ]
    acks = await Publisher(nc).publish_many(outs)
    seqs = {}
    for item, ack in zip(items, acks, strict=True):
        assert isinstance(ack, PubAck), ack
        seqs[item.task_id] = ack.seq
    return seqs


async def _terminal_events(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every event stored so far on the client's subject (the executors publish terminal ones
    only, the client not being sensitive)."""
    info = await js.stream_info(names.EVENTS_STREAM)
    out: list[dict[str, Any]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(names.EVENTS_STREAM, seq)
        except NotFoundError:
            continue
        if msg.data and msg.subject == names.event_subject(CLIENT):
            out.append(json.loads(msg.data))
    return out


async def _events_stored(js: JetStreamContext) -> int:
    return (await js.stream_info(names.EVENTS_STREAM)).state.messages


async def _work_left(js: JetStreamContext) -> int:
    return (await js.stream_info(names.WORK_STREAM)).state.messages


def _cluster(nats_url: str, tmp_path: Path) -> Cluster:
    # Executors never use the database; the setting must only be there.
    unused = "postgresql://unused@127.0.0.1:9/unused"
    return Cluster(nats_url=nats_url, database_url=unused, workdir=tmp_path / "run")


async def _beating(js: JetStreamContext, n: int) -> None:
    kv = await js.key_value(names.EXECUTORS_BUCKET)

    async def all_beat() -> bool:
        try:
            return len(await kv.keys()) >= n
        except Exception:
            return False

    await wait_for(all_beat, timeout=30, what=f"{n} executor heartbeats")


async def test_a_flood_of_noop_tasks_is_reported_once_each_and_acked(
    nc: NATS, nats_url: str, tmp_path: Path
) -> None:
    n = int(os.environ.get("TIDEGATE_TEST_EXEC_FLOOD", "600"))
    js = nc.jetstream()
    cluster = _cluster(nats_url, tmp_path)
    try:
        for _ in range(2):
            cluster.executor(slots=8, TIDEGATE_LOG_LEVEL="WARNING")
        await _beating(js, 2)
        items = [_item(f"t{i}") for i in range(n)]
        started = time.monotonic()
        await _publish(nc, items)

        async def all_reported() -> bool:
            return await _events_stored(js) >= n

        await wait_for(all_reported, timeout=60 + n / 20, interval=0.05, what="every report")
        took = time.monotonic() - started
        await wait_for(lambda: _no_work(js), timeout=30, what="every work message acked")
        cpu = sum(_cpu_s(c.pid) for c in cluster.components)
        events = await _terminal_events(js)
        assert sorted(e["task_id"] for e in events) == sorted(i.task_id for i in items)
        assert {e["state"] for e in events} == {"succeeded"}
        print(
            f"\nexecutor flood: {n} x /bin/true, 2 executors x 8 slots: {took:.2f}s = "
            f"{n / took:.0f} tasks/s (published to reported); executors' own CPU "
            f"{cpu:.1f}s = {cpu / n * 1e6:.0f} us/task (start-up included)"
        )
    finally:
        cluster.stop_all()
        print(cluster.logs()[-3000:] if any(not c.alive() for c in cluster.components) else "")


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and its threads (not of its reaped children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _no_work(js: JetStreamContext) -> bool:
    return await _work_left(js) == 0


async def test_sigkill_after_exits_never_leaves_an_acked_task_unreported(
    nc: NATS, nats_url: str, tmp_path: Path
) -> None:
    js = nc.jetstream()
    cluster = _cluster(nats_url, tmp_path)
    n = 300
    try:
        victim = cluster.executor(slots=8)
        await _beating(js, 1)
        items = [_item(f"k{i}") for i in range(n)]
        seqs = await _publish(nc, items)

        async def midway() -> bool:
            return await _events_stored(js) >= n // 3

        await wait_for(midway, timeout=60, interval=0.01, what="a third of the reports")
        victim.kill9()  # processes have just exited, reports and acks are in flight

        reported = {e["task_id"] for e in await _terminal_events(js)}
        acked = []
        for task_id, seq in seqs.items():
            try:
                await js.get_msg(names.WORK_STREAM, seq)
            except NotFoundError:
                acked.append(task_id)
        assert acked, "nothing was acked before the kill"
        assert len(acked) < n, "everything was acked before the kill: nothing was tested"
        # The guarantee: a work message is acked only after its terminal event is stored.
        assert [t for t in acked if t not in reported] == []

        # What the dead executor held comes back (ack wait 3 s) to another one: none is lost.
        cluster.executor(slots=8)

        async def all_finished() -> bool:
            done = {e["task_id"] for e in await _terminal_events(js)}
            return len(done) == n and await _work_left(js) == 0

        await wait_for(all_finished, timeout=90, interval=0.5, what="every task reported")
    finally:
        cluster.stop_all()


async def test_a_cancel_stored_before_the_task_starts_stops_it_without_a_read(
    nc: NATS, tmp_path: Path
) -> None:
    # Its task touches a file in the test's own directory: it runs as the suite's user.
    task_user = FAST_ENV["TIDEGATE_TASK_USER"]
    settings = Settings.from_env({"TIDEGATE_WORK_ACK_WAIT_S": "3", "TIDEGATE_TASK_USER": task_user})
    js = nc.jetstream()
    buckets = await ensure_all(js, settings.limits)
    ran = tmp_path / "ran"
    ran.mkdir()
    # Stored before the executor starts: it reaches the mirror with the initial values.
    early = _item("early", TaskSpec(key="early", shell=f"touch {ran}/early"))
    await request_cancel(buckets.cancel, early.task_id, early.run)

    reads: list[str] = []
    real_get = buckets.cancel.get

    async def counted_get(key: str, revision: int | None = None) -> Any:
        reads.append(key)
        return await real_get(key, revision)

    buckets.cancel.get = counted_get  # type: ignore[method-assign]
    agent = Executor(
        js,
        Publisher(nc),
        buckets,
        settings.executor,
        settings.limits,
        ExecutorMetrics(),
        log_dir=None,
        watch_cancels=True,
    )
    loops = [asyncio.create_task(agent.cancel_loop())]
    loops += [asyncio.create_task(agent.fetch_loop(c)) for c in names.TASK_CLASSES]
    try:
        # Stored while the executor runs, before its task is published: through the watch.
        late = _item("late", TaskSpec(key="late", shell=f"touch {ran}/late"))
        await request_cancel(buckets.cancel, late.task_id, late.run)
        # A request for another run of a task cancels nothing here.
        other = _item("other", TaskSpec(key="other", shell=f"touch {ran}/other"))
        await request_cancel(buckets.cancel, other.task_id, other.run + 1)
        assert agent.cancels is not None

        async def known() -> bool:
            return agent.cancels is not None and agent.cancels.requested(late)

        await wait_for(known, timeout=10, interval=0.02, what="the late request in the mirror")
        await _publish(nc, [early, late, other])

        async def three_reported() -> bool:
            return await _events_stored(js) >= 3

        await wait_for(three_reported, timeout=30, what="three reports")
        states = {e["task_id"]: (e["state"], e.get("reason")) for e in await _terminal_events(js)}
        assert states[early.task_id] == ("cancelled", "cancelled before it started")
        assert states[late.task_id] == ("cancelled", "cancelled before it started")
        assert states[other.task_id][0] == "succeeded"
        assert sorted(p.name for p in ran.iterdir()) == ["other"]
        assert reads == []  # no KV read per task: the mirror answered
        await wait_for(lambda: _no_work(js), timeout=10, what="the work messages acked")
    finally:
        await agent.drain()  # the fetch loops end within their wait, the watch is cancelled
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
