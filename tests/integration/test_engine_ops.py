"""What an operator relies on: metrics, heartbeats, keep-alive, drain, back-pressure, JSON."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import msgspec
import nats
import psycopg
import pytest
from harness import Cluster, cli, metric, scrape, wait_for
from test_engine_outcomes import final

from tidegate import names
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.embedded.servers import free_port
from tidegate.errors import BufferFull
from tidegate.wire import Heartbeat, TaskSpec, decode_heartbeat

Conn = psycopg.AsyncConnection[Any]


async def test_metrics_and_heartbeats(cluster: Cluster, db: Conn) -> None:
    dport, eport = free_port(), free_port()
    cluster.driver("--metrics-port", str(dport))
    cluster.executor(slots=4, TIDEGATE_METRICS_PORT=str(eport))
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit_many(TaskSpec(key=f"m{i}", argv=["/bin/true"]) for i in range(20))
        await tg.submit(TaskSpec(key="long", argv=["sleep", "30"]))
    await final(db, "alpha:m19", "succeeded")
    await final(db, "alpha:long", "running")

    async def driver_counted() -> str | None:
        text = scrape(dport)
        return text if metric(text, "tidegate_projection_rows_total") >= 21 else None

    text = await wait_for(driver_counted, timeout=15, what="driver metrics")
    assert metric(text, "tidegate_tasks_routed_total") == 21
    assert metric(text, "tidegate_projection_commits_total") >= 1
    assert metric(text, "tidegate_projection_batch_rows_count") >= 1
    assert metric(text, "tidegate_executors_alive") == 1
    assert 'tidegate_executor_heartbeat_age_seconds{executor="exec-0"}' in text
    # The alert rules' gauges, sampled at the driver's start (driver/gauges.py).
    assert metric(text, 'tidegate_stream_max_bytes{stream="TG_TASKS"}') == Limits().tasks_max_bytes
    assert "tidegate_projection_lag_seconds " in text
    etext = scrape(eport)
    assert metric(etext, "tidegate_executor_running_tasks") == 1
    assert metric(etext, "tidegate_executor_finished_total") == 20
    assert metric(etext, "tidegate_executor_heartbeat_age_seconds") < 2

    nc = await nats.connect(cluster.nats_url)
    try:
        kv = await nc.jetstream().key_value(names.EXECUTORS_BUCKET)

        async def only_long() -> Heartbeat | None:
            # A finished task stays in the heartbeat until its work message is acked (its
            # result settles in a batch), a beat or two after the database shows it.
            hb = decode_heartbeat((await kv.get("exec-0")).value or b"")
            return hb if [t.task_id for t in hb.running] == ["alpha:long"] else None

        first = await wait_for(only_long, timeout=5, what="a heartbeat naming the long task only")

        async def newer() -> bool:
            hb = decode_heartbeat((await kv.get("exec-0")).value or b"")
            return hb.at > first.at

        await wait_for(newer, timeout=2.5, interval=0.1, what="a heartbeat within 2 s")
    finally:
        await nc.close()


async def test_task_longer_than_ack_wait_is_kept_alive(cluster: Cluster, db: Conn) -> None:
    cluster.driver()
    cluster.executor(slots=2)  # the harness sets a 3 s ack wait
    async with await TidegateClient.connect(cluster.nats_url, "beta") as tg:
        await tg.submit(TaskSpec(key="slow", argv=["sleep", "7"]))
    row = await final(db, "beta:slow", "succeeded", timeout=30)
    assert row["attempt"] == 1  # never redelivered while it ran


@pytest.mark.slow
async def test_sigterm_drains_then_hands_back(cluster: Cluster, db: Conn, tmp_path: Path) -> None:
    cluster.driver()
    # Drain deadline 3 s: the short task finishes in time, the long one is handed back.
    leaving = cluster.executor(slots=4, TIDEGATE_DRAIN_TIMEOUT_S="3")
    async with await TidegateClient.connect(cluster.nats_url, "gamma") as tg:
        await tg.submit(TaskSpec(key="short", argv=["sleep", "1.5"]))
        # Long enough to outlast the drain deadline, short enough to finish on the next one.
        await tg.submit(TaskSpec(key="long", argv=["sleep", "8"], max_attempts=1))
    await final(db, "gamma:short", "running")
    await final(db, "gamma:long", "running")
    assert leaving.proc is not None
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(30) == 0
    short = await final(db, "gamma:short", "succeeded")
    assert short["attempt"] == 1
    cluster.executor(slots=4)
    # A graceful hand-back is not an attempt: with max_attempts=1 the task still runs again,
    # to the end, as attempt 1 on the other executor.
    long = await final(db, "gamma:long", "succeeded", timeout=60)
    assert long["attempt"] == 1 and long["executor"] == "exec-1"


async def test_full_submission_buffer_pushes_back(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        # A tiny buffer and no driver draining it: the publisher must get an error, and
        # nothing already accepted may be dropped (discard=new, not old).
        await ensure_all(nc.jetstream(), Limits(tasks_max_bytes=64 * 1024))
        tg = TidegateClient(nc, "alpha", retries=0)
        accepted = 0
        with pytest.raises(BufferFull):
            for i in range(10_000):
                await tg.submit(TaskSpec(key=f"b{i}", argv=["echo", "x" * 200]))
                accepted += 1
        info = await nc.jetstream().stream_info(names.TASKS_STREAM)
        assert info.state.messages == accepted > 0
        assert info.state.first_seq == 1  # the oldest task is still there
    finally:
        await nc.close()


async def test_cli_reads_state_as_json(cluster: Cluster, db: Conn) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    submitted = cli(
        cluster.env(),
        "submit",
        "--client",
        "delta",
        "--key",
        "j1",
        "--",
        "sh",
        "-c",
        "echo hello; exit 0",
    )
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "delta:j1"
    await final(db, "delta:j1", "succeeded")
    shown = cli(cluster.env(), "task", "show", "delta:j1", "--json")
    assert shown.returncode == 0, shown.stderr
    task = json.loads(shown.stdout)
    assert task["state"] == "succeeded" and task["attempt"] == 1 and task["exit_code"] == 0
    assert task["executor"] == "exec-0" and task["duration_s"] >= 0
    assert task["log_tail"].strip() == "hello" and task["argv"][0] == "sh"
    listed = json.loads(cli(cluster.env(), "tasks", "--client", "delta", "--json").stdout)
    assert [t["task_id"] for t in listed] == ["delta:j1"]
    missing = cli(cluster.env(), "task", "show", "delta:nope")
    assert missing.returncode == 1 and "no task" in missing.stderr
    bad = cli(cluster.env(), "submit", "--client", "delta", "--", "")
    assert bad.returncode == 2 and "argv[0]" in bad.stderr


async def test_per_event_baseline_commits_every_transition(cluster: Cluster, db: Conn) -> None:
    dport = free_port()
    cluster.driver("--persist", "per-event", "--metrics-port", str(dport))
    cluster.executor(slots=8)
    async with await TidegateClient.connect(cluster.nats_url, "epsilon") as tg:
        await tg.submit_many(TaskSpec(key=f"p{i}", argv=["/bin/true"]) for i in range(100))

    async def done() -> bool:
        cur = await db.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        return await cur.fetchone() == (100,)

    await wait_for(done, timeout=60, what="100 succeeded in per-event mode")
    text = scrape(dport)
    # One commit per row written: no batching, no coalescing (queued + terminal at least).
    assert metric(text, "tidegate_projection_commits_total") == metric(
        text, "tidegate_projection_rows_total"
    )
    assert metric(text, "tidegate_projection_commits_total") >= 200
    record = msgspec.json.decode(cli(cluster.env(), "task", "show", "epsilon:p0", "--json").stdout)
    assert record["state"] == "succeeded"


async def test_submit_for_an_unknown_client_exits_2_and_publishes_nothing(
    cluster: Cluster,
) -> None:
    refused = cli(cluster.env(), "submit", "--client", "nobody", "--key", "k1", "--", "true")
    assert refused.returncode == 2, refused.stderr
    assert "no client 'nobody' is registered" in refused.stderr
    assert "tidegate client add nobody" in refused.stderr
    assert refused.stdout == ""
    nc = await nats.connect(cluster.nats_url)
    try:
        info = await nc.jetstream().stream_info(names.TASKS_STREAM, subjects_filter=">")
    finally:
        await nc.close()
    assert names.submit_subject("nobody") not in (info.state.subjects or {})
