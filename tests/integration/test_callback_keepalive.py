"""The callback sender keeps its HTTP connections alive and reuses them: a connection per
request in flight, never one per request, also with 20 clients x 16 requests in flight (where
one shared httpcore pool reconnected for most requests). Every connection still goes through
the address policy, and the before-write check still runs on a reused connection."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from harness import LOOPBACK, wait_for
from nats.aio.client import Client as NATS
from receiver import Receiver
from test_callbacks import make_callbacks

from tidegate.driver.callbacks import transport
from tidegate.driver.callbacks.transport import Transports
from tidegate.errors import TidegateError
from tidegate.urlpolicy import CheckedBackend
from tidegate.wire import ClientRecord


class CountingReceiver(Receiver):
    """The tests' receiver, counting the connections it accepted and those that ended."""

    accepted = 0
    ended = 0

    async def __aenter__(self) -> CountingReceiver:
        await super().__aenter__()
        # A listen backlog for 320 connections at once: asyncio's default (100) overflows,
        # the kernel answers with SYN cookies, and a few connections are reset.
        self._server.close()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await super()._serve(reader, writer)
        finally:
            self.ended += 1


def client(rx: Receiver, name: str) -> ClientRecord:
    return ClientRecord(name=name, callback_url=rx.url(f"/{name}"), callback_secret="s")


async def test_one_sender_at_a_time_uses_one_connection() -> None:
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        async with CountingReceiver() as rx:
            c = client(rx, "c1")
            for i in range(50):
                await t.send(c, make_callbacks("c1", 1, start=i))
            assert len(rx.delivered()) == 50
            assert rx.accepted == 1
    finally:
        await t.close()


async def test_connections_are_reused_across_many_clients_and_requests_in_flight() -> None:
    """The flood's shape: 20 clients x 16 requests in flight, 10 rounds each. At most one
    connection per request in flight is opened, whatever the number of requests."""
    clients, in_flight, rounds = 20, 16, 10
    t = Transports(NATS(), timeout_s=10.0, allowed_nets=LOOPBACK)
    numbers = itertools.count()
    try:
        async with CountingReceiver() as rx:

            async def lane(c: ClientRecord) -> None:
                for _ in range(rounds):
                    await t.send(c, make_callbacks(c.name, 1, start=next(numbers)))

            records = [client(rx, f"c{i}") for i in range(clients)]
            await asyncio.gather(*(lane(c) for c in records for _ in range(in_flight)))
            assert len(rx.delivered()) == clients * in_flight * rounds
            assert rx.accepted <= clients * in_flight, (
                f"{rx.accepted} connections for {clients * in_flight} requests in flight"
            )
    finally:
        await t.close()


async def test_every_connection_goes_through_the_address_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = 0
    connect = CheckedBackend.connect_tcp

    async def counting(self: CheckedBackend, *args: Any, **kw: Any) -> Any:
        nonlocal opened
        opened += 1
        return await connect(self, *args, **kw)

    monkeypatch.setattr(CheckedBackend, "connect_tcp", counting)
    t = Transports(NATS(), timeout_s=5.0, allowed_nets=LOOPBACK)
    try:
        async with CountingReceiver() as rx:
            records = [client(rx, f"c{i}") for i in range(3)]
            await asyncio.gather(
                *(t.send(c, make_callbacks(c.name, 1, start=i)) for i, c in enumerate(records * 4))
            )
            assert len(rx.delivered()) == 12
            assert opened == rx.accepted > 0
    finally:
        await t.close()


class _Stop(TidegateError):
    pass


async def test_the_check_at_the_socket_write_also_runs_on_a_reused_connection() -> None:
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        async with CountingReceiver() as rx:
            c = client(rx, "c1")
            await t.send(c, make_callbacks("c1", 1), before_each=lambda: None)
            calls = 0

            def lease_check() -> None:
                nonlocal calls
                calls += 1
                if calls > 1:  # passed before the request, gone by the time of the write
                    raise _Stop("lease lost")

            with pytest.raises(_Stop):
                await t.send(c, make_callbacks("c1", 1, start=1), before_each=lease_check)
            assert calls >= 2
            assert len(rx.hits) == 1, "the stopped request reached the receiver"
            assert rx.accepted == 1, "the first connection was not kept for the second request"
    finally:
        await t.close()


async def test_idle_connections_are_closed_after_the_keepalive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "_KEEPALIVE_S", 0.2)
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        async with CountingReceiver() as rx:
            await t.send(client(rx, "quiet"), make_callbacks("quiet", 1))
            assert rx.ended == 0
            # Idle time is what is tested here: the quiet client's connection must outlive
            # the keep-alive before another client's request sweeps it.
            await asyncio.sleep(0.3)
            await t.send(client(rx, "busy"), make_callbacks("busy", 1))

            async def closed() -> bool:
                return rx.ended == 1

            await wait_for(closed, timeout=5, what="the idle connection closed")
            assert rx.accepted == 2
    finally:
        await t.close()


async def test_close_ends_every_connection() -> None:
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    async with CountingReceiver() as rx:
        records = [client(rx, f"c{i}") for i in range(3)]
        await asyncio.gather(*(t.send(c, make_callbacks(c.name, 1)) for c in records))
        await t.close()

        async def all_closed() -> bool:
            return rx.ended == rx.accepted == 3

        await wait_for(all_closed, timeout=5, what="every connection closed")
