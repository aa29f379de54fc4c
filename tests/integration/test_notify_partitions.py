"""Notifier partitions (issue 8, point 6): clients are hashed into partitions, each with its own
lease and consumer; drivers share them out, and losing one partition's holder moves only that
partition, without a client ever receiving an older state of a task after a newer one."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest
from harness import Cluster, Component, register, wait_for
from receiver import Receiver

from tidegate import names
from tidegate.bus.buckets import LEASE_TTL_S
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.wire import STATE_RANK, ClientRecord, TaskSpec

# For two partitions (the server's mapping, checked by the first test).
CLIENTS = {"north": 0, "western": 1}
TASKS = 150

_TOOK = re.compile(r"this driver now sends the callbacks of partition (\d+)")
_GAVE = re.compile(r"(?:handing partition (\d+) over|lease of partition (\d+) lost)")


async def test_events_are_stored_in_their_clients_partition(nats_url: str) -> None:
    nc = await connect(nats_url, "test-partitions")
    try:
        js = nc.jetstream()
        await ensure_all(js, Limits())  # one partition, as before partitions existed
        await js.publish(names.event_subject("western"), b"before")
        await ensure_all(js, Limits(notify_partitions=2))  # not a driver: changes nothing
        assert (await js.stream_info(names.EVENTS_STREAM)).config.subject_transform is None
        await ensure_all(js, Limits(notify_partitions=2), notifier=True)
        for client in CLIENTS:
            await js.publish(names.event_subject(client), client.encode())
        info = await js.stream_info(names.EVENTS_STREAM, subjects_filter=">")
        assert info.state.subjects == {
            "tg.event.western": 1,  # stored before: stays in partition 0, which still reads it
            "tg.event.0.north": 1,
            "tg.event.1.western": 1,
        }
        for client, partition in CLIENTS.items():
            assert names.event_partition(client, 2) == partition
        pending = {}
        for consumer in (names.notify_consumer(0), names.notify_consumer(1)):
            pending[consumer] = (await js.consumer_info(names.EVENTS_STREAM, consumer)).num_pending
        assert pending == {"notify": 2, "notify_1": 1}
        projector = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        assert projector.num_pending == 3  # the projector still sees every event
    finally:
        await nc.close()


def _held(log: str) -> set[int]:
    """The partitions a driver holds now, from its log."""
    mine: set[int] = set()
    for line in log.splitlines():
        if m := _TOOK.search(line):
            mine.add(int(m.group(1)))
        elif m := _GAVE.search(line):
            mine.discard(int(m.group(1) or m.group(2)))
    return mine


def _one_each(drivers: list[Component]) -> dict[int, int] | None:
    """Partition → its holder, once each driver holds exactly one partition of its own."""
    held = [_held(d.log()) for d in drivers]
    if any(len(h) != 1 for h in held) or set.union(*held) != {0, 1}:
        return None
    return {next(iter(h)): i for i, h in enumerate(held)}


def _handed_over(log: str, partition: int) -> bool:
    return any(int(m.group(1) or m.group(2)) == partition for m in _GAVE.finditer(log))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
async def test_losing_one_partitions_holder_moves_only_that_partition(
    nats_url: str, engine_db: str, tmp_path: Path, fault: str
) -> None:
    async def respond(_path: str, _body: bytes) -> int:
        await asyncio.sleep(0.005)  # a real endpoint's pace: the holders hold a backlog
        return 200

    async with Receiver(respond=respond) as rx:
        await register(
            nats_url,
            engine_db,
            *(ClientRecord(name=c, sensitive=True, callback_url=rx.url(f"/{c}")) for c in CLIENTS),
        )
        c = Cluster(
            nats_url=nats_url,
            database_url=engine_db,
            workdir=tmp_path / "run",
            # What a lost holder took comes back at the ack wait: shortened for the test.
            extra_env={"TIDEGATE_NOTIFY_PARTITIONS": "2", "TIDEGATE_NOTIFY_ACK_WAIT_S": "15"},
        )
        try:
            drivers = [c.driver(), c.driver()]
            c.executor(slots=16)

            async def shared_out() -> dict[int, int] | None:
                return _one_each(drivers)

            # Whoever started first took both; the second driver gets its share.
            held = await wait_for(shared_out, timeout=60, what="one partition per driver")
            victim_partition = 0
            victim = held[victim_partition]
            survivor = 1 - victim
            kept_partition = 1 - victim_partition
            keys = [f"t{i}" for i in range(TASKS)]
            for client in CLIENTS:
                async with await TidegateClient.connect(nats_url, client) as tg:
                    await tg.submit_many(TaskSpec(key=k, argv=["true"]) for k in keys)

            async def flowing() -> bool:
                return all(len(rx.delivered(f"/{cl}")) >= 30 for cl in CLIENTS)

            await wait_for(flowing, timeout=60, what="both partitions' callbacks under way")
            frozen = drivers[victim]
            kept_client = next(cl for cl, p in CLIENTS.items() if p == kept_partition)
            at_fault = [len(d.log()) for d in drivers]
            before = len(rx.delivered(f"/{kept_client}"))
            if fault == "SIGKILL":
                frozen.kill9()
            else:
                os.kill(frozen.pid, signal.SIGSTOP)
            try:

                async def taken_over() -> bool:
                    after = drivers[survivor].log()[at_fault[survivor] :]
                    took = rf"now sends the callbacks of partition {victim_partition}\b"
                    return bool(re.search(took, after))

                await wait_for(taken_over, timeout=LEASE_TTL_S * 6, what="the takeover")
                during = rx.delivered(f"/{kept_client}")
                if fault == "SIGSTOP":
                    await asyncio.sleep(LEASE_TTL_S)  # frozen well past its lease
            finally:
                if fault == "SIGSTOP":
                    os.kill(frozen.pid, signal.SIGCONT)
            # The other partition's callbacks went on while its neighbour's holder was gone.
            kept_done = {cb.key for cb in during if cb.state == "succeeded"} == set(keys)
            assert len(during) > before or kept_done, "the other partition stalled too"

            async def all_finished() -> bool:
                return all(
                    {cb.key for cb in rx.delivered(f"/{cl}") if cb.state == "succeeded"}
                    == set(keys)
                    for cl in CLIENTS
                )

            await wait_for(all_finished, timeout=180, interval=1, what="every task called back")
            # Only the lost holder's partition moved: the survivor kept its own throughout,
            # and the frozen driver, thawed, never sent the survivor's partition.
            assert not _handed_over(drivers[survivor].log()[at_fault[survivor] :], kept_partition)
            took_kept = rf"now sends the callbacks of partition {kept_partition}\b"
            assert not re.search(took_kept, frozen.log()[at_fault[victim] :])
            for client in CLIENTS:
                latest: dict[str, tuple[int, int, int]] = {}
                for cb in rx.delivered(f"/{client}"):
                    mark = (cb.run, cb.attempt, STATE_RANK[cb.state])
                    before_mark = latest.get(cb.task_id)
                    assert before_mark is None or mark >= before_mark, (
                        f"{cb.task_id}: {cb.state} (attempt {cb.attempt}) after a newer state"
                    )
                    latest[cb.task_id] = mark
            if fault == "SIGSTOP":
                # Thawed, the frozen driver is back: the takeover goes back to it.
                await wait_for(shared_out, timeout=60, what="the partitions shared out again")
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()
