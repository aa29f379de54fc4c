"""The callback a client receives: one JSON object per state change (or an array of them).

Its field names are part of the outside contract (DESIGN.md, "The outside contract"): extend
it, never rename. Every field is always present, null when the state does not carry it, so a
client can decode every callback with one schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from tidegate.wire import AnyEvent, Dispatched, Finished, Running


class Callback(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str  # stable across redeliveries: a client drops duplicates by it
    task_id: str
    client: str
    key: str
    state: str
    attempt: int
    at: datetime
    executor: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


def callback_from_event(event: AnyEvent) -> Callback:
    executor: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    log_tail: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    if isinstance(event, Finished):
        executor, exit_code = event.executor, event.exit_code
        reason, log_tail = event.reason, event.log_tail
        started_at, finished_at = event.started_at, event.finished_at
    elif isinstance(event, Running):
        executor, started_at = event.executor, event.started_at
    elif isinstance(event, Dispatched):
        executor = event.executor
    return Callback(
        event_id=event.event_id,
        task_id=event.task_id,
        client=event.client,
        key=event.key,
        state=event.state,
        attempt=event.attempt,
        at=event.at,
        executor=executor,
        exit_code=exit_code,
        reason=reason,
        log_tail=log_tail,
        started_at=started_at,
        finished_at=finished_at,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Callback)


def encode_batch(callbacks: Sequence[Callback], *, batch: bool) -> bytes:
    """The request body: a JSON array for a client that takes batches, else one object."""
    if batch:
        return _encoder.encode(list(callbacks))
    if len(callbacks) != 1:
        raise ValueError(
            f"a client without batches takes one callback per request, not {len(callbacks)}"
        )
    return _encoder.encode(callbacks[0])


def encode_one(callback: Callback) -> bytes:
    return _encoder.encode(callback)


def decode_one(data: bytes | str) -> Callback:
    return _decoder.decode(data)
