"""Serves this executor's task log files to the console, on the executor's own subject.

Only a tail of each attempt's output reaches the database; the whole of it (up to
`log_max_bytes`) stays in this host's task-log directory until retention removes its hour,
and no other host can read it. So the executor answers `LogRequest`s itself, in bounded
parts: whatever a request asks, a reply holds at most `LOG_CHUNK_MAX` bytes of log and fits
in one NATS message, and a bad request gets a reason, never an exception in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tidegate import names
from tidegate.errors import BadInput
from tidegate.executor import tasklogs
from tidegate.wire import LogChunk, LogRequest, decode_log_request, encode

log = logging.getLogger(__name__)

READERS: Final = 4  # files read at once; a slow disk must not take every thread of the pool
MAX_WAITING: Final = 64  # requests beyond this are answered "busy" at once, not queued
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024  # NATS's default, when the server did not say
# What the runner writes when an attempt's output passes `log_max_bytes` (executor/process.py).
TRUNCATION_MARK: Final = b"[tidegate: log truncated at "
MARK_WINDOW: Final = 128  # the file's last bytes, where that line is when it was written


class BadLogRequest(BadInput):
    """A log request this executor cannot use; the message is the reason sent back."""


@dataclass(frozen=True)
class Part:
    data: bytes
    size: int  # the file's size after the read
    truncated: bool


def parse_request(data: bytes) -> LogRequest:
    try:
        req = decode_log_request(data)
    except msgspec.ValidationError as exc:
        raise BadLogRequest(f"bad log request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadLogRequest(f"bad log request: not a JSON LogRequest ({exc})") from None
    # Hour arithmetic on a start near datetime's limits would overflow.
    if req.started_at is not None and not 2000 <= req.started_at.year <= 9000:
        raise BadLogRequest(f"bad log request: started_at {req.started_at} is not a real start")
    return req


def whole_lines(data: bytes) -> bytes:
    """`data` up to its last line end; without one, up to its last whole UTF-8 character.

    A part that ends mid-line (or mid-character) would show the line broken in two where
    the next part is appended; never empty, so a reader paging by `next_offset` moves on.
    """
    end = data.rfind(b"\n") + 1
    if end:
        return data[:end]
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or the lead byte of the last character
            needs = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data[: len(data) - back] if needs > back and back < len(data) else data
    return data


def read_part(path: Path, offset: int, limit: int) -> Part:
    """Up to `limit` bytes from `offset`, cut by `whole_lines` unless they end the file.

    Blocking: call it in a thread. The size is taken after the read: a running attempt's
    file only grows, so the part never reaches past it.
    """
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(limit)
        size = os.fstat(f.fileno()).st_size
        if data and offset + len(data) < size:
            data = whole_lines(data)
        f.seek(max(0, size - MARK_WINDOW))
        truncated = TRUNCATION_MARK in f.read()
    return Part(data=data, size=size, truncated=truncated)


class LogServer:
    """Answers `LogRequest`s on `names.executor_log_subject(executor_id)` from `root`."""

    def __init__(self, nc: NATS, executor_id: str, root: Path, *, keep_hours: float) -> None:
        self._nc = nc
        self._id = executor_id
        self._root = root
        self._keep = timedelta(hours=keep_hours)
        self._keep_hours = keep_hours
        self._readers = asyncio.Semaphore(READERS)
        self._answering: set[asyncio.Task[None]] = set()

    @property
    def subject(self) -> str:
        return names.executor_log_subject(self._id)

    async def run(self) -> None:
        """Answer log requests until cancelled (a supervised loop)."""
        sub = await self._nc.subscribe(self.subject)
        try:
            async for msg in sub.messages:
                if len(self._answering) >= MAX_WAITING:
                    busy = f"busy: {self._id} is answering {MAX_WAITING} log requests; try again"
                    await self._respond(msg, LogChunk(found=False, reason=busy))
                    continue
                task = asyncio.create_task(self._answer(msg), name="task-log-request")
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
        finally:
            for task in list(self._answering):
                task.cancel()
            with contextlib.suppress(Exception):  # the connection may already be closing
                await sub.unsubscribe()

    async def _answer(self, msg: Msg) -> None:
        try:
            chunk = await self.answer(msg.data)
        except Exception as exc:
            log.exception("executor %s: answering a log request failed", self._id)
            chunk = LogChunk(found=False, reason=f"{self._id} could not read the log: {exc}")
        await self._respond(msg, chunk)

    async def _respond(self, msg: Msg, chunk: LogChunk) -> None:
        if not msg.reply:
            return  # a publish, not a request: nobody waits for an answer
        try:
            await msg.respond(encode(chunk))
        except Exception as exc:  # NATS away: the asker times out and says so
            log.warning("executor %s: could not answer a log request: %s", self._id, exc)

    async def answer(self, data: bytes) -> LogChunk:
        """The reply to one request's bytes; every outcome is a `LogChunk`."""
        try:
            req = parse_request(data)
        except BadLogRequest as exc:
            return LogChunk(found=False, reason=str(exc))
        async with self._readers:
            path = await asyncio.to_thread(
                tasklogs.find_log, self._root, req.task_id, req.attempt, req.started_at
            )
            if path is None:
                return LogChunk(found=False, reason=self._missing(req))
            max_payload = self._nc.max_payload or DEFAULT_MAX_PAYLOAD
            limit = req.limit
            while True:
                try:
                    part = await asyncio.to_thread(read_part, path, req.offset, limit)
                except FileNotFoundError:  # its hour was pruned between finding and reading
                    return LogChunk(found=False, reason=self._missing(req))
                except OSError as exc:
                    return LogChunk(found=False, reason=f"{self._id} cannot read the log: {exc}")
                chunk = self._chunk(req, part)
                # Escaped control bytes take six bytes of JSON each: halve until it fits.
                if len(encode(chunk)) <= max_payload or limit == 1:
                    return chunk
                limit //= 2

    def _chunk(self, req: LogRequest, part: Part) -> LogChunk:
        reason = None
        if req.offset > part.size:
            reason = f"offset {req.offset} is past the end of the log ({part.size} bytes)"
        return LogChunk(
            found=True,
            data=part.data.decode("utf-8", errors="replace"),
            offset=req.offset,
            next_offset=req.offset + len(part.data),
            size=part.size,
            truncated_at_max=part.truncated,
            reason=reason,
        )

    def _missing(self, req: LogRequest) -> str:
        what = f"attempt {req.attempt} of {req.task_id}"
        if req.started_at is not None and tasklogs.pruned(
            req.started_at, self._keep, datetime.now(UTC)
        ):
            return (
                f"pruned after {self._keep_hours:g} h: {self._id} no longer keeps the log "
                f"of {what} (started {tasklogs.utc(req.started_at):%Y-%m-%d %H:%M} UTC)"
            )
        return (
            f"not on this executor: {self._id} has no log of {what} (it ran elsewhere, "
            f"wrote no log, or is older than the {self._keep_hours:g} h logs are kept)"
        )
