"""The callback a client receives: one JSON object per state change (or an array of them).

Its field names are part of the outside contract (DESIGN.md, "The outside contract"): extend
it, never rename. Every field is always present, null when the state does not carry it, so a
client can decode every callback with one schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from tidegate.store.flatten import FlatEvent, flatten
from tidegate.wire import AnyEvent, Finished


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


def callback_from_event(event: AnyEvent | Finished) -> Callback:
    return callback_from_flat(flatten(event))


def callback_from_flat(flat: FlatEvent) -> Callback:
    return Callback(
        event_id=flat.event_id,
        task_id=flat.task_id,
        client=flat.client,
        key=flat.key,
        state=flat.state,
        attempt=flat.attempt,
        at=flat.at,
        executor=flat.executor,
        exit_code=flat.exit_code,
        reason=flat.reason,
        log_tail=flat.log_tail,
        started_at=flat.started_at,
        finished_at=flat.finished_at,
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
