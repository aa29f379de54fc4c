"""`ack_buffered` acks as `msg.ack()` does: the same command, the same errors."""

from __future__ import annotations

import asyncio

import nats.aio.client
import pytest
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError, NotJSMessageError

from tidegate.bus.publish import ack_buffered

REPLY = "$JS.ACK.EVENTS.projector.1.42.42.1764790000123456789.0"


def client() -> nats.aio.client.Client:
    """Not connected: commands stay in its buffer (the reconnect buffer), to be read."""
    nc = nats.aio.client.Client()
    nc._max_pending_size = 1 << 20
    return nc


def delivery(nc: nats.aio.client.Client, reply: str = REPLY) -> Msg:
    return Msg(nc, subject="tg.event.c1", reply=reply, data=b"{}")


async def test_writes_what_msg_ack_writes_and_marks_it_acked() -> None:
    ours, theirs = client(), client()
    mine = [delivery(ours), delivery(ours, REPLY.replace(".42.42.", ".43.43."))]
    await ack_buffered(mine)
    await delivery(theirs).ack()
    # The same command (nats-py leaves an empty reply field: one space more).
    expected = theirs._pending[0].split()
    assert [cmd.split() for cmd in ours._pending] == [
        expected,
        [part.replace(b".42.42.", b".43.43.") for part in expected],
    ]
    assert all(cmd.endswith(b"\r\n\r\n") for cmd in ours._pending)
    assert all(m._ackd for m in mine)


async def test_refuses_what_msg_ack_refuses() -> None:
    nc = client()
    acked = delivery(nc)
    await ack_buffered([acked])
    with pytest.raises(MsgAlreadyAckdError):
        await ack_buffered([acked])
    with pytest.raises(NotJSMessageError):
        await ack_buffered([delivery(nc, reply="")])
    assert len(nc._pending) == 1


async def test_the_acks_before_a_refused_one_still_go_out() -> None:
    nc = client()
    nc._flush_queue = asyncio.Queue()  # as when connected: a flush kicks the flusher
    flushed: list[list[bytes]] = []

    async def flush_pending(force_flush: bool = False) -> None:
        flushed.append(list(nc._pending))

    nc._flush_pending = flush_pending  # type: ignore[method-assign]
    acked = delivery(nc, REPLY.replace(".42.42.", ".43.43."))
    acked._ackd = True
    with pytest.raises(MsgAlreadyAckdError):
        await ack_buffered([delivery(nc), acked])
    assert len(flushed) == 1 and [c.split()[1] for c in flushed[0]] == [REPLY.encode()]
