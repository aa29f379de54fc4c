"""`tidegate up` heals its embedded servers: nats-server or PostgreSQL killed with SIGKILL in the
middle of a flood comes back on the same data and port, the components reconnect, and every
accepted task reaches exactly one terminal state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import nats.errors
import psycopg
import pytest
from harness import wait_for
from upharness import Up, new_up

from tidegate.client import TidegateClient
from tidegate.embedded.children import process_alive
from tidegate.errors import SubmitError
from tidegate.wire import TaskSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Short ack waits and heartbeats: work held by a connection that died is redelivered soon.
FAST = {
    "TIDEGATE_WORK_ACK_WAIT_S": "5",
    "TIDEGATE_HEARTBEAT_INTERVAL_S": "0.5",
    "TIDEGATE_HEARTBEAT_TTL_S": "3",
    "TIDEGATE_PROJECTOR_MAX_LINGER_S": "0.05",
    "TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S": "50",
}
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled", "lost", "rejected")


def _start(ups: list[Up], tmp_path: Path) -> tuple[Up, dict[str, Any]]:
    up = new_up(ups, tmp_path, tmp_path / "data")
    up.env.update(FAST)
    up.extra = ("--executors", "2", "--slots", "16")
    up.start()
    return up, up.wait_endpoints()


def _endpoints(up: Up) -> dict[str, Any]:
    found: dict[str, Any] = json.loads((up.data_dir / "endpoints.json").read_text())
    return found


async def _submit(url: str, keys: list[str], deadline_s: float = 120.0) -> None:
    """Submit until every key is acknowledged (a resubmission of a key is deduplicated)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            async with await TidegateClient.connect(url, "demo") as tg:
                await tg.submit_many(TaskSpec(key=k, argv=["true"], timeout_s=60) for k in keys)
            return
        except (SubmitError, nats.errors.Error, OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not accepted after {deadline_s}s: {exc}") from exc
            await asyncio.sleep(1.0)


async def _terminal_counts(database_url: str) -> dict[str, int] | None:
    """Terminal rows per task id of the demo client; None while the database is away."""
    try:
        async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=5) as db:
            cur = await db.execute(
                "SELECT task_id, count(*) FROM tasks WHERE client = 'demo' AND state = ANY(%s)"
                " GROUP BY task_id",
                (list(TERMINAL),),
            )
            return {str(t): int(n) for t, n in await cur.fetchall()}
    except psycopg.OperationalError:
        return None


async def _wait_terminal(up: Up, database_url: str, keys: list[str], timeout: float) -> None:
    want = {f"demo:{k}" for k in keys}
    last: dict[str, int] = {}

    async def all_terminal() -> bool:
        nonlocal last
        counts = await _terminal_counts(database_url)
        if counts is not None:
            last = counts
        return want <= last.keys()

    try:
        await wait_for(all_terminal, timeout=timeout, interval=2, what="every task terminal")
    except AssertionError:
        missing = sorted(want - last.keys())
        raise AssertionError(
            f"{len(missing)} of {len(want)} tasks not terminal (first {missing[:5]})\n"
            + up.diagnostics()
        ) from None
    doubled = {t: n for t, n in last.items() if n != 1}
    assert not doubled, f"tasks with more than one terminal row: {list(doubled.items())[:5]}"
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute(
            "SELECT state, count(*) FROM tasks WHERE client = 'demo' GROUP BY state"
        )
        states = dict(await cur.fetchall())
    assert states == {"succeeded": len(want)}, states


async def _wait_progress(database_url: str, at_least: int) -> None:
    async def progressed() -> bool:
        counts = await _terminal_counts(database_url)
        return counts is not None and len(counts) >= at_least

    await wait_for(progressed, timeout=180, interval=0.5, what=f"{at_least} tasks terminal")


async def _wait_new_pid(up: Up, name: str, old: int, timeout: float = 60) -> int:
    async def replaced() -> int | None:
        pid = _endpoints(up)["pids"].get(name)
        return pid if pid and pid != old and process_alive(pid) else None

    try:
        pid: int = await wait_for(replaced, timeout=timeout, what=f"{name} restarted")
    except AssertionError:
        raise AssertionError(f"{name} was not restarted\n{up.diagnostics()}") from None
    return pid


async def test_up_restarts_a_killed_nats_server_and_the_flood_goes_on(
    ups: list[Up], tmp_path: Path
) -> None:
    up, endpoints = _start(ups, tmp_path)
    url, database_url = endpoints["nats_url"], endpoints["database_url"]
    keys = [f"n{i}" for i in range(10_000)]
    await _submit(url, keys[:6_000])
    await _wait_progress(database_url, 500)

    old = endpoints["pids"]["nats-server"]
    os.kill(old, signal.SIGKILL)
    # Submissions during the outage wait and retry; those acknowledged must all run.
    late = asyncio.create_task(_submit(url, keys[6_000:]))
    new = await _wait_new_pid(up, "nats-server", old)
    assert _endpoints(up)["nats_url"] == url, "the restarted nats-server moved to another port"
    assert _endpoints(up)["restarts"]["nats-server"] == 1
    await late
    await _wait_terminal(up, database_url, keys, timeout=600)

    out = up.out.read_text()
    assert f"nats-server (pid {old}) DIED" in out
    assert "nats-server restarted (pid " in out and str(new) in out
    assert up.proc is not None and up.proc.poll() is None, "up stopped"
    assert up.interrupt() == 0


async def test_up_restarts_a_killed_postgres_and_tasks_finish(
    ups: list[Up], tmp_path: Path
) -> None:
    up, endpoints = _start(ups, tmp_path)
    url, database_url = endpoints["nats_url"], endpoints["database_url"]
    keys = [f"p{i}" for i in range(3_000)]
    await _submit(url, keys)
    await _wait_progress(database_url, 200)

    old = endpoints["pids"]["postgres"]
    os.kill(old, signal.SIGKILL)
    await _wait_new_pid(up, "postgres", old)
    assert _endpoints(up)["database_url"] == database_url
    assert _endpoints(up)["restarts"]["postgres"] == 1
    await _wait_terminal(up, database_url, keys, timeout=600)

    assert f"postgres (pid {old}) DIED" in up.out.read_text()
    assert up.proc is not None and up.proc.poll() is None, "up stopped"
    assert up.interrupt() == 0
