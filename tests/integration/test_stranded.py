"""Nothing is stranded: vanished consumers, colliding names, pools without executors,
undecodable queued messages and subjects no client can own, on real servers and processes."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats
import nats.js.errors
import psycopg
import pytest
from harness import Cluster, metric, register, scrape, wait_for
from nats.js.api import AckPolicy, ConsumerConfig
from test_engine_outcomes import final

from tidegate import names
from tidegate.bus.deadletters import MessageDeadLetter, list_dead
from tidegate.bus.natsconn import connect
from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.wire import ClientRecord, TaskSpec

Conn = psycopg.AsyncConnection[Any]

# The reconciler, shortened: a pool without executor loses its tasks within seconds.
FAST_LOST = {"TIDEGATE_LOST_AFTER_S": "3", "TIDEGATE_RECONCILE_EVERY_S": "0.5"}


async def submit(nats_url: str, client: str, *specs: TaskSpec) -> None:
    async with await TidegateClient.connect(nats_url, client) as tg:
        for spec in specs:
            await tg.submit(spec)


async def consumer_exists(nats_url: str, stream: str, durable: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().consumer_info(stream, durable)
        return True
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


async def dead_letters(nats_url: str, **filters: Any) -> list[MessageDeadLetter]:
    nc = await connect(nats_url, "test-dead")
    try:
        return await list_dead(nc.jetstream(), **filters)
    finally:
        await nc.close()


async def heartbeat_of(nats_url: str, executor: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(names.EXECUTORS_BUCKET)
        try:
            entry = await kv.get(executor)
        except nats.js.errors.KeyNotFoundError:
            return False
        return bool(entry.value)
    finally:
        await nc.close()


async def subjects(nats_url: str, stream: str) -> dict[str, int]:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(stream, subjects_filter=">")
        return {s: n for s, n in (info.state.subjects or {}).items() if n}
    finally:
        await nc.close()


@pytest.mark.slow
async def test_a_route_consumer_the_server_deleted_is_made_again(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver(TIDEGATE_ROUTE_INACTIVE_THRESHOLD_S="2")
    cluster.executor(slots=2)
    route = names.route_consumer("alpha")
    await submit(cluster.nats_url, "alpha", TaskSpec(key="first", argv=["/bin/true"]))
    await final(db, "alpha:first", "succeeded")

    async def deleted_by_server() -> bool:
        return not await consumer_exists(cluster.nats_url, names.TASKS_STREAM, route)

    await wait_for(deleted_by_server, timeout=30, what="the idle route consumer to be deleted")
    await submit(cluster.nats_url, "alpha", TaskSpec(key="second", argv=["/bin/true"]))
    await final(db, "alpha:second", "succeeded")
    assert await consumer_exists(cluster.nats_url, names.TASKS_STREAM, route)


async def test_a_route_consumer_deleted_while_cached_is_rebound(cluster: Cluster, db: Conn) -> None:
    """Deleted under a running router (an operator's `nats consumer rm`): the cached
    subscription's next pull finds it gone, and the consumer is made and bound again."""
    cluster.driver()
    cluster.executor(slots=2)
    await submit(cluster.nats_url, "beta", TaskSpec(key="first", argv=["/bin/true"]))
    await final(db, "beta:first", "succeeded")
    nc = await nats.connect(cluster.nats_url)
    try:
        assert await nc.jetstream().delete_consumer(
            names.TASKS_STREAM, names.route_consumer("beta")
        )
    finally:
        await nc.close()
    await submit(cluster.nats_url, "beta", TaskSpec(key="second", argv=["/bin/true"]))
    await final(db, "beta:second", "succeeded")


async def test_names_that_meet_under_underscores_run_side_by_side(
    cluster: Cluster, db: Conn
) -> None:
    await register(
        cluster.nats_url,
        cluster.database_url,
        ClientRecord(name="team_x"),
        ClientRecord(name="team"),
    )
    # A consumer of the earlier, ambiguous naming on one of the subjects: it must make way.
    nc = await nats.connect(cluster.nats_url)
    try:
        await nc.jetstream().add_consumer(
            names.READY_STREAM,
            ConsumerConfig(
                durable_name=names.legacy_ready_consumer("team_x", "default"),
                filter_subject=names.ready_subject("team_x", "default"),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
    finally:
        await nc.close()
    cluster.driver()
    cluster.executor(pool="default", slots=4)
    cluster.executor(pool="x_default", slots=4)
    keys = [f"k{i}" for i in range(5)]
    await submit(
        cluster.nats_url,
        "team_x",
        *(TaskSpec(key=k, pool="default", argv=["/bin/true"]) for k in keys),
    )
    await submit(
        cluster.nats_url,
        "team",
        *(TaskSpec(key=k, pool="x_default", argv=["/bin/true"]) for k in keys),
    )
    for k in keys:
        await final(db, f"team_x:{k}", "succeeded")
        await final(db, f"team:{k}", "succeeded")
    ready_a = names.ready_consumer("team_x", "default")
    ready_b = names.ready_consumer("team", "x_default")
    assert ready_a != ready_b
    assert await consumer_exists(cluster.nats_url, names.READY_STREAM, ready_a)
    assert await consumer_exists(cluster.nats_url, names.READY_STREAM, ready_b)
    legacy = names.legacy_ready_consumer("team_x", "default")
    assert not await consumer_exists(cluster.nats_url, names.READY_STREAM, legacy)


@pytest.mark.slow
async def test_a_pool_without_executor_loses_its_task_within_the_bound(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver(**FAST_LOST)
    cluster.executor(pool="default", slots=2)
    started = time.monotonic()
    await submit(
        cluster.nats_url,
        "gamma",
        TaskSpec(key="orphan", pool="nowhere", argv=["/bin/true"]),
        TaskSpec(key="served", argv=["/bin/true"]),
    )
    await final(db, "gamma:served", "succeeded")
    row = await final(db, "gamma:orphan", "lost", timeout=30)
    # The bound (3 s) and a few reconcile passes, with room for a busy machine.
    assert time.monotonic() - started < 25
    assert "no live executor in pool nowhere" in row["reason"], row
    left = {**await subjects(cluster.nats_url, names.READY_STREAM)}
    left.update(await subjects(cluster.nats_url, names.WORK_STREAM))
    assert not [s for s in left if "nowhere" in s], left
    # An executor that comes for the pool later finds nothing to run.
    cluster.executor(pool="nowhere", slots=2)
    await wait_for(
        lambda: heartbeat_of(cluster.nats_url, "exec-1"),
        timeout=30,
        what="the late executor's heartbeat",
    )
    work = names.work_consumer("nowhere", "short")
    nc = await nats.connect(cluster.nats_url)
    try:
        info = await nc.jetstream().consumer_info(names.WORK_STREAM, work)
    finally:
        await nc.close()
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    row = await final(db, "gamma:orphan", "lost")
    assert row["executor"] is None


@pytest.mark.slow
async def test_a_running_task_whose_pool_lost_its_last_executor_is_lost(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver(**FAST_LOST)
    doomed = cluster.executor(pool="solo", slots=2)
    await submit(cluster.nats_url, "delta", TaskSpec(key="hang", pool="solo", shell="sleep 120"))
    running = await final(db, "delta:hang", "running")
    assert running["attempt"] == 1
    doomed.kill9()
    killed = time.monotonic()
    # Heartbeat TTL (2 s), then the bound (3 s) plus the work ack wait (3 s): not before.
    row = await final(db, "delta:hang", "lost", timeout=60)
    waited = time.monotonic() - killed
    assert 5 <= waited < 45, waited
    assert row["attempt"] == 1 and "no live executor in pool solo" in row["reason"], row


async def test_undecodable_ready_and_work_messages_lose_their_task(
    cluster: Cluster, db: Conn
) -> None:
    cluster.driver()
    cluster.executor(slots=2)
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        await js.publish(
            names.ready_subject("epsilon", "default"),
            b"{not a work item",
            headers={"Nats-Msg-Id": "epsilon:bad-ready"},
        )
        await js.publish(
            names.work_subject("default", "short", "epsilon"),
            b'{"task_id": 5}',
            headers={"Nats-Msg-Id": "epsilon:bad-work"},
        )
        # No id to tell the task by: only a dead letter.
        await js.publish(names.work_subject("default", "short", "epsilon"), b"\x00garbage")
    finally:
        await nc.close()
    ready = await final(db, "epsilon:bad-ready", "lost")
    work = await final(db, "epsilon:bad-work", "lost")
    assert "undecodable ready message" in ready["reason"], ready
    assert "undecodable work message" in work["reason"], work
    await submit(cluster.nats_url, "epsilon", TaskSpec(key="good", argv=["/bin/true"]))
    await final(db, "epsilon:good", "succeeded")

    async def set_aside() -> list[MessageDeadLetter] | None:
        found = await dead_letters(cluster.nats_url, client="epsilon")
        return found if len(found) == 3 else None

    found = await wait_for(set_aside, timeout=30, what="three dead letters of epsilon's")
    by_payload = {d.payload: d for d in found}
    assert by_payload[b"{not a work item"].stage == "ready"
    assert by_payload[b'{"task_id": 5}'].stage == "work"
    assert by_payload[b"\x00garbage"].stage == "work"
    assert "undecodable" in by_payload[b"\x00garbage"].reason


async def test_submissions_that_name_no_task_are_dead_letters_counted_per_client(
    cluster: Cluster, db: Conn
) -> None:
    port = free_port()
    cluster.driver(TIDEGATE_METRICS_PORT=str(port))
    cluster.executor(slots=2)
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        body = TaskSpec(key="k1", argv=["/bin/true"])
        await js.publish("tg.submit.a.b", msgspec.json.encode(body))
        await js.publish("tg.submit.*", msgspec.json.encode(body))
        await js.publish(names.submit_subject("alpha"), b"{oops")  # no header, no key
    finally:
        await nc.close()
    await submit(cluster.nats_url, "alpha", TaskSpec(key="fine", argv=["/bin/true"]))
    await final(db, "alpha:fine", "succeeded")

    async def all_set_aside() -> list[MessageDeadLetter] | None:
        found = await dead_letters(cluster.nats_url, stage="submit")
        return found if len(found) == 3 else None

    found = await wait_for(all_set_aside, timeout=30, what="three submissions set aside")
    by_subject = {d.subject: d for d in found}
    assert by_subject["tg.submit.a.b"].client is None
    assert "not a client's submission subject" in by_subject["tg.submit.a.b"].reason
    assert by_subject["tg.submit.*"].client is None
    assert by_subject[names.submit_subject("alpha")].client == "alpha"
    assert "no task key" in by_subject[names.submit_subject("alpha")].reason
    # Gone from the submission stream, and no state was made up for them.
    assert await subjects(cluster.nats_url, names.TASKS_STREAM) == {}
    cur = await db.execute("SELECT task_id FROM tasks WHERE state = 'rejected'")
    assert await cur.fetchall() == []
    text = scrape(port)
    per_client = [
        line
        for line in text.splitlines()
        if line.startswith("tidegate_message_dead_letters_total{")
    ]
    assert any('client="alpha"' in line and line.endswith(" 1.0") for line in per_client), text
    assert metric(text, "tidegate_message_dead_letters_total") == 3


@pytest.mark.slow
async def test_a_running_task_whose_message_vanished_with_its_executor_is_lost(
    cluster: Cluster, db: Conn
) -> None:
    """The pool stays served, but nothing holds the task any more: its executor died and its
    work message is gone (as when it is set aside, or an operator removed it)."""
    cluster.driver(**FAST_LOST)
    doomed = cluster.executor(slots=2)
    await submit(cluster.nats_url, "alpha", TaskSpec(key="vanish", shell="sleep 30"))
    running = await final(db, "alpha:vanish", "running")
    assert running["attempt"] == 1
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        subject = names.client_work_filter("alpha")
        msg = await js.get_msg(names.WORK_STREAM, 1, subject=subject, next=True)
        assert msg.seq is not None
        await js.delete_msg(names.WORK_STREAM, msg.seq)
    finally:
        await nc.close()
    doomed.kill9()
    killed = time.monotonic()
    cluster.executor(slots=2)
    await submit(cluster.nats_url, "alpha", TaskSpec(key="after", argv=["/bin/true"]))
    await final(db, "alpha:after", "succeeded")
    row = await final(db, "alpha:vanish", "lost", timeout=60)
    # Not before the work ack wait (3 s) and the bound (3 s) have passed.
    assert time.monotonic() - killed >= 6
    assert row["attempt"] == 1 and "exec-0 stopped reporting" in row["reason"], row


async def test_an_event_of_a_state_this_version_does_not_know_is_set_aside(
    cluster: Cluster, db: Conn
) -> None:
    """As from a newer driver during a rolling upgrade: neither looped on nor lost."""
    cluster.driver()
    cluster.executor(slots=2)
    newer = {
        "state": "preempted",
        "task_id": "beta:newer",
        "client": "beta",
        "key": "newer",
        "attempt": 1,
        "at": "2026-12-01T00:00:00+00:00",
        "submitted_at": "2026-12-01T00:00:00+00:00",
    }
    nc = await nats.connect(cluster.nats_url)
    try:
        await nc.jetstream().publish(names.event_subject("beta"), msgspec.json.encode(newer))
    finally:
        await nc.close()
    await submit(cluster.nats_url, "beta", TaskSpec(key="after", argv=["/bin/true"]))
    await final(db, "beta:after", "succeeded")

    async def set_aside() -> list[MessageDeadLetter]:
        return [
            d
            for d in await dead_letters(cluster.nats_url, client="beta")
            if "unknown event state 'preempted'" in d.reason
        ]

    await wait_for(set_aside, timeout=30, what="the event of an unknown state set aside")


@pytest.mark.slow
async def test_a_queued_task_whose_message_is_gone_is_lost(cluster: Cluster, db: Conn) -> None:
    """A paused client's task waits in the ready queue; its message is removed there (as when
    it is set aside after too many deliveries): the task can never run, so it is lost."""
    await register(cluster.nats_url, cluster.database_url, ClientRecord(name="held", paused=True))
    cluster.driver(**FAST_LOST)
    cluster.executor(slots=2)
    await submit(cluster.nats_url, "held", TaskSpec(key="gone", argv=["/bin/true"]))
    await final(db, "held:gone", "queued")
    nc = await nats.connect(cluster.nats_url)
    try:
        js = nc.jetstream()
        subject = names.ready_subject("held", "default")
        msg = await js.get_msg(names.READY_STREAM, 1, subject=subject, next=True)
        assert msg.seq is not None
        await js.delete_msg(names.READY_STREAM, msg.seq)
    finally:
        await nc.close()
    row = await final(db, "held:gone", "lost", timeout=60)
    assert "no queue holds it any more" in row["reason"], row


async def test_stray_ready_and_work_subjects_are_set_aside(cluster: Cluster, db: Conn) -> None:
    cluster.driver(**FAST_LOST)
    cluster.executor(slots=2)
    strays = {
        names.READY_STREAM: ["tg.ready.a=b.default", "tg.ready.alpha.*"],
        names.WORK_STREAM: ["tg.work.default.medium.alpha", "tg.work.*.short.alpha"],
    }
    nc = await nats.connect(cluster.nats_url)
    try:
        for subject in [s for group in strays.values() for s in group]:
            await nc.jetstream().publish(subject, b"{}")
    finally:
        await nc.close()
    await submit(cluster.nats_url, "alpha", TaskSpec(key="fine", argv=["/bin/true"]))
    await final(db, "alpha:fine", "succeeded")

    async def all_set_aside() -> list[MessageDeadLetter] | None:
        found = [d for d in await dead_letters(cluster.nats_url) if d.payload == b"{}"]
        return found if len(found) == 4 else None

    found = await wait_for(all_set_aside, timeout=30, what="four stray messages set aside")
    assert {d.subject for d in found} == {s for group in strays.values() for s in group}
    assert {d.stage for d in found} == {"ready", "work"}
    for stream in strays:
        assert await subjects(cluster.nats_url, stream) == {}
