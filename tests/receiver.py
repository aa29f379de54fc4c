"""A tiny HTTP/1.1 receiver for callback tests: a real server on 127.0.0.1, run by the test."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from tidegate.driver.callbacks.payload import Callback


@dataclass(frozen=True)
class Hit:
    at: float  # time.monotonic() at arrival
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int | None  # None: the receiver never answered
    peer: str = ""  # the sender's address and port: which connection it came on

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def callbacks(self) -> list[Callback]:
        data = json.loads(self.body)
        items = data if isinstance(data, list) else [data]
        return [msgspec.convert(i, Callback, strict=False) for i in items]


# Decides the answer to a request (path, body): a status, or None to never answer.
Responder = Callable[[str, bytes], Awaitable[int | None] | int | None]


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every request (keep-alive, Content-Length)."""

    respond: Responder = lambda path, body: 200
    hits: list[Hit] = field(default_factory=list)
    error_body: bytes = b"boom: receiver says no"  # the body of every non-2xx answer
    port: int = 0

    async def __aenter__(self) -> Receiver:
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Not task.cancel(): asyncio logs a cancelled connection handler as an error.
        self._server.close()
        self._stop.set()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self, path: str | None = None) -> list[Callback]:
        """Callbacks the receiver accepted (2xx), in arrival order."""
        return [cb for h in self.hits if h.ok and path in (None, h.path) for cb in h.callbacks()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                path = line.decode().split(" ")[1]
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                at = time.monotonic()
                status = self.respond(path, body)
                if not isinstance(status, int | None):
                    status = await status
                host, port = writer.get_extra_info("peername")[:2]
                peer = f"{host}:{port}"
                self.hits.append(Hit(at, path, headers, body, status, peer))
                if status is None:
                    await self._stop.wait()  # hang until the test ends
                    return
                text = b"ok" if 200 <= status < 300 else self.error_body
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(text)}\r\n\r\n".encode()
                    + text
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()


def refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
