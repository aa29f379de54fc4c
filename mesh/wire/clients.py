"""A client's registry record (the `clients` row, mirrored into the clients KV bucket)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from tidegate.wire.spec import Name

DEFAULT_CALLBACK_HELD_MAX: Final = 1000  # `ClientRecord.callback_held_max` (migration 0007)


class ClientRecord(Struct, frozen=True, kw_only=True):
    """A row of `clients`, also the JSON mirrored into the clients KV bucket.

    The database's CHECK constraints are the authority; the annotations repeat them so that a
    KV watcher decoding this JSON rejects the same values.
    """

    name: Name
    sensitive: bool = False
    callback_url: Annotated[str, Meta(pattern=r"^https?://")] | None = None
    callback_nats: bool = False
    callback_secret: str | None = None
    max_running: Annotated[int, Meta(ge=0)] | None = None
    max_submit_per_s: Annotated[float, Meta(gt=0)] | None = None
    default_pool: Name = "default"
    paused: bool = False
    callback_batch_max: Annotated[int, Meta(ge=1, le=1000)] = 1  # >1: callbacks as JSON arrays
    # Events the notifier holds for this client (sent or waiting for its endpoint); beyond it
    # the rest goes to the outbox, so a slow endpoint holds back only its own client.
    callback_held_max: Annotated[int, Meta(ge=1, le=1_000_000)] = DEFAULT_CALLBACK_HELD_MAX
    # Its tasks that may wait (submitted + routed, not dispatched) before its submissions are
    # refused (`BufferFull`); None: the stream-wide TIDEGATE_CLIENT_BUFFER_MAX, which is also
    # the ceiling of this one (migration 0010; a record without it decodes as None).
    buffer_max: Annotated[int, Meta(ge=1)] | None = None
    # A rotation's overlap (`tidegate client rotate-secret`): until then the previous secret
    # signs too, so a receiver still holding it verifies (migration 0011).
    callback_secret_previous: str | None = None
    callback_secret_previous_until: datetime | None = None
    # Its command policy (migration 0012; `tidegate.wire.command_policy`), checked where its
    # tasks are routed: absolute paths or globs `argv[0]` must match, directories `cwd` must be
    # under, and whether `shell` may run. None: any; the defaults allow what they always did.
    allowed_executables: tuple[str, ...] | None = None
    allowed_cwds: tuple[str, ...] | None = None
    allow_shell: bool = True
    created_at: datetime | None = None  # set by the database
    updated_at: datetime | None = None


class ClientSecrets(Struct, frozen=True, kw_only=True):
    """A client's signing secrets, mirrored into their own bucket (`tg_client_secrets`), which
    only drivers read: the clients bucket, read by every executor, carries none."""

    current: str | None = None
    previous: str | None = None
    previous_until: datetime | None = None

    @classmethod
    def of(cls, record: ClientRecord) -> ClientSecrets:
        return cls(
            current=record.callback_secret,
            previous=record.callback_secret_previous,
            previous_until=record.callback_secret_previous_until,
        )

    def signing(self, at: datetime) -> list[str]:
        """The secrets that sign at `at`: the current one first, then the previous one while
        its overlap lasts."""
        keys = [self.current] if self.current else []
        if self.previous and self.previous_until is not None and at < self.previous_until:
            keys.append(self.previous)
        return keys


def without_secrets(record: ClientRecord) -> ClientRecord:
    """The record as every component may read it."""
    return msgspec.structs.replace(
        record,
        callback_secret=None,
        callback_secret_previous=None,
        callback_secret_previous_until=None,
    )
