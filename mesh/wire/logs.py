"""Reading a task attempt's log file from the executor that ran it: request and reply."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

# Bytes of log in one reply: with JSON escaping (a control byte takes six) a reply stays
# under NATS's default 1 MiB payload, and a console page stays light.
LOG_CHUNK_MAX: Final = 256 * 1024


class LogRequest(Struct, frozen=True, kw_only=True):
    """A request for part of one attempt's log file, sent to the executor that ran it
    (`names.executor_log_subject`); the reply is a `LogChunk`."""

    task_id: Annotated[str, Meta(min_length=1, max_length=512)]
    attempt: Annotated[int, Meta(ge=1)]
    offset: Annotated[int, Meta(ge=0)] = 0
    limit: Annotated[int, Meta(ge=1, le=LOG_CHUNK_MAX)] = LOG_CHUNK_MAX
    # The attempt's start names the hour directory of its file; without it the executor
    # searches every hour it keeps, newest first (a task id resubmitted after the duplicate
    # window starts again at attempt 1, so only the start tells such runs apart).
    started_at: datetime | None = None


class LogChunk(Struct, frozen=True, kw_only=True):
    """An executor's answer to a `LogRequest`: `found` false with the `reason`, or bytes
    `offset` to `next_offset` of the file (cut after a line end when the part holds one)."""

    found: bool
    data: str = ""  # UTF-8; undecodable bytes are U+FFFD
    offset: int = 0
    next_offset: int = 0
    size: int = 0  # the file's size now: a running attempt's log still grows
    truncated_at_max: bool = False  # the output went past `log_max_bytes`; the rest is gone
    reason: str | None = None


_log_request_decoder = msgspec.json.Decoder(LogRequest)
_log_chunk_decoder = msgspec.json.Decoder(LogChunk)


def decode_log_request(data: bytes) -> LogRequest:
    return _log_request_decoder.decode(data)


def decode_log_chunk(data: bytes) -> LogChunk:
    return _log_chunk_decoder.decode(data)
