"""The client registry: PostgreSQL is the source of truth, mirrored into a KV bucket.

Drivers and executors follow the bucket (`KvMirror`), so a change made with the CLI or the
console reaches every component within a second, with no restart and no driver-to-driver
traffic.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KeyValue

from tidegate.wire import ClientRecord

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(ClientRecord)


def decode_client(data: bytes) -> ClientRecord:
    return _decoder.decode(data)


async def publish_client(kv: KeyValue, record: ClientRecord) -> None:
    await kv.put(record.name, msgspec.json.encode(record))
