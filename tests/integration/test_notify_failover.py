"""Notifier failover keeps order (issue 8, point 6): the leading driver frozen (SIGSTOP) past
its lease in the middle of a callback flood, then thawed (SIGCONT); then its successor, frozen
the same way while it works through what the first left behind. Per task, the client never
receives an older state after a newer one: not from a new holder (redeliveries checked against
the shared fence), not from an old one (it stops sending once its lease may be gone), not from
the outbox's retry job (a pass cut off after sending does not send again).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
from harness import Cluster, register, wait_for
from receiver import Receiver

from tidegate.bus.buckets import LEASE_TTL_S
from tidegate.client import TidegateClient
from tidegate.wire import STATE_RANK, ClientRecord, TaskSpec

pytestmark = pytest.mark.slow

TASKS = 800
FREEZES = 2  # the first holder, then its successor: the fence must survive each
# What a frozen holder took and cannot surely give back comes back at the ack wait: shortened,
# so the test does not wait out the production minute.
ACK_WAIT_S = 15


def _history(rx: Receiver, task_id: str, frozen_at: tuple[float, float], thawed_at: float) -> str:
    """Every request that carried `task_id`: when it arrived and when its sender signed it,
    both relative to the last freeze (so a request signed before it and arriving after the
    thaw is the old holder's), and which connection it came on."""
    lines = [f"thawed at +{thawed_at - frozen_at[0]:.2f}s"]
    for hit in rx.hits:
        for cb in hit.callbacks():
            if cb.task_id == task_id:
                signed = int(hit.headers.get("webhook-timestamp", "0")) - frozen_at[1]
                lines.append(
                    f"  arrived +{hit.at - frozen_at[0]:.3f}s signed {signed:+.0f}s "
                    f"{cb.event_id} status={hit.status} peer={hit.peer}"
                )
    return "\n".join(lines)


async def test_frozen_notifier_leader_never_causes_an_older_state_after_a_newer(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    async def respond(_path: str, _body: bytes) -> int:
        await asyncio.sleep(0.005)  # a real endpoint's pace: the leader holds a backlog
        return 200

    async with Receiver(respond=respond) as rx:
        await register(
            nats_url,
            engine_db,
            ClientRecord(name="watcher", sensitive=True, callback_url=rx.url()),
        )
        c = Cluster(
            nats_url=nats_url,
            database_url=engine_db,
            workdir=tmp_path / "run",
            extra_env={"TIDEGATE_NOTIFY_ACK_WAIT_S": str(ACK_WAIT_S)},
        )
        try:
            drivers = [c.driver(), c.driver()]
            c.executor(slots=16)

            def took_over(i: int) -> list[str]:
                """When driver i began its terms (log time stamps, which sort)."""
                lines = drivers[i].log().splitlines()
                return [ln[:23] for ln in lines if "this driver now sends the callbacks" in ln]

            def leader() -> int | None:
                latest = [(took_over(i)[-1:] or [""])[0] for i in range(len(drivers))]
                return None if not any(latest) else latest.index(max(latest))

            async def led() -> bool:
                return leader() is not None

            await wait_for(led, timeout=60, what="a notifier leader")
            keys = [f"t{i}" for i in range(TASKS)]
            async with await TidegateClient.connect(nats_url, "watcher") as tg:
                await tg.submit_many(TaskSpec(key=k, argv=["true"]) for k in keys)

            async def flowing() -> bool:
                return len(rx.delivered()) >= 100

            await wait_for(flowing, timeout=60, what="the callback flood under way")
            victims: list[int] = []
            for _ in range(FREEZES):
                victim = leader()
                assert victim is not None
                victims.append(victim)
                terms = len(took_over(1 - victim))
                frozen = drivers[victim]
                os.kill(frozen.pid, signal.SIGSTOP)
                frozen_at = (time.monotonic(), time.time())
                try:
                    await asyncio.sleep(LEASE_TTL_S * 2.5)  # well past the lease
                finally:
                    os.kill(frozen.pid, signal.SIGCONT)
                    thawed_at = time.monotonic()

                async def successor_leads(other: int = 1 - victim, before: int = terms) -> bool:
                    return len(took_over(other)) > before

                await wait_for(successor_leads, timeout=30, what="the successor leading")

            async def all_finished() -> bool:
                done = {cb.key for cb in rx.delivered() if cb.state == "succeeded"}
                return done == set(keys)

            await wait_for(all_finished, timeout=180, interval=1, what="every task called back")
            assert victims == [victims[0], 1 - victims[0]], "each driver frozen while it led"
            for v in victims:  # thawed, each found its lease gone
                assert "notifier lease of partition 0 lost" in drivers[v].log()
            # The first held a backlog: it gave back at once only what was surely still its
            # own (its ack wait still running), and left the rest to the ack wait.
            handed = r"\d+ handed back at once .* \d+ left to the ack wait"
            assert re.search(handed, drivers[victims[0]].log()), "the first gave nothing back"
            latest: dict[str, tuple[int, int, int]] = {}
            for cb in rx.delivered():
                mark = (cb.run, cb.attempt, STATE_RANK[cb.state])
                before = latest.get(cb.task_id)
                assert before is None or mark >= before, (
                    f"{cb.task_id}: {cb.state} (attempt {cb.attempt}) after a newer state\n"
                    + _history(rx, cb.task_id, frozen_at, thawed_at)
                )
                latest[cb.task_id] = mark
            print(f"{len(rx.delivered())} callbacks for {TASKS} tasks; at {time.monotonic():.0f}")
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()
