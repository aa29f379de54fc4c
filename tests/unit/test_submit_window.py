"""The pipelined publisher's window, deadlines and per-message outcomes, against a scripted
stand-in for nats-py's connection (what reaches the "server" is parsed from the HPUB
commands the publisher writes, and each PubAck is handed back as nats-py's reader would)."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.aio.client
import nats.aio.subscription
import pytest

from tidegate.bus.publish import Outgoing, PubAck, Publisher, _answer
from tidegate.bus.submit import task_message, task_messages
from tidegate.errors import BufferFull, InvalidTask, SubmitError
from tidegate.wire import TaskSpec


@dataclass
class Sent:
    subject: str
    reply: str
    msg_id: str


@dataclass
class FakeMsg:
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


@dataclass
class FakeSub:
    _future: Any = None

    async def unsubscribe(self) -> None:
        pass


Answer = Callable[["FakeNats", Sent, int], "str | bytes | None"]


def parse(cmd: bytes) -> Sent:
    line, rest = cmd.split(b"\r\n", 1)
    op, subject, reply, _hlen, _total = line.decode().split(" ")
    assert op == "HPUB"
    header = rest.split(b"\r\n\r\n", 1)[0].decode()
    assert header.startswith("NATS/1.0\r\nNats-Msg-Id: ")
    return Sent(subject, reply, header.split(": ", 1)[1])


@dataclass
class FakeNats:
    """Answers each publish after `delay` seconds with what `answer` says: a JSON body, or
    None to drop it. `answer` gets the publish and how many times its id was sent so far."""

    answer: Answer
    delay: float = 0.0
    is_closed: bool = False
    is_draining_pubs: bool = False
    is_connected: bool = True
    max_payload: int = 1024 * 1024
    _max_pending_size: int = 2 * 1024 * 1024
    _pending: list[bytes] = field(default_factory=list)
    _pending_data_size: int = 0
    stats: dict[str, int] = field(default_factory=lambda: {"out_msgs": 0, "out_bytes": 0})
    sent: list[Sent] = field(default_factory=list)
    outstanding: int = 0
    most_outstanding: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        self._flush_queue: asyncio.Queue[object] = asyncio.Queue()
        self.sub = FakeSub()

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: object) -> FakeSub:
        assert subject == "_INBOX.test.*"
        return self.sub

    async def _flush_pending(self, force_flush: bool = False) -> None:
        cmds, self._pending, self._pending_data_size = self._pending, [], 0
        loop = asyncio.get_running_loop()
        for cmd in cmds:
            sent = parse(cmd)
            tries = sum(s.msg_id == sent.msg_id for s in self.sent) + 1
            self.sent.append(sent)
            body = self.answer(self, sent, tries)
            if body is None:
                continue
            self.outstanding += 1
            self.most_outstanding = max(self.most_outstanding, self.outstanding)
            data = body if isinstance(body, bytes) else body.encode()
            loop.call_later(self.delay, self._reply, FakeMsg(sent.reply, data))

    def _reply(self, msg: FakeMsg) -> None:
        self.outstanding -= 1
        self.sub._future.set_result(msg)

    def ack(self, duplicate: bool = False) -> str:
        self.seq += 1
        return json.dumps({"stream": "S", "seq": self.seq, "duplicate": duplicate})


def batch(n: int) -> list[Outgoing]:
    return [
        Outgoing(subject=f"tg.submit.c{i % 3}", payload=b"{}", msg_id=f"m{i}") for i in range(n)
    ]


def publisher(nc: FakeNats, **kw: float) -> Publisher:
    return Publisher(nc, **kw)  # type: ignore[arg-type]


def test_the_nats_py_internals_the_fast_path_relies_on_exist() -> None:
    nc = nats.aio.client.Client()
    for name in ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue"):
        assert hasattr(nc, name), name
    assert callable(nc._flush_pending)
    sub = nats.aio.subscription.Subscription(nc, 1, "x")
    assert hasattr(sub, "_future") and sub._future is None
    # The reader hands a reply straight to the subscription's future when it has one.
    assert "sub._future.set_result(msg)" in inspect.getsource(nc._process_msg)


async def test_all_acknowledged_in_order_with_the_window_never_exceeded() -> None:
    nc = FakeNats(lambda nc, sent, tries: nc.ack(), delay=0.001)
    results = await publisher(nc).publish_many(batch(2000), max_in_flight=64)
    assert all(isinstance(r, PubAck) for r in results)
    assert [r.seq for r in results if isinstance(r, PubAck)] == list(range(1, 2001))
    assert len(nc.sent) == 2000  # nothing resent
    assert 32 <= nc.most_outstanding <= 64


async def test_a_refusal_is_reported_for_that_message_only_and_not_resent() -> None:
    def answer(nc: FakeNats, sent: Sent, tries: int) -> str:
        if sent.msg_id == "m3":
            error = {"code": 503, "err_code": 10077, "description": "maximum messages per subject"}
            return json.dumps({"error": error})
        return nc.ack()

    nc = FakeNats(answer)
    results = await publisher(nc).publish_many(batch(10))
    assert isinstance(results[3], BufferFull) and "'c0'" in str(results[3])
    assert all(isinstance(r, PubAck) for i, r in enumerate(results) if i != 3)
    assert [s.msg_id for s in nc.sent].count("m3") == 1


async def test_a_lost_publish_is_resent_with_the_same_id() -> None:
    nc = FakeNats(lambda nc, sent, tries: None if sent.msg_id == "m5" and tries == 1 else nc.ack())
    results = await publisher(nc, timeout=0.05).publish_many(batch(10))
    assert all(isinstance(r, PubAck) for r in results)
    assert [s.msg_id for s in nc.sent].count("m5") == 2
    assert len({s.reply for s in nc.sent}) == len(nc.sent)  # a fresh reply subject per send


async def test_a_publish_never_acknowledged_fails_alone_after_its_retries() -> None:
    nc = FakeNats(lambda nc, sent, tries: None if sent.msg_id == "m7" else nc.ack())
    results = await publisher(nc, timeout=0.05, retries=2).publish_many(batch(20))
    assert isinstance(results[7], SubmitError) and "m7" in str(results[7])
    assert "after 3 tries" in str(results[7])
    assert sum(isinstance(r, PubAck) for r in results) == 19
    assert [s.msg_id for s in nc.sent].count("m7") == 3


async def test_a_late_puback_of_an_earlier_send_still_counts() -> None:
    late: list[FakeMsg] = []

    def answer(nc: FakeNats, sent: Sent, tries: int) -> str | None:
        if sent.msg_id != "m2":
            return nc.ack()
        if tries == 1:  # answered only after the resend went out
            late.append(FakeMsg(sent.reply, nc.ack().encode()))
            asyncio.get_running_loop().call_later(0.08, lambda: nc.sub._future.set_result(late[0]))
        return None  # the resend itself is never answered

    nc = FakeNats(answer)
    results = await publisher(nc, timeout=0.05, retries=3).publish_many(batch(4))
    assert all(isinstance(r, PubAck) for r in results)
    assert [s.msg_id for s in nc.sent].count("m2") == 2


async def test_single_publish_raises_what_the_batch_would_report() -> None:
    nc = FakeNats(lambda nc, sent, tries: json.dumps({"error": {"description": "nope"}}))
    pub = publisher(nc)
    try:
        await pub.publish(batch(1)[0])
    except SubmitError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("no error raised")


def test_answers_are_read_as_pubacks_duplicates_and_errors() -> None:
    ack = _answer(b'{"stream":"S","seq":4,"duplicate":true}', None, "tg.submit.a")
    assert ack == PubAck(stream="S", seq=4, duplicate=True)
    assert isinstance(_answer(b"", "503", "tg.submit.a"), SubmitError)
    assert isinstance(_answer(b"not json", None, "tg.submit.a"), SubmitError)
    full = _answer(b'{"error":{"err_code":10077,"description":"x"}}', None, "tg.ready.bob.p")
    assert isinstance(full, BufferFull) and "'bob'" in str(full)


def test_a_batch_is_validated_as_one_task_at_a_time_would_be() -> None:
    good = [TaskSpec(key=f"k{i}", argv=["true"]) for i in range(3)]
    outs = task_messages("alpha", good, max_task_bytes=1024)
    assert [o.msg_id for o in outs] == ["alpha:k0", "alpha:k1", "alpha:k2"]
    assert outs == [task_message("alpha", s, max_task_bytes=1024) for s in good]
    bad = TaskSpec(key="has space", argv=["true"])
    with pytest.raises(InvalidTask) as one:
        task_message("alpha", bad, max_task_bytes=1024)
    with pytest.raises(InvalidTask) as many:
        task_messages("alpha", [*good, bad], max_task_bytes=1024)
    assert str(many.value) == str(one.value)
    with pytest.raises(InvalidTask, match="the limit is 10"):
        task_messages("alpha", good, max_task_bytes=10)
