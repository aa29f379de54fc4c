"""Cancel requests: a key per task in the cancel bucket, which every executor watches."""

from __future__ import annotations

from nats.js.kv import KeyValue

from tidegate import names


async def request_cancel(kv: KeyValue, task_id: str) -> None:
    """The executor running `task_id` kills its process group; a queued task is cancelled
    when an executor picks it up (the bucket keeps requests for a week)."""
    await kv.put(names.kv_key(task_id), task_id.encode())
