"""`round_trip`: the server has processed what this connection sent before it returns.

nats-py 2.16's own `flush()` writes its PING ahead of commands still queued for the client's
flusher task, so a subscription made just before it could reach the server after the PONG
(seen in CI: a publish from another connection went past a subscription "flushed" before it).
The order of the bytes on the socket shows it without waiting for a lucky interleaving.
"""

from __future__ import annotations

from collections.abc import Iterable

import nats
from nats.aio.client import Client as NATS

from tidegate.bus.natsconn import round_trip


def _record_writes(nc: NATS) -> list[bytes]:
    """Every command, in the order the client hands it to the socket."""
    sent: list[bytes] = []
    transport = nc._transport
    assert transport is not None
    write, writelines = transport.write, transport.writelines

    def on_write(data: bytes) -> None:
        sent.append(bytes(data))
        write(data)

    def on_writelines(lines: Iterable[bytes]) -> None:
        lines = list(lines)
        sent.extend(bytes(line) for line in lines)
        writelines(lines)

    transport.write = on_write  # type: ignore[method-assign]
    transport.writelines = on_writelines  # type: ignore[method-assign]
    return sent


def _index(sent: list[bytes], prefix: bytes) -> int:
    return next(i for i, data in enumerate(sent) if data.startswith(prefix))


async def test_round_trip_pings_after_the_subscriptions_and_acks_before_it(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    other = await nats.connect(nats_url)
    try:
        sent = _record_writes(nc)
        sub = await nc.subscribe("rt.a")
        await nc.subscribe("rt.b")
        await nc.publish("rt.ack", b"+ACK")
        await round_trip(nc, 5)
        ping = _index(sent, b"PING")
        assert _index(sent, b"SUB rt.a") < ping
        assert _index(sent, b"SUB rt.b") < ping
        assert _index(sent, b"PUB rt.ack") < ping
        # What the server has therefore seen: a publish from elsewhere finds the subscriber.
        await other.publish("rt.a", b"hello")
        await round_trip(other, 5)
        assert (await sub.next_msg(timeout=5)).data == b"hello"
    finally:
        await nc.close()
        await other.close()
