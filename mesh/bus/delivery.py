"""The numbers hot paths read off a JetStream delivery, without nats-py's full parse.

`msg.metadata` builds a `Metadata` with a `datetime` for every message (2.7 µs here), and a
flood reads one or two numbers of it per message at each stage (route, projector, notifier,
executor). A delivery's reply subject is
`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<stored ns>.<pending>`;
the longer form (with a domain and an account hash) and anything else go to nats-py's own
parse, which also raises its `NotJSMessageError` for a message that is not a delivery.
"""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg

_TOKENS = 9
_DELIVERED, _STREAM_SEQ, _STORED_NS = 4, 5, 7


def _tokens(msg: Msg) -> list[str] | None:
    reply = msg.reply
    if not reply:
        return None
    tokens = reply.split(".")
    if len(tokens) == _TOKENS and tokens[0] == "$JS" and tokens[1] == "ACK":
        return tokens
    return None


def delivered(msg: Msg) -> int:
    """How many times the server has delivered this message (1 the first time)."""
    tokens = _tokens(msg)
    return int(tokens[_DELIVERED]) if tokens else msg.metadata.num_delivered


def stream_seq(msg: Msg) -> int:
    tokens = _tokens(msg)
    return int(tokens[_STREAM_SEQ]) if tokens else msg.metadata.sequence.stream


def stored_at(msg: Msg) -> datetime | None:
    """When the stream stored the message (None only if nats-py's parse has no time)."""
    tokens = _tokens(msg)
    if tokens:
        return datetime.fromtimestamp(int(tokens[_STORED_NS]) / 1e9, UTC)
    return msg.metadata.timestamp
