"""`tidegate executor --workers 2`: a supervisor of two worker processes, each executor
`<id>-w<i>`, against a real driver, nats-server and PostgreSQL.

- a flood runs on both workers, every task once;
- kill -9 of a worker: it is restarted (a new pid), the dead worker's task processes are killed
  (they can no longer be reported), and every task still runs exactly once;
- SIGTERM to the supervisor drains every worker, and it exits 0 within the drain bound;
- an operator's cordon or drain of one worker's key is one of the whole executor.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import nats
import psutil
import psycopg
import pytest
from harness import Cluster, Component, wait_for
from nats.js.errors import KeyNotFoundError

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.wire import (
    ExecutorControl,
    TaskSpec,
    decode_executor_control,
    decode_heartbeat,
    encode,
    now,
)

Conn = psycopg.AsyncConnection[Any]

pytestmark = pytest.mark.slow

WORKERS = {"TIDEGATE_EXECUTOR_WORKERS": "2"}
IDS = ("exec-0-w0", "exec-0-w1")
DRAIN_S = 5 + 1  # the harness's drain timeout and kill grace


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _worker_pids(supervisor: Component) -> dict[str, int]:
    """Worker id → pid, from the supervisor's children's command lines."""
    found: dict[str, int] = {}
    for child in psutil.Process(supervisor.pid).children():
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "--executor-id" in argv:
            found[argv[len(argv) - 1 - argv[::-1].index("--executor-id") + 1]] = child.pid
    return found


async def _states(db: Conn) -> list[tuple[str, str, int, str]]:
    cur = await db.execute("SELECT key, state, attempt, executor FROM tasks ORDER BY key")
    return [(r[0], r[1], r[2], r[3]) for r in await cur.fetchall()]


async def _all_succeeded(db: Conn, n: int) -> bool:
    cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
    row = await cur.fetchone()
    return row is not None and row[0] == n


async def _running(cluster: Cluster) -> dict[str, list[str]]:
    """Each worker's running tasks (keys), from its heartbeat."""
    nc = await nats.connect(cluster.nats_url)
    try:
        beats = await nc.jetstream().key_value(names.EXECUTORS_BUCKET)
        found: dict[str, list[str]] = {}
        for wid in IDS:
            try:
                entry = await beats.get(wid)
            except KeyNotFoundError:
                found[wid] = []
                continue
            hb = decode_heartbeat(entry.value or b"")
            found[wid] = [t.task_id.partition(":")[2] for t in hb.running]
        return found
    except Exception:  # the bucket not made yet
        return {wid: [] for wid in IDS}
    finally:
        await nc.close()


async def _submit(cluster: Cluster, shell: Any, n: int) -> None:
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit_many(TaskSpec(key=f"k{i:03d}", shell=shell(i)) for i in range(n))


async def test_two_workers_share_a_flood_each_task_once(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    n, out = 200, tmp_path / "out"
    out.mkdir()
    cluster.driver()
    supervisor = cluster.executor(slots=4, **WORKERS)
    await wait_for(lambda: _async(len(_worker_pids(supervisor)) == 2), timeout=30, what="workers")
    await _submit(cluster, lambda i: f"echo x >> {out}/k{i:03d}", n)
    await wait_for(lambda: _all_succeeded(db, n), timeout=120, interval=0.5, what="all succeeded")
    rows = await _states(db)
    assert len(rows) == n
    assert {(state, attempt) for _, state, attempt, _ in rows} == {("succeeded", 1)}
    assert {executor for *_, executor in rows} == set(IDS), "both workers ran tasks"
    assert all(_lines(out / f"k{i:03d}") == ["x"] for i in range(n))
    assert supervisor.alive()


async def test_a_killed_worker_is_restarted_and_its_tasks_run_once(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    n, out, pids, gate = 30, tmp_path / "out", tmp_path / "pids", tmp_path / "gate"
    out.mkdir()
    pids.mkdir()
    gate.touch()
    # Every task blocks on the gate (held shut by the test) before its side effect: the tasks
    # of the worker killed meanwhile would write theirs when it opens, were they not killed.
    gate_fd = os.open(gate, os.O_RDWR)
    fcntl.flock(gate_fd, fcntl.LOCK_EX)
    try:
        cluster.driver()
        supervisor = cluster.executor(slots=4, **WORKERS)
        await _submit(
            cluster,
            lambda i: f"echo $$ >> {pids}/k{i:03d}; flock -s {gate} true; echo x >> {out}/k{i:03d}",
            n,
        )

        async def both_blocked() -> dict[str, list[str]] | None:
            # Two slots each, one of them held by the idle long-task class's fetch: a task
            # or two on each worker, all waiting at the gate.
            running = await _running(cluster)
            n = sum(map(len, running.values()))
            return running if all(running.values()) and len(list(pids.iterdir())) == n else None

        running = await wait_for(both_blocked, timeout=60, what="tasks at the gate on both")
        doomed = running[IDS[0]]
        assert doomed, running
        doomed_pids = [int(_lines(pids / key)[0]) for key in doomed]
        old = _worker_pids(supervisor)[IDS[0]]
        os.kill(old, signal.SIGKILL)

        async def restarted() -> bool:
            pid = _worker_pids(supervisor).get(IDS[0])
            return pid is not None and pid != old

        await wait_for(restarted, timeout=30, what="the worker restarted with a new pid")
        # Its task processes were orphaned: the supervisor killed them (and reaped them).
        await wait_for(
            lambda: _async(not any(psutil.pid_exists(p) for p in doomed_pids)),
            timeout=10,
            what="the dead worker's task processes gone",
        )
    finally:
        fcntl.flock(gate_fd, fcntl.LOCK_UN)
        os.close(gate_fd)
    await wait_for(lambda: _all_succeeded(db, n), timeout=120, interval=0.5, what="all succeeded")
    assert [k for k in (f"k{i:03d}" for i in range(n)) if _lines(out / k) != ["x"]] == []
    rows = {key: (state, attempt) for key, state, attempt, _ in await _states(db)}
    assert all(rows[key] == ("succeeded", 2) for key in doomed), rows
    assert "DIED" in supervisor.log() and supervisor.alive()


async def test_sigterm_to_the_supervisor_drains_every_worker_and_exits_0(
    cluster: Cluster, db: Conn, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cluster.driver()
    supervisor = cluster.executor(slots=4, **WORKERS)
    await _submit(cluster, lambda i: f"sleep 2; echo x >> {out}/k{i:03d}", 20)

    async def both_busy() -> dict[str, list[str]] | None:
        running = await _running(cluster)
        return running if all(running.values()) else None

    busy = await wait_for(both_busy, timeout=60, what="tasks running on both workers")
    workers = _worker_pids(supervisor)
    started = time.monotonic()
    assert supervisor.stop(timeout=DRAIN_S + 15) == 0, supervisor.log()[-3000:]
    took = time.monotonic() - started
    assert took < DRAIN_S + 10, took
    assert not any(psutil.pid_exists(p) for p in workers.values())
    log = supervisor.log()
    assert log.count("draining:") == 2, log[-3000:]  # each worker waited for its tasks
    # Drained: what ran finished (none was cut off by the 5 s drain timeout), the rest waits.
    ran = {key for keys in busy.values() for key in keys}

    async def projected() -> list[tuple[str, str, int, str]] | None:
        rows = await _states(db)
        done = {key for key, state, _, _ in rows if state == "succeeded"}
        return rows if ran <= done else None

    rows = await wait_for(projected, timeout=30, what=f"{sorted(ran)} succeeded")
    assert all(state in ("queued", "succeeded") for _, state, _, _ in rows), rows
    print(f"\nsupervisor stopped in {took:.1f}s")


async def test_an_operator_cordon_or_drain_of_one_worker_is_the_executors(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver()
    supervisor = cluster.executor(slots=2, **WORKERS)
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()

        async def beating() -> bool:
            try:
                beats = await js.key_value(names.EXECUTORS_BUCKET)
                return set(IDS) <= set(await beats.keys())
            except Exception:
                return False

        await wait_for(beating, timeout=30, what="both workers' heartbeats")
        control = await js.key_value(names.EXECUTOR_CONTROL_BUCKET)
        beats = await js.key_value(names.EXECUTORS_BUCKET)

        async def all_cordoned(cordoned: bool) -> bool:
            hbs = [decode_heartbeat((await beats.get(wid)).value or b"") for wid in IDS]
            return all(hb.cordoned == cordoned for hb in hbs)

        # A cordon of one worker's row is one of the whole executor, and so is its removal.
        cordon = ExecutorControl(cordoned=True, drain=False, by="test", at=now())
        await control.put(IDS[0], encode(cordon))
        await wait_for(lambda: all_cordoned(True), timeout=15, what="both workers cordoned")
        await control.delete(IDS[0])
        await wait_for(lambda: all_cordoned(False), timeout=15, what="both uncordoned")
        value = ExecutorControl(cordoned=True, drain=True, by="test", at=now())
        await control.put(IDS[1], encode(value))
        await wait_for(lambda: _async(not supervisor.alive()), timeout=30, what="exit")
        assert supervisor.proc is not None
        assert supervisor.proc.returncode == 0, supervisor.log()[-3000:]
        # The drained key is a cordon now: restarted, the executor comes back idle.
        drained = decode_executor_control((await control.get(IDS[1])).value or b"")
        assert drained.cordoned and not drained.drain
        for wid in IDS:  # both left cleanly
            with pytest.raises(KeyNotFoundError):
                await beats.get(wid)
    finally:
        await nc.close()


async def _async(value: bool) -> bool:
    return value
