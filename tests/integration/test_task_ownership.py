"""An executor that cannot prove a task is still its own lets it go; a hand-back is no attempt.

Real executors, real process groups, a real SIGSTOP; the work ack wait is the harness's 3 s.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from harness import Cluster, wait_for
from test_engine_outcomes import final

from tidegate import names
from tidegate.bus.topology import WORK_HANDBACK_ALLOWANCE
from tidegate.client import TidegateClient
from tidegate.embedded.servers import EmbeddedNats
from tidegate.wire import MAX_ATTEMPTS_LIMIT, TaskSpec

Conn = psycopg.AsyncConnection[Any]

pytestmark = pytest.mark.slow

TASKS = 50
# After the gate opens, a task waits this long before its side effect: the frozen executor's
# stale copies would write then, unless they are killed first.
AFTER_GATE_S = 4


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def test_frozen_executor_kills_its_stale_tasks_and_each_runs_once(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    pids, out = tmp_path / "pids", tmp_path / "out"
    pids.mkdir()
    out.mkdir()
    gate = tmp_path / "gate"
    gate.touch()
    # The test holds the gate shut: every copy of a task blocks on it (no polling), then
    # writes its side effect AFTER_GATE_S later. The gate opens at the moment of SIGCONT.
    gate_fd = os.open(gate, os.O_RDWR)
    fcntl.flock(gate_fd, fcntl.LOCK_EX)
    try:
        cluster.driver()
        # One slot more: the idle long-task class holds one while it waits for work.
        frozen = cluster.executor(slots=TASKS + 1)
        async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
            await tg.submit_many(
                TaskSpec(
                    key=f"k{i}",
                    shell=f"echo $$ >> {pids}/k{i}; flock -s {gate} true; "
                    f"sleep {AFTER_GATE_S}; echo x >> {out}/k{i}",
                    max_attempts=3,
                )
                for i in range(TASKS)
            )

        async def all_started_on(copies: int) -> bool:
            return all(len(_lines(pids / f"k{i}")) >= copies for i in range(TASKS))

        await wait_for(lambda: all_started_on(1), timeout=60, what=f"{TASKS} tasks running")
        os.kill(frozen.pid, signal.SIGSTOP)
        stale = [int(_lines(pids / f"k{i}")[0]) for i in range(TASKS)]
        try:
            # Only once the frozen executor's ack wait passed are its tasks redelivered here.
            cluster.executor(slots=TASKS + 1)
            await wait_for(
                lambda: all_started_on(2), timeout=90, what="every task started again elsewhere"
            )
            assert all(_group_alive(pgid) for pgid in stale), "stale copies died on their own"
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
            resumed = time.monotonic()
            fcntl.flock(gate_fd, fcntl.LOCK_UN)
    finally:
        os.close(gate_fd)

    async def stale_gone() -> bool:
        return not any(_group_alive(pgid) for pgid in stale)

    await wait_for(stale_gone, timeout=30, interval=0.1, what="the stale process groups to go")
    gone_after = time.monotonic() - resumed
    assert gone_after < 5, f"stale process groups lived {gone_after:.1f}s past SIGCONT"

    for i in range(TASKS):
        row = await final(db, f"alpha:k{i}", "succeeded", timeout=60)
        assert (row["executor"], row["attempt"]) == ("exec-1", 2), row
    # Past the moment a surviving stale copy would have written its side effect.
    await asyncio.sleep(max(0.0, resumed + AFTER_GATE_S + 2 - time.monotonic()))
    written = {i: len(_lines(out / f"k{i}")) for i in range(TASKS)}
    assert written == dict.fromkeys(range(TASKS), 1), {i: n for i, n in written.items() if n != 1}
    assert frozen.alive(), "the frozen executor went on serving after SIGCONT"
    log = frozen.log()
    assert log.count("no longer this executor's task") == TASKS, log[-3000:]
    assert "alpha:k0 attempt 1: failed" not in log and "alpha:k0 attempt 1: cancelled" not in log


async def test_drain_hand_back_does_not_spend_an_attempt(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    """max_attempts=1: a task handed back by a stopping executor still runs elsewhere."""
    flag = tmp_path / "first-start"
    cluster.driver()
    # The harness drain timeout is 5 s; the first start outlives it and is handed back.
    leaving = cluster.executor(slots=2)
    spec = TaskSpec(
        key="handed-back",
        shell=f"test -e {flag} && exit 0; touch {flag}; sleep 60",
        max_attempts=1,
    )
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        await tg.submit(spec)
    running = await final(db, "beta:handed-back", "running")
    assert running["executor"] == "exec-0"
    assert leaving.stop(timeout=30) == 0
    assert "hand-back of beta:handed-back not recorded" not in leaving.log()
    cluster.executor(slots=2)
    done = await final(db, "beta:handed-back", "succeeded", timeout=60)
    assert (done["executor"], done["attempt"]) == ("exec-1", 1), done
    # Deliveries are bounded all the same: the most attempts, plus the hand-back allowance.
    nc = await nats.connect(cluster.nats_url)
    try:
        info = await nc.jetstream().consumer_info(
            names.WORK_STREAM, names.work_consumer("default", "long")
        )
        assert info.config.max_deliver == MAX_ATTEMPTS_LIMIT + WORK_HANDBACK_ALLOWANCE
    finally:
        await nc.close()


async def test_executor_cut_off_from_nats_kills_its_task_and_it_runs_again(
    cluster: Cluster, db: Conn, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """No progress accepted past the ack wait (NATS gone): the group dies at once, without
    waiting for NATS; when NATS is back the task runs again, as its next attempt."""
    flag, pidfile = tmp_path / "first-start", tmp_path / "pid"
    cluster.driver()
    executor = cluster.executor(slots=2)
    spec = TaskSpec(
        key="cut-off",
        shell=f"test -e {flag} && exit 0; touch {flag}; echo $$ > {pidfile}; sleep 120",
    )
    async with await TidegateClient.connect(cluster.nats_url, "gamma") as tg:
        await tg.submit(spec)

    async def started() -> bool:
        return pidfile.exists() and pidfile.read_text().strip().isdigit()

    await wait_for(started, timeout=60, what="the task to start")
    pgid = int(pidfile.read_text())
    nats_server.stop()
    stopped = time.monotonic()
    try:

        async def group_gone() -> bool:
            return not _group_alive(pgid)

        # The harness's ack wait is 3 s: the group must go soon after, NATS still down.
        await wait_for(group_gone, timeout=15, interval=0.1, what="the cut-off task's group")
        assert time.monotonic() - stopped < 8
        assert executor.alive()
    finally:
        nats_server.start()
    done = await final(db, "gamma:cut-off", "succeeded", timeout=90)
    assert done["attempt"] == 2, done
    assert "task gamma:cut-off attempt 1: no longer this executor's task" in executor.log()
