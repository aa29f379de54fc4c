"""Outcomes, duplicates and bad input, end to end on real servers and real processes."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import nats
import psutil
import psycopg
from harness import Cluster, cli, wait_for

from tidegate import names
from tidegate.bus.deadletters import MessageDeadLetter, list_dead
from tidegate.client import TidegateClient
from tidegate.wire import Succeeded, TaskSpec, encode, now

Conn = psycopg.AsyncConnection[Any]


async def task_row(db: Conn, task_id: str) -> dict[str, Any] | None:
    cur = await db.execute(
        "SELECT state, attempt, exit_code, reason, log_tail, executor FROM tasks"
        " WHERE task_id = %s",
        (task_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    columns = ["state", "attempt", "exit_code", "reason", "log_tail", "executor"]
    return dict(zip(columns, row, strict=True))


async def final(db: Conn, task_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        row = await task_row(db, task_id)
        return row if row and row["state"] == state else None

    return await wait_for(reached, timeout=timeout, what=f"{task_id} to be {state}")  # type: ignore[no-any-return]


async def work_settled(nats_url: str) -> bool:
    """No routed task waits or runs: nothing more can execute."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.WORK_STREAM)
        return info.state.messages == 0
    finally:
        await nc.close()


async def test_failed_timed_out_and_cancelled(cluster: Cluster, db: Conn, tmp_path: Path) -> None:
    cluster.driver()
    cluster.executor(slots=4)
    pidfile = tmp_path / "grandchild.pid"
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(TaskSpec(key="fails", shell="echo about to fail; exit 3"))
        await tg.submit(
            TaskSpec(
                key="hangs",
                timeout_s=1,
                shell=f"sleep 300 & echo $! > {pidfile}; sleep 300",
            )
        )
        await tg.submit(TaskSpec(key="cancel-me", argv=["sleep", "300"]))

    failed = await final(db, "alpha:fails", "failed")
    assert failed["exit_code"] == 3 and failed["reason"] == "exit code 3"
    assert "about to fail" in failed["log_tail"]

    timed_out = await final(db, "alpha:hangs", "timed_out")
    assert "timed out" in timed_out["reason"]
    grandchild = int(pidfile.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    async def tree_gone() -> bool:
        return gone()

    await wait_for(tree_gone, timeout=10, what="the timed-out task's background child to die")

    await final(db, "alpha:cancel-me", "running")
    result = cli(cluster.env(), "task", "cancel", "alpha:cancel-me")
    assert result.returncode == 0, result.stderr
    cancelled = await final(db, "alpha:cancel-me", "cancelled")
    assert "cancel" in cancelled["reason"]


async def test_same_key_runs_once(cluster: Cluster, db: Conn, tmp_path: Path) -> None:
    cluster.driver()
    cluster.executor(slots=4)
    ran = tmp_path / "ran.txt"
    spec = TaskSpec(key="once", shell=f"echo run >> {ran}")
    twin = TaskSpec(key="twin", shell=f"echo twin >> {ran}")
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        first = await tg.submit(spec)
        again = await tg.submit(spec)
        batch = await tg.submit_many([twin, twin])
    assert not first.duplicate and again.duplicate
    assert [r.duplicate for r in batch] == [False, True]
    await final(db, "beta:once", "succeeded")
    await final(db, "beta:twin", "succeeded")
    await wait_for(lambda: work_settled(cluster.nats_url), timeout=10, what="work stream empty")
    assert sorted(ran.read_text().split()) == ["run", "twin"]
    row = await task_row(db, "beta:once")
    assert row is not None and row["attempt"] == 1


async def test_bad_input_is_rejected_and_routing_goes_on(cluster: Cluster, db: Conn) -> None:
    driver = cluster.driver()
    cluster.executor(slots=4)
    nc = await nats.connect(cluster.nats_url)
    js = nc.jetstream()

    async def raw(client: str, key: str, body: bytes) -> None:
        await js.publish(
            names.submit_subject(client), body, headers={"Nats-Msg-Id": names.msg_id(client, key)}
        )

    good = json.dumps({"key": "good", "argv": ["/bin/true"]}).encode()
    try:
        await raw("gamma", "malformed", b'{"key": "malformed", "argv": [')
        await raw("gamma", "wrongtype", json.dumps({"key": "wrongtype", "argv": "echo"}).encode())
        await raw(
            "gamma",
            "badtimeout",
            json.dumps({"key": "badtimeout", "argv": ["true"], "timeout_s": "soon"}).encode(),
        )
        await raw(
            "gamma", "huge", json.dumps({"key": "huge", "argv": ["echo", "x" * 100_000]}).encode()
        )
        await raw("gamma", "emptyargv", json.dumps({"key": "emptyargv", "argv": []}).encode())
        await raw("nobody", "stranger", json.dumps({"key": "stranger", "argv": ["true"]}).encode())
        await raw("gamma", "good", good)
    finally:
        await nc.close()

    expectations = {
        "gamma:malformed": "malformed JSON",
        "gamma:wrongtype": "Expected `array | null`, got `str`",
        "gamma:badtimeout": "timeout_s",
        "gamma:huge": "the limit is 65536",
        "gamma:emptyargv": "`argv` is empty",
        "nobody:stranger": "unknown client 'nobody'",
    }
    for task_id, reason in expectations.items():
        row = await final(db, task_id, "rejected")
        assert reason in row["reason"], (task_id, row["reason"])
    await final(db, "gamma:good", "succeeded")
    assert driver.alive()


async def test_rows_the_database_cannot_take_do_not_stop_projection(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    nc = await nats.connect(cluster.nats_url)
    js = nc.jetstream()
    try:
        # A malformed body whose dedup header holds a key no row could index (4,000 bytes):
        # no key can be read, so no state either: a dead letter of delta's.
        huge = secrets.token_urlsafe(3000)  # random: PostgreSQL cannot compress it to fit
        await js.publish(
            names.submit_subject("delta"),
            b"{oops",
            headers={"Nats-Msg-Id": names.msg_id("delta", huge)},
        )
        # An event published by hand, bypassing every check, that PostgreSQL refuses.
        poison = Succeeded(
            task_id="delta:" + huge,
            client="delta",
            key=huge,
            attempt=1,
            at=now(),
            submitted_at=now(),
            finished_at=now(),
            reason="forged",
        )
        await js.publish(names.event_subject("delta"), encode(poison))
    finally:
        await nc.close()
    async with await TidegateClient.connect(cluster.nats_url, "delta") as tg:
        await tg.submit(TaskSpec(key="after", argv=["/bin/true"]))
    await final(db, "delta:after", "succeeded")
    cur = await db.execute(
        "SELECT key, reason FROM tasks WHERE client = 'delta' AND state = 'rejected'"
    )
    assert await cur.fetchall() == []
    nc = await nats.connect(cluster.nats_url)
    try:

        async def set_aside() -> list[MessageDeadLetter]:
            return await list_dead(nc.jetstream(), stage="submit", client="delta")

        (dead,) = await wait_for(set_aside, timeout=30, what="the unkeyed submission set aside")
    finally:
        await nc.close()
    assert dead.payload == b"{oops" and "no task key" in dead.reason
