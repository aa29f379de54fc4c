"""A cancel request: the value of a task's key in the cancel bucket."""

from __future__ import annotations

from datetime import datetime

import msgspec
from msgspec import Struct


class CancelRequest(Struct, frozen=True, kw_only=True):
    """The value of a task's key in the cancel bucket.

    `run` names the one run to cancel, so that a request for an old run never stops a later
    one. Without it the request cancels the runs submitted up to `at` (its moment), or, when
    `at` is unknown too (a bare task id, as components before runs wrote), every run.
    """

    task_id: str
    run: int | None = None
    at: datetime | None = None

    def applies_to(self, run: int, submitted_at: datetime) -> bool:
        if self.run is not None:
            return self.run == run
        return self.at is None or submitted_at <= self.at


_cancel_decoder = msgspec.json.Decoder(CancelRequest)


def decode_cancel(value: bytes) -> CancelRequest:
    """A cancel request; a value that is not JSON is a bare task id (every run)."""
    if value.startswith(b"{"):  # task ids start with a client name, never with `{`
        return _cancel_decoder.decode(value)
    return CancelRequest(task_id=value.decode(errors="replace"))
