"""Cancel requests: a key per task in the cancel bucket, which every executor watches."""

from __future__ import annotations

from nats.js.kv import KeyValue

from tidegate import names
from tidegate.wire import CancelRequest, encode, now


async def request_cancel(kv: KeyValue, task_id: str, run: int | None = None) -> None:
    """The executor running that run of `task_id` kills its process group; a queued one is
    cancelled when an executor picks it up (the bucket keeps requests for a week).

    Name the `run` (the latest one known): a request stays a week, and one that names no run
    cancels every run submitted until now, but never a later one.
    """
    request = CancelRequest(task_id=task_id, run=run, at=None if run is not None else now())
    await kv.put(names.kv_key(task_id), encode(request))
