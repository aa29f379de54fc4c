"""The callback a client receives: one JSON object per state change (or an array of them).

Its field names are part of the outside contract (DESIGN.md, "The outside contract"): extend
it, never rename. Every field is always present, null when the state does not carry it, so a
client can decode every callback with one schema. It lives in the wire, not in the driver,
because both sides need it: the driver builds and sends it, the SDK decodes it.
"""

from __future__ import annotations

from datetime import datetime

import msgspec


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
    # The run's id: the stream sequence of the submission that started it; later runs of the
    # task id have larger ids (0: a run from before runs were numbered). Last: added later.
    run: int = 0


_one = msgspec.json.Decoder(Callback)
# A client with `callback_batch_max` above 1 gets a JSON array; any other, one object.
_one_or_many = msgspec.json.Decoder(Callback | list[Callback])


def decode_callback(data: bytes | str) -> Callback:
    """One callback object; raises `msgspec.DecodeError` (a ValueError) for anything else."""
    return _one.decode(data)


def decode_callbacks(data: bytes | str) -> list[Callback]:
    """A callback request's body, one object or an array of them, as a list in order."""
    got = _one_or_many.decode(data)
    return got if isinstance(got, list) else [got]
