"""Tidegate: an offline task execution engine. This package root is the client SDK.

    from tidegate import TaskSpec, TidegateClient

    async with await TidegateClient.connect("nats://127.0.0.1:4222", "billing") as tg:
        receipt = await tg.submit(TaskSpec(key="wf-1.node-3", argv=["/usr/bin/env", "true"]))

`pip install tidegate` installs this SDK alone; the engine's parts come with the extras
`server` (driver, executor), `console`, `embedded` (`tidegate up`, `tidegate bench`) and `all`.
"""

from tidegate.client import Receipt, TidegateClient
from tidegate.errors import BufferFull, InvalidTask, SubmitError, TidegateError, UnknownClient
from tidegate.wire import TaskSpec

__all__ = [
    "BufferFull",
    "InvalidTask",
    "Receipt",
    "SubmitError",
    "TaskSpec",
    "TidegateClient",
    "TidegateError",
    "UnknownClient",
]
