"""The client SDK across a NATS outage: a publish without a PubAck is retried, never doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness import wait_for

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.embedded.servers import EmbeddedNats, free_port
from tidegate.wire import TaskSpec


async def test_submissions_survive_a_server_restart_exactly_once(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    url = server.start()
    nc = await connect(url, "test")
    try:
        await ensure_all(nc.jetstream(), Limits())
        tg = TidegateClient(nc, "alpha", timeout=1.0, retries=20)
        first = await tg.submit_many(TaskSpec(key=f"k{i}", argv=["true"]) for i in range(100))
        assert len(first) == 100
        server.stop()  # the client's PubAcks for what follows cannot come back

        async def resubmit_all() -> list[str]:
            receipts = await tg.submit_many(
                TaskSpec(key=f"k{i}", argv=["true"]) for i in range(200)
            )
            return [r.task_id for r in receipts]

        pending = asyncio.create_task(resubmit_all())
        await asyncio.sleep(1.5)  # the outage itself, long enough for publishes to time out
        assert not pending.done()
        server.start()
        ids = await asyncio.wait_for(pending, timeout=60)
        assert ids == [f"alpha:k{i}" for i in range(200)]

        async def stored() -> int:
            info = await nc.jetstream().stream_info(names.TASKS_STREAM)
            return info.state.messages

        # 100 old + 100 new: every resend of an unacknowledged publish was deduplicated.
        assert await wait_for(stored, timeout=10, what="stream count") == 200
    finally:
        await nc.close()
        server.stop()
