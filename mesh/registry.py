"""The client registry as one operation: PostgreSQL first (the source of truth), then the KV
mirror that drivers and executors watch, so a change takes effect everywhere within a second.

The command line and the console both change clients through here.
"""

from __future__ import annotations

from typing import Unpack

from nats.js.kv import KeyValue

from tidegate.bus.clients import publish_client
from tidegate.store.store import ClientChanges, Store
from tidegate.wire import ClientRecord


async def add_client(store: Store, kv: KeyValue, record: ClientRecord) -> ClientRecord:
    stored = await store.add_client(record)
    await publish_client(kv, stored)
    return stored


async def change_client(
    store: Store, kv: KeyValue, name: str, **changes: Unpack[ClientChanges]
) -> ClientRecord:
    record = await store.update_client(name, **changes)
    await publish_client(kv, record)
    return record
