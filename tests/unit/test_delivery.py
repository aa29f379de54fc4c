"""`bus.delivery` reads the same numbers as nats-py's full parse of a delivery's reply."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from tidegate.bus import delivery

V1 = "$JS.ACK.TASKS.route-bench001.3.12345.6789.1764790000123456789.99"
# The longer form: a domain and an account hash, then the same fields and a random token.
V2 = "$JS.ACK.hub.ACCHASH.TASKS.route-bench001.2.777.66.1764790000987654321.5.r4nd0m"


@pytest.mark.parametrize("reply", [V1, V2])
def test_reads_what_nats_py_reads(reply: str) -> None:
    msg = Msg(None, subject="tg.submit.bench001", reply=reply, data=b"")  # type: ignore[arg-type]
    full = Msg.Metadata._from_reply(reply)
    assert delivery.delivered(msg) == full.num_delivered
    assert delivery.stream_seq(msg) == full.sequence.stream
    assert delivery.stored_at(msg) == full.timestamp


@pytest.mark.parametrize("reply", ["", "_INBOX.abc.1", "$JS.ACK.TASKS"])
def test_not_a_delivery_raises_as_nats_py_does(reply: str) -> None:
    msg = Msg(None, subject="x", reply=reply, data=b"")  # type: ignore[arg-type]
    with pytest.raises(NotJSMessageError):
        delivery.delivered(msg)
