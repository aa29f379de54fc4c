"""The client registry as one operation: PostgreSQL first (the source of truth), then the KV
mirror that drivers and executors watch, so a change takes effect everywhere within a second.

The command line and the console both change clients through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Unpack

from tidegate.bus.clients import RegistryBuckets, publish_client
from tidegate.bus.quota import above_ceiling
from tidegate.errors import UsageError
from tidegate.signing import new_secret
from tidegate.store.store import ClientChanges, Store
from tidegate.urlpolicy import Net, check_url_now
from tidegate.wire import ClientRecord, check_command_lists


async def check_callback_url(url: str | None, allowed_nets: Sequence[Net]) -> None:
    """Refuse (`CallbackAddressRefused`) a URL the drivers would refuse to call anyway, at
    the moment an operator sets it rather than at the first callback."""
    if url:
        await asyncio.to_thread(check_url_now, url, allowed_nets)  # it may resolve a name


def check_buffer_max(value: int | None, ceiling: int | None) -> None:
    """Refuse a client's own buffer quota above the stream-wide one (`ceiling`, the
    submission stream's per-subject limit; None or <= 0: not known, or none), which JetStream
    holds whatever the registry says."""
    if value is not None and ceiling is not None and 0 < ceiling < value:
        raise UsageError(above_ceiling(value, ceiling))


async def add_client(
    store: Store,
    kv: RegistryBuckets,
    record: ClientRecord,
    *,
    allowed_nets: Sequence[Net],
    ceiling: int | None = None,
) -> ClientRecord:
    check_buffer_max(record.buffer_max, ceiling)
    check_command_lists(record.allowed_executables, record.allowed_cwds)
    await check_callback_url(record.callback_url, allowed_nets)
    stored = await store.add_client(record)
    await publish_client(kv, stored)
    return stored


async def rotate_secret(
    store: Store, kv: RegistryBuckets, name: str, *, overlap_s: float, secret: str | None = None
) -> tuple[ClientRecord, str]:
    """A new callback secret for `name` (generated unless given); the old one keeps signing
    beside it for `overlap_s`, so its receiver can switch without refusing a callback."""
    secret = secret or new_secret()
    record = await store.rotate_client_secret(name, secret, overlap_s)
    await publish_client(kv, record)
    return record, secret


async def change_client(
    store: Store,
    kv: RegistryBuckets,
    name: str,
    *,
    allowed_nets: Sequence[Net],
    ceiling: int | None = None,
    **changes: Unpack[ClientChanges],
) -> ClientRecord:
    check_buffer_max(changes.get("buffer_max"), ceiling)
    check_command_lists(changes.get("allowed_executables"), changes.get("allowed_cwds"))
    await check_callback_url(changes.get("callback_url"), allowed_nets)
    record = await store.update_client(name, **changes)
    await publish_client(kv, record)
    return record
