"""Callback throughput (issue 9, point 4): a client's callbacks go several at once, laned by
task, so a slow receiver is called back at concurrency / latency, not 1 / latency, while each
task's states still arrive in order. Real nats-server, PostgreSQL, driver and executor; a real
HTTP receiver that takes 50 ms per request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from harness import Cluster, register, wait_for
from receiver import Receiver

from tidegate.client import TidegateClient
from tidegate.wire import ClientRecord, TaskSpec

TASKS = 1000
LATENCY_S = 0.05
# What a sensitive client is called back for, per task, in this order (`queued` never: the
# PubAck was the acceptance).
STATES = ["dispatched", "running", "succeeded"]


class Gauge:
    """Requests the receiver is answering at once, the most it ever was, and whether a task
    was ever in two of them at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.tasks: set[str] = set()  # of the requests being answered
        self.overlaps: list[str] = []  # tasks seen in two requests at once

    async def respond(self, _path: str, body: bytes) -> int:
        data = msgspec.json.decode(body)
        tasks = {cb["task_id"] for cb in (data if isinstance(data, list) else [data])}
        self.overlaps += sorted(tasks & self.tasks)
        self.tasks |= tasks
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(LATENCY_S)
        finally:
            self.now -= 1
            self.tasks -= tasks
        return 200


@pytest.mark.slow
@pytest.mark.parametrize("batch_max", [1, 20])
async def test_a_slow_sensitive_receiver_gets_every_callback_once_in_order_per_task(
    nats_url: str, engine_db: str, tmp_path: Path, batch_max: int
) -> None:
    gauge = Gauge()
    async with Receiver(respond=gauge.respond) as rx:
        record = ClientRecord(
            name="careful",
            sensitive=True,
            callback_url=rx.url("/hook"),
            callback_batch_max=batch_max,
        )
        await register(nats_url, engine_db, record)
        c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
        try:
            c.driver()
            c.executor(slots=8)
            keys = [f"t{i}" for i in range(TASKS)]
            t0 = time.monotonic()
            async with await TidegateClient.connect(nats_url, "careful") as tg:
                await tg.submit_many(TaskSpec(key=k, argv=["true"]) for k in keys)

            counted = [0, 0]  # hits looked at, callbacks in them

            async def all_called_back() -> bool:
                # Only new requests decoded: decoding thousands on every poll would slow the
                # receiver, which shares this event loop.
                hits = rx.hits[counted[0] :]
                counted[0] += len(hits)
                counted[1] += sum(len(h.callbacks()) for h in hits if h.ok)
                return counted[1] >= TASKS * len(STATES)

            await wait_for(all_called_back, timeout=240, interval=0.1, what="every callback")
            elapsed = time.monotonic() - t0
            got = rx.delivered()
            first = min(h.at for h in rx.hits)
            last = max(h.at for h in rx.hits)
            print(
                f"\nbatch_max {batch_max}: {len(got)} callbacks of {TASKS} tasks, receiver "
                f"{LATENCY_S * 1000:.0f} ms: "
                f"all received {elapsed:.1f}s after the first submission "
                f"({len(got) / elapsed:.0f}/s; {len(got) / max(last - first, 1e-9):.0f}/s "
                f"from the first callback to the last); {len(rx.hits)} requests, "
                f"at most {gauge.peak} at once (target: within 30 s)"
            )
            per_5s = [0] * (int((last - t0) // 5) + 1)
            for h in rx.hits:
                per_5s[int((h.at - t0) // 5)] += 1
            print(f"requests per 5 s since the first submission: {per_5s}")
            # Each callback exactly once.
            ids = [cb.event_id for cb in got]
            assert len(ids) == len(set(ids)) == TASKS * len(STATES)
            # Per task: every state, each once, in the order it happened.
            per_task: dict[str, list[str]] = {}
            for cb in got:
                per_task.setdefault(cb.key, []).append(cb.state)
            wrong = {k: s for k, s in per_task.items() if s != STATES}
            assert not wrong, f"{len(wrong)} tasks out of order, e.g. {list(wrong.items())[:3]}"
            assert set(per_task) == set(keys)
            # Several requests were in flight at once: the receiver saw them overlap.
            assert gauge.peak > 1
            # ... and never two requests of one task at once (they would race each other).
            assert not gauge.overlaps, gauge.overlaps[:5]
            assert all(h.ok for h in rx.hits)
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()
