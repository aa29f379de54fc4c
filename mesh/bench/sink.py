"""The flood's callback receiver: an HTTP/1.1 server on a free loopback port, run inside the
benchmark, that answers every request after a configurable latency (a client's endpoint that
takes its time) and records what it was sent.

It keeps figures, not payloads: per event id how often it came (duplicates), per task the
order of (attempt, state rank) it saw, each callback's latency (arrival minus the event's
`at`), and when each task's terminal callback arrived (to compare with the database row).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Final

import msgspec

from tidegate.driver.callbacks.payload import Callback
from tidegate.wire import STATE_RANK, TERMINAL_STATES

_DECODER: Final = msgspec.json.Decoder(Callback | list[Callback])
_OK: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_BAD: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


class CallbackSink:
    """Start with `async with`; `url(client)` is that client's callback URL."""

    def __init__(self, latency_ms: float = 0.0, sensitive: frozenset[str] = frozenset()) -> None:
        self.latency_s = latency_ms / 1000.0
        self.sensitive = sensitive
        self.port = 0
        self.requests = 0
        self.received = 0
        self.bad_requests = 0
        self.ids: Counter[str] = Counter()
        self.states: Counter[str] = Counter()  # distinct events received, per state
        self.out_of_order = 0  # callbacks of a task that came after a newer state of it
        self.latest: dict[str, tuple[int, int]] = {}  # task id → newest (attempt, rank) seen
        self.latency_ms: dict[bool, list[float]] = {True: [], False: []}  # by sensitive
        self.terminal_at: dict[str, float] = {}  # task id → wall time of its terminal callback
        self.arrivals: list[float] = []  # monotonic arrival time of every callback
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> CallbackSink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing the connections ends their handlers; a cancelled handler is logged as an error.
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        _, pending = (
            await asyncio.wait(self._conns, timeout=self.latency_s + 2) if self._conns else ((), ())
        )
        for task in pending:
            task.cancel()

    def url(self, client: str) -> str:
        return f"http://127.0.0.1:{self.port}/{client}"

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.ids.values() if n > 1)

    def record(self, cb: Callback, wall: float, mono: float) -> None:
        self.received += 1
        self.ids[cb.event_id] += 1
        if self.ids[cb.event_id] == 1:
            self.states[cb.state] += 1
        rank = (cb.attempt, STATE_RANK.get(cb.state, 0))
        if rank < self.latest.get(cb.task_id, (0, -1)):
            self.out_of_order += 1
        else:
            self.latest[cb.task_id] = rank
        self.latency_ms[cb.client in self.sensitive].append((wall - cb.at.timestamp()) * 1000)
        if cb.state in TERMINAL_STATES:
            self.terminal_at.setdefault(cb.task_id, wall)
        self.arrivals.append(mono)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        try:
            while await reader.readline():
                length = 0
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                self.requests += 1
                try:
                    got = _DECODER.decode(body)
                except msgspec.DecodeError:
                    self.bad_requests += 1
                    writer.write(_BAD)
                else:
                    wall, mono = time.time(), time.monotonic()
                    for cb in got if isinstance(got, list) else [got]:
                        self.record(cb, wall, mono)
                    writer.write(_OK)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            # The run is over (or interrupted): a handler that lets the cancellation out is
            # logged by asyncio's stream callback as an error, once per open connection.
            return
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
