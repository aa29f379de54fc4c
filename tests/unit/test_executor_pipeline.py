"""The executor's settling pipeline (settle.py) and its log files (tasklogs.LogFiles, made
only when a task prints something).

The settler is driven here by recording stand-ins for the publisher and the NATS connection,
so that the order of what is sent can be checked exactly: a work message's ack never goes out
before its terminal event's PubAck came back. The same order on real servers, with a SIGKILL
in the middle, is tests/integration/test_executor_throughput.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.msg import Msg

from tidegate import names
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.config import ExecutorSettings, Limits
from tidegate.errors import SubmitError
from tidegate.executor import settle
from tidegate.executor.agent import Executor
from tidegate.executor.cancels import stop_runs
from tidegate.executor.process import ProcessLimits, run_process
from tidegate.executor.reports import finished_event
from tidegate.executor.settle import Settler
from tidegate.executor.tasklogs import LogFiles
from tidegate.executor.workmsg import Slot
from tidegate.metrics import ExecutorMetrics
from tidegate.wire import AnyEvent, CancelRequest, TaskSpec, WorkItem

AT = datetime(2026, 1, 1, tzinfo=UTC)
ACK_WAIT_S = 30.0


class Wire:
    """What reached "the server", in order: events stored, acks, flushes."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.refuse: set[str] = set()  # event ids whose publish fails (in a batch)
        self.flush_failures = 0
        self.batches: list[int] = []
        self.pubacks = asyncio.Event()  # PubAcks come back once this is set
        self.pubacks.set()
        self.sent = asyncio.Event()  # a batch reached publish_many


class FakePublisher:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def publish_many(self, batch: Sequence[Outgoing]) -> list[PubAck | Exception]:
        self.wire.batches.append(len(batch))
        self.wire.sent.set()
        await asyncio.sleep(0.01)  # the PubAcks take a while to come back
        await self.wire.pubacks.wait()
        out: list[PubAck | Exception] = []
        for seq, o in enumerate(batch, 1):
            if o.msg_id in self.wire.refuse:
                out.append(SubmitError(f"no PubAck for {o.msg_id}"))
            else:
                self.wire.log.append(("stored", o.msg_id))
                out.append(PubAck(stream="TG_EVENTS", seq=seq, duplicate=False))
        return out

    async def publish(self, out: Outgoing) -> PubAck:  # `report` alone, after a failed batch
        self.wire.log.append(("stored", out.msg_id))
        return PubAck(stream="TG_EVENTS", seq=0, duplicate=False)


class FakeClient:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    async def publish(self, subject: str, payload: bytes) -> None:
        assert payload == b"+ACK"
        self.wire.log.append(("ack", subject))

    async def _flush_pending(self, force_flush: bool = False) -> None:
        """What `round_trip` hands to the socket before its PING: here, already on the wire."""

    async def flush(self, timeout: int) -> None:
        if self.wire.flush_failures:
            self.wire.flush_failures -= 1
            raise TimeoutError("no PONG")
        self.wire.log.append(("flush", ""))


class FakeMsg:
    def __init__(self, wire: Wire, reply: str) -> None:
        self._client = FakeClient(wire)
        self.reply = reply
        self.wire = wire

    async def ack_sync(self, timeout: float) -> None:  # `ack` alone, after a failed batch
        self.wire.log.append(("ack", self.reply))


def _attempt(wire: Wire, key: str) -> tuple[Msg, Slot, AnyEvent]:
    item = WorkItem(
        task_id=f"alpha:{key}",
        client="alpha",
        spec=TaskSpec(key=key, argv=["/bin/true"]),
        pool="default",
        task_class="short",
        submitted_at=AT,
    )
    slot = Slot(item=item, attempt=1)
    event = finished_event(
        slot,
        "succeeded",
        executor="x",
        sensitive=False,
        at=AT,
        exit_code=0,
        reason="exit code 0",
        log_tail="",
        started_at=AT,
        finished_at=AT,
    )
    return cast(Msg, FakeMsg(wire, f"$JS.ACK.{key}")), slot, event


def _settler(wire: Wire) -> Settler:
    return Settler(cast(Publisher, FakePublisher(wire)), ACK_WAIT_S)


def _before(log: list[tuple[str, str]], first: tuple[str, str], then: tuple[str, str]) -> bool:
    return first in log and then in log and log.index(first) < log.index(then)


async def test_attempts_ending_together_share_a_batch_and_are_acked_after_their_pubacks() -> None:
    wire = Wire()
    settler = _settler(wire)
    attempts = [_attempt(wire, f"k{i}") for i in range(5)]
    acked = await asyncio.gather(*(settler.settle(m, s, e) for m, s, e in attempts))
    assert acked == [True] * 5
    assert wire.batches == [5]  # one publish for the five events
    assert [kind for kind, _ in wire.log].count("flush") == 1  # one round trip for the acks
    for msg, slot, event in attempts:
        assert slot.reported and slot.acked
        assert _before(wire.log, ("stored", event.event_id), ("ack", msg.reply))
        assert _before(wire.log, ("ack", msg.reply), ("flush", ""))


async def test_a_full_batch_goes_at_once_without_waiting_for_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settle, "BATCH_MAX", 3)
    monkeypatch.setattr(settle, "LINGER_S", 60.0)  # only a full batch can go
    wire = Wire()
    settler = _settler(wire)
    attempts = [_attempt(wire, f"k{i}") for i in range(3)]
    async with asyncio.timeout(5):
        assert await asyncio.gather(*(settler.settle(m, s, e) for m, s, e in attempts))
    assert wire.batches == [3]


async def test_an_event_the_batch_could_not_store_is_stored_alone_before_its_ack() -> None:
    wire = Wire()
    settler = _settler(wire)
    good, bad = _attempt(wire, "good"), _attempt(wire, "bad")
    wire.refuse.add(bad[2].event_id)
    assert await asyncio.gather(settler.settle(*good), settler.settle(*bad)) == [True, True]
    # The batch acked only the event it stored; the other was acked after its own report.
    assert ("ack", bad[0].reply) not in wire.log[: wire.log.index(("flush", ""))]
    assert _before(wire.log, ("stored", bad[2].event_id), ("ack", bad[0].reply))
    assert bad[1].reported and bad[1].acked


async def test_work_no_longer_ours_is_reported_but_never_acked() -> None:
    wire = Wire()
    settler = _settler(wire)
    msg, slot, event = _attempt(wire, "stale")
    slot.touched -= ACK_WAIT_S  # no progress answered for a whole ack wait
    assert await settler.settle(msg, slot, event) is False
    assert ("stored", event.event_id) in wire.log
    assert not [entry for entry in wire.log if entry[0] == "ack"]
    assert slot.reported and not slot.acked


async def test_an_unconfirmed_ack_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settle, "ACK_RETRY", settle.ACK_RETRY.__class__(base_s=0.01, cap_s=0.01))
    wire = Wire()
    wire.flush_failures = 1
    settler = _settler(wire)
    msg, slot, event = _attempt(wire, "k")
    assert await settler.settle(msg, slot, event)
    assert [kind for kind, _ in wire.log] == ["stored", "ack", "ack", "flush"]


async def test_a_cancelled_waiter_leaves_the_batch_to_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wire = Wire()
    settler = _settler(wire)
    msg, slot, event = _attempt(wire, "k")
    wire.pubacks.clear()
    waiter = asyncio.create_task(settler.settle(msg, slot, event))
    await asyncio.wait_for(wire.sent.wait(), 5)  # the batch is on its way
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slot.settling is not None and not slot.reported
    wire.pubacks.set()
    assert await asyncio.wait_for(asyncio.shield(slot.settling), 5) is True
    await settler.close()
    assert slot.reported and slot.acked


def test_log_files_make_each_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Path] = []
    real_mkdir = Path.mkdir

    def counting_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", counting_mkdir)
    files = LogFiles()
    hour = tmp_path / "2026010100"
    for i in range(3):
        with files.open(hour / f"{i}.log") as f:
            f.write(b"x")
    assert made == [hour]
    for p in hour.iterdir():  # removed behind its back: made again, nothing lost
        p.unlink()
    hour.rmdir()
    with files.open(hour / "again.log") as f:
        f.write(b"y")
    assert (hour / "again.log").read_bytes() == b"y"


async def test_a_task_that_prints_nothing_leaves_no_log_file(tmp_path: Path) -> None:
    files = LogFiles()
    limits = ProcessLimits()
    quiet = tmp_path / "hour" / "quiet.log"
    result = await run_process(
        TaskSpec(key="q", argv=["/bin/true"]),
        limits=limits,
        base_env=os.environ,
        log_path=quiet,
        open_log=files.open,
    )
    assert result.outcome == "succeeded" and not quiet.exists()
    talks = tmp_path / "hour" / "talks.log"
    result = await run_process(
        TaskSpec(key="t", shell="echo one; echo two >&2"),
        limits=limits,
        base_env=os.environ,
        log_path=talks,
        open_log=files.open,
    )
    assert result.outcome == "succeeded"
    assert talks.read_text() == "one\ntwo\n" and result.log_tail == "one\ntwo\n"


async def test_a_log_that_cannot_be_made_is_noted_in_the_tail(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    result = await run_process(
        TaskSpec(key="t", shell="echo out"),
        limits=ProcessLimits(),
        base_env=os.environ,
        log_path=blocked / "hour" / "t.log",
        open_log=LogFiles().open,
    )
    assert result.outcome == "succeeded"
    assert "cannot write log" in result.log_tail and "out" in result.log_tail


async def test_a_cancel_request_stops_only_the_runs_it_names() -> None:
    def slot(run: int, submitted_at: datetime = AT) -> Slot:
        item = WorkItem(
            task_id="alpha:k",
            client="alpha",
            spec=TaskSpec(key="k", argv=["/bin/true"]),
            pool="default",
            task_class="short",
            submitted_at=submitted_at,
            run=run,
        )
        return Slot(item=item, attempt=1)

    later = AT.replace(hour=5)
    running = {names.run_msg_id("alpha:k", r): slot(r, later if r == 9 else AT) for r in (7, 8, 9)}
    stop_runs(running, CancelRequest(task_id="alpha:k", run=8))
    assert [s.item.run for s in running.values() if s.cancel.is_set()] == [8]
    stop_runs(running, CancelRequest(task_id="alpha:k", at=AT.replace(hour=1)))
    assert [s.item.run for s in running.values() if s.cancel.is_set()] == [7, 8]
    stop_runs(running, CancelRequest(task_id="alpha:other", run=9))
    assert not running[names.run_msg_id("alpha:k", 9)].cancel.is_set()


async def test_a_slot_frees_when_its_process_ends_but_unreported_attempts_are_bounded() -> None:
    settings = ExecutorSettings(slots=2)
    agent = Executor(
        cast(Any, None),
        cast(Publisher, FakePublisher(Wire())),
        cast(Any, None),
        settings,
        Limits(),
        ExecutorMetrics(),
    )

    def attempt(key: str) -> Slot:
        _, slot, _ = _attempt(Wire(), key)
        agent.running[key] = slot
        agent._occupied += 1
        return slot

    first, second = attempt("a"), attempt("b")
    assert agent._free() == 0  # both processes run
    agent._release(first)
    agent._release(first)  # twice (its `finally`): counted once
    assert agent._free() == 1  # a's process ended: its report does not hold the slot
    agent._release(second)
    assert agent._free() == 2
    third = attempt("c")
    assert agent._free() == 1
    agent._release(third)
    # Three being reported, more than the executor's slots: JetStream is slow to take events,
    # and each one beyond takes a slot until it is stored.
    assert agent._free() == 1
    agent._release(attempt("d"))
    assert agent._free() == 0
    del agent.running["a"]  # a's ack is done
    assert agent._free() == 1
