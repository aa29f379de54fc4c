"""The client registry: PostgreSQL is the source of truth, mirrored into KV buckets.

Drivers and executors follow the clients bucket (`KvMirror`), so a change made with the CLI or
the console reaches every component within a second, with no restart and no driver-to-driver
traffic. Signing secrets go to a bucket of their own that only drivers read (executors need a
client's mode and limits, never its secrets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.wire import ClientRecord
from tidegate.wire.clients import ClientSecrets, without_secrets

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(ClientRecord)
_secrets_decoder = msgspec.json.Decoder(ClientSecrets)


def decode_client(data: bytes) -> ClientRecord:
    return _decoder.decode(data)


def decode_secrets(data: bytes) -> ClientSecrets:
    return _secrets_decoder.decode(data)


@dataclass(frozen=True)
class RegistryBuckets:
    """Where the registry is mirrored: records for every component, secrets for drivers."""

    records: KeyValue
    secrets: KeyValue

    @classmethod
    async def of(cls, js: JetStreamContext) -> RegistryBuckets:
        """The existing buckets (a component that does not create the topology)."""
        return cls(
            records=await js.key_value(names.CLIENTS_BUCKET),
            secrets=await js.key_value(names.CLIENT_SECRETS_BUCKET),
        )


async def publish_client(buckets: RegistryBuckets, record: ClientRecord) -> None:
    # The secrets first: a driver that sees a new callback URL finds the secret to sign with.
    await buckets.secrets.put(record.name, msgspec.json.encode(ClientSecrets.of(record)))
    await buckets.records.put(record.name, msgspec.json.encode(without_secrets(record)))
