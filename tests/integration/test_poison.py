"""Poison messages are set aside once, as message dead letters, and never block what follows:
a year-9999 event and heartbeat under a running driver, and messages that reach their
consumer's `max_deliver` (the max-deliveries advisory, and the sweep that reconciles it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from harness import Cluster, cli, metric, register, scrape, wait_for
from receiver import Receiver

from tidegate import names
from tidegate.bus.deadletters import list_dead
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all, ensure_ready_consumer
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.driver.poison import PoisonWatch
from tidegate.embedded.servers import free_port
from tidegate.wire import ClientRecord, Failed, TaskSpec, WorkItem, decode_event, encode, now

Conn = psycopg.AsyncConnection[Any]

YEAR_9999 = "9999-12-31T23:59:59Z"


def poison_event(client: str) -> bytes:
    return json.dumps(
        {
            "state": "succeeded",
            "task_id": f"{client}:poison",
            "client": client,
            "key": "poison",
            "attempt": 1,
            "at": YEAR_9999,
            "submitted_at": YEAR_9999,
            "finished_at": YEAR_9999,
            "exit_code": 0,
        }
    ).encode()


def poison_heartbeat() -> bytes:
    return json.dumps(
        {
            "executor": "broken-clock",
            "host": "h",
            "pid": 1,
            "pools": ["default"],
            "slots": 1,
            "running": [],
            "load": 0.0,
            "at": YEAR_9999,
        }
    ).encode()


async def test_an_event_on_another_clients_subject_is_set_aside_and_moves_nothing(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    """Issue 10, point 3: a client (any connection) publishing an event for another client's
    task on its own subject must not move that task, nor be called back signed as it."""
    async with Receiver() as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(name="victim", sensitive=True, callback_url=receiver.url()),
            ClientRecord(name="forger"),
        )
        cluster.driver()
        cluster.executor(slots=2)
        async with await TidegateClient.connect(cluster.nats_url, "victim") as tg:
            receipt = await tg.submit(TaskSpec(key="v1", argv=["/bin/true"]))

        async def row_state() -> str | None:
            cur = await db.execute("SELECT state FROM tasks WHERE task_id = 'victim:v1'")
            row = await cur.fetchone()
            return None if row is None else str(row[0])

        async def succeeded() -> bool:
            return await row_state() == "succeeded"

        await wait_for(succeeded, timeout=60, what="victim:v1 succeeded")
        at = now()
        forged = Failed(
            task_id=receipt.task_id,
            client="victim",
            key="v1",
            attempt=9,  # newer than anything real: it would win the monotone upsert
            at=at,
            submitted_at=at,
            finished_at=at,
            exit_code=1,
            reason="forged",
            sensitive=True,
        )
        nc = await connect(cluster.nats_url, "forger")
        try:
            js = nc.jetstream()
            await js.publish(names.event_subject("forger"), encode(forged))

            async def set_aside() -> list[Any]:
                return [d for d in await list_dead(js) if d.subject == "tg.event.forger"]

            found = await wait_for(set_aside, timeout=30, what="the forged event set aside")
            assert "not its own subject" in found[0].reason, found[0].reason
            assert found[0].payload == encode(forged)
            # Both stages are past it (nothing pending), and neither acted on it.
            for consumer in (names.PROJECTOR_CONSUMER, names.NOTIFY_CONSUMER):

                async def past(consumer: str = consumer) -> bool:
                    info = await js.consumer_info(names.EVENTS_STREAM, consumer)
                    return info.num_ack_pending == 0 and info.num_pending == 0

                await wait_for(past, timeout=30, what=f"{consumer} past the forged event")
        finally:
            await nc.close()
        assert await row_state() == "succeeded"
        assert all(cb.state != "failed" for cb in receiver.delivered())


@pytest.mark.slow
async def test_year_9999_event_and_heartbeat_are_set_aside(
    cluster: Cluster, engine_db: str, db: Conn
) -> None:
    async with Receiver() as receiver:
        await register(
            cluster.nats_url,
            engine_db,
            ClientRecord(name="hooked", callback_url=receiver.url(), callback_batch_max=50),
        )
        nc = await connect(cluster.nats_url, "test")
        js = nc.jetstream()
        try:
            buckets = await ensure_all(js, Limits())
            # The poison event first, ahead of every real task in the stream.
            await js.publish(
                names.event_subject("hooked"),
                poison_event("hooked"),
                headers={"Nats-Msg-Id": "hooked:poison/1/succeeded"},
            )
            port = free_port()
            cluster.driver("--metrics-port", str(port))
            cluster.executor(slots=8)
            n = 30
            async with await TidegateClient.connect(cluster.nats_url, "hooked") as tg:
                await tg.submit_many(TaskSpec(key=f"k{i}", argv=["/bin/true"]) for i in range(n))

            async def all_projected() -> bool:
                cur = await db.execute(
                    "SELECT count(*) FROM tasks WHERE client = 'hooked' AND state = 'succeeded'"
                )
                row = await cur.fetchone()
                return row is not None and row[0] == n

            await wait_for(all_projected, timeout=90, what=f"{n} succeeded rows")

            def called_back() -> set[str]:
                return {cb.task_id for cb in receiver.delivered() if cb.state == "succeeded"}

            async def all_called_back() -> bool:
                return called_back() >= {f"hooked:k{i}" for i in range(n)}

            await wait_for(all_called_back, timeout=60, what=f"{n} callbacks")
            assert "hooked:poison" not in called_back()

            async def both_set_aside() -> list[Any]:
                # An executor with a broken clock writes such a heartbeat every interval
                # (and a key ages out within seconds): one dead letter for all of them.
                await buckets.executors.put("broken-clock", poison_heartbeat())
                found = await list_dead(js)
                return found if len(found) >= 2 else []

            found = await wait_for(both_set_aside, timeout=30, what="two dead letters")
            by_stage = {d.stage: d for d in found}
            assert len(found) == 2, found  # the projector and the notifier: stored once
            event = by_stage.get("event") or by_stage["notify"]
            assert event.client == "hooked"
            assert event.subject == "tg.event.hooked"
            assert "out of range" in event.reason and "9999" in event.reason
            assert event.payload == poison_event("hooked")
            beat = by_stage["heartbeat"]
            assert beat.subject == f"$KV.{names.EXECUTORS_BUCKET}.broken-clock"
            assert "out of range" in beat.reason
            assert beat.payload == poison_heartbeat()
            # Nothing of the poison stays in the events consumers' way.
            for consumer in (names.PROJECTOR_CONSUMER, names.NOTIFY_CONSUMER):
                info = await js.consumer_info(names.EVENTS_STREAM, consumer)
                assert info.num_ack_pending == 0 and info.num_pending == 0, (consumer, info)

            listed = cli(cluster.env(), "dead-letters", "list", "--kind", "message", "--json")
            assert listed.returncode == 0, listed.stderr
            shape = json.loads(listed.stdout)
            assert shape["kind"] == "message"
            rows = {d["stage"]: d for d in shape["dead_letters"]}
            assert set(rows) == set(by_stage)
            assert rows["heartbeat"]["payload"] == poison_heartbeat().decode()
            assert {"seq", "stage", "client", "subject", "reason", "at", "payload"} <= set(
                rows["heartbeat"]
            )
            text = scrape(port)
            assert metric(text, "tidegate_message_dead_letters_total") == 2, text
        finally:
            await nc.close()
    # The same poison again (a redelivery, another driver): stored once, not twice.


async def test_max_deliveries_become_dead_letters(nats_url: str) -> None:
    """A ready message nak'ed `max_deliver` times (a stage failing on it every time) and an
    event the projector never processes, while the notifier acked it."""
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    counted: list[tuple[str, str | None]] = []
    watch = PoisonWatch(nc, js, lambda stage, client: counted.append((stage, client)))
    running = asyncio.create_task(watch.run())
    try:
        limits = Limits(max_deliver=2)
        await ensure_all(js, limits)
        durable = await ensure_ready_consumer(js, "alpha", "default", max_deliver=2)
        await asyncio.sleep(0.2)  # the watch's subscription is registered
        ack = await js.publish(
            names.ready_subject("alpha", "default"), b"cannot be dispatched", headers={"X": "1"}
        )
        event_ack = await js.publish(names.event_subject("beta"), b"{}")
        ready = await js.pull_subscribe_bind(durable, stream=names.READY_STREAM)
        projector = await js.pull_subscribe_bind(
            names.PROJECTOR_CONSUMER, stream=names.EVENTS_STREAM
        )
        notifier = await js.pull_subscribe_bind(names.NOTIFY_CONSUMER, stream=names.EVENTS_STREAM)
        (done,) = await notifier.fetch(1, timeout=5)
        await done.ack()
        for sub in (ready, projector):
            for _ in range(2):
                (msg,) = await sub.fetch(1, timeout=5)
                await msg.nak()
            # A third pull: the server finds the message spent and sends the advisory.
            with pytest.raises(Exception):  # noqa: B017 - nats' TimeoutError
                await sub.fetch(1, timeout=1)

        async def both() -> list[Any]:
            found = await list_dead(js)
            return found if len(found) == 2 else []

        found = await wait_for(both, timeout=20, what="two dead letters")
        by_stage = {d.stage: d for d in found}
        assert by_stage["ready"].client == "alpha"
        assert by_stage["ready"].payload == b"cannot be dispatched"
        assert by_stage["ready"].headers == {"X": "1"}
        assert by_stage["ready"].origin == f"{names.READY_STREAM}:{ack.seq}"
        assert "delivered 2 times without being processed" in by_stage["ready"].reason
        assert by_stage["event"].client == "beta"
        assert by_stage["event"].origin == f"{names.EVENTS_STREAM}:{event_ack.seq}"
        assert sorted(counted) == [("event", "beta"), ("ready", "alpha")]

        # Out of their streams: nothing stuck behind the ack floor.
        async def gone() -> bool:
            ready_info = await js.stream_info(names.READY_STREAM)
            events_info = await js.stream_info(names.EVENTS_STREAM)
            return ready_info.state.messages == 0 and events_info.state.messages == 0

        await wait_for(gone, timeout=10, what="the spent messages deleted from their streams")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await nc.close()


async def test_the_sweep_finds_what_an_advisory_missed(nats_url: str) -> None:
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await ensure_all(js, Limits(max_deliver=2))
        durable = await ensure_ready_consumer(js, "gamma", "default", max_deliver=2)
        await js.publish(names.ready_subject("gamma", "default"), b"spent while no driver ran")
        sub = await js.pull_subscribe_bind(durable, stream=names.READY_STREAM)
        for _ in range(2):
            (msg,) = await sub.fetch(1, timeout=5)
            await msg.nak()
        with pytest.raises(Exception):  # noqa: B017
            await sub.fetch(1, timeout=1)
        # No watch ran: the advisory went nowhere. A message that is fine is there too.
        await js.publish(names.ready_subject("gamma", "default"), b"fine")
        watch = PoisonWatch(nc, js, lambda stage, client: None)
        assert await watch.sweep() == 0  # seen once: a suspect, not yet a dead letter
        (fine,) = await sub.fetch(1, timeout=5)
        await fine.ack()
        assert await watch.sweep() == 1
        (dead,) = await list_dead(js)
        assert dead.payload == b"spent while no driver ran" and dead.stage == "ready"
        assert "found by the sweep" in dead.reason
        assert (await js.stream_info(names.READY_STREAM)).state.messages == 0
    finally:
        await nc.close()


async def test_a_spent_ready_task_is_reported_lost(nats_url: str) -> None:
    """A ready message that reached max_deliver never runs: its task gets its terminal state
    (`lost`, with the reason) before the message becomes a dead letter."""
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    watch = PoisonWatch(nc, js, lambda stage, client: None)
    running = asyncio.create_task(watch.run())
    try:
        await ensure_all(js, Limits(max_deliver=2))
        durable = await ensure_ready_consumer(js, "delta", "default", max_deliver=2)
        await asyncio.sleep(0.2)  # the watch's subscription is registered
        item = WorkItem(
            task_id="delta:k1",
            client="delta",
            spec=TaskSpec(key="k1", argv=["/bin/true"]),
            pool="default",
            task_class="short",
            submitted_at=now(),
            run=7,
        )
        await js.publish(
            names.ready_subject("delta", "default"),
            encode(item),
            headers={"Nats-Msg-Id": names.run_msg_id(item.task_id, item.run)},
        )
        sub = await js.pull_subscribe_bind(durable, stream=names.READY_STREAM)
        for _ in range(2):
            (msg,) = await sub.fetch(1, timeout=5)
            await msg.nak()
        with pytest.raises(Exception):  # noqa: B017 - nats' TimeoutError
            await sub.fetch(1, timeout=1)

        async def set_aside() -> list[Any]:
            return await list_dead(js, stage="ready")

        (dead,) = await wait_for(set_aside, timeout=20, what="the ready dead letter")
        assert dead.client == "delta"
        raw = await js.get_last_msg(names.EVENTS_STREAM, names.event_subject("delta"))
        event = decode_event(raw.data or b"")
        assert event.state == "lost" and event.task_id == "delta:k1" and event.run == 7
        assert "delivered 2 times without being processed" in getattr(event, "reason", "")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await nc.close()
