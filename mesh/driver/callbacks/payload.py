"""The callback a client receives: one JSON object per state change (or an array of them).

Its field names are part of the outside contract (DESIGN.md, "The outside contract"): extend
it, never rename. The struct itself is the wire's (`tidegate.wire.Callback`, which the SDK
decodes too); it is re-exported here so the driver's imports stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from tidegate.store.flatten import FlatEvent, flatten
from tidegate.wire import AnyEvent, Callback, Finished, decode_callback

__all__ = [
    "Callback",
    "callback_from_event",
    "callback_from_flat",
    "decode_one",
    "encode_batch",
    "encode_one",
]


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
        run=flat.run,
    )


_encoder = msgspec.json.Encoder()


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
    return decode_callback(data)
