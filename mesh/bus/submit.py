"""A task as the bus carries it: what the SDK, `tidegate submit` and the console's HTTP submit
endpoint all publish, so that each applies the same rules and the same dedup id.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tidegate import names
from tidegate.bus.publish import Outgoing
from tidegate.errors import InvalidTask, UnknownClient
from tidegate.wire import TaskSpec, decode_spec, encode


def task_message(client: str, spec: TaskSpec, *, max_task_bytes: int) -> Outgoing:
    """Validate and encode one task of `client`; raises `InvalidTask` with the reason."""
    payload = encode(spec)
    # A round trip through the decoder applies the field constraints (key and pool
    # patterns, bounds) that constructing a struct in code does not check.
    decode_spec(payload)
    if len(payload) > max_task_bytes:
        raise InvalidTask(
            f"task {spec.key!r} is {len(payload)} bytes; the limit is {max_task_bytes}"
        )
    return Outgoing(
        subject=names.submit_subject(client),
        payload=payload,
        msg_id=names.msg_id(client, spec.key),
    )


async def check_registered(js: JetStreamContext, client: str) -> None:
    """Refuse a client the drivers do not know (their mirror of the clients table): its task
    would only be rejected later."""
    try:
        kv = await js.key_value(names.CLIENTS_BUCKET)
        entry = await kv.get(client)
    except (BucketNotFoundError, KeyNotFoundError):
        entry = None
    if entry is None or entry.value is None:
        raise UnknownClient(
            f"no client {client!r} is registered: add it with `tidegate client add {client}`"
        )
