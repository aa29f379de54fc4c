"""The routing decision for one submission, pure (no I/O): its client, key, run, pool and
class, and what to publish for it (a work item and its `queued` event, or a rejection).

A key submitted again after the dedup window is the task's next run, with ids of its own (see
`decide`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from tidegate import names
from tidegate.bus.publish import Outgoing
from tidegate.config import DriverSettings, Limits
from tidegate.errors import InvalidTask, TidegateError
from tidegate.wire import (
    KEY_PATTERN,
    NAME_RE,
    AnyEvent,
    ClientRecord,
    Queued,
    Rejected,
    TaskClass,
    WorkItem,
    command_refusal,
    decode_spec,
    encode,
    task_id,
)

ClientLookup = Callable[[str], ClientRecord | None]

_KEY = re.compile(KEY_PATTERN)


class Unroutable(TidegateError):
    """A submission that yields no task to file a state under (no client can own its
    subject, or no key can be read): set aside as a message dead letter, never rejected
    under a made-up id."""

    def __init__(self, reason: str, *, client: str | None) -> None:
        super().__init__(reason)
        self.client = client


class _KeyOnly(msgspec.Struct):
    key: object = None


def _key_in_body(data: bytes) -> str | None:
    """The task key of a body that fails validation, if it names a valid one."""
    try:
        key = msgspec.json.decode(data, type=_KeyOnly).key
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return key if isinstance(key, str) and _KEY.match(key) else None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to publish for one submission: a work item and its event, or a rejection."""

    event: AnyEvent
    work: WorkItem | None = None


def task_class(timeout_s: float, short_max_timeout_s: float) -> TaskClass:
    return "short" if timeout_s <= short_max_timeout_s else "long"


def decide(
    msg_subject: str,
    data: bytes,
    header_msg_id: str | None,
    stream_seq: int,
    submitted_at: datetime,
    *,
    lookup: ClientLookup,
    settings: DriverSettings,
    limits: Limits,
) -> Decision:
    """Pure routing decision for one submission (no I/O; unit-testable).

    `stream_seq`, the submission's sequence in the tasks stream, is the id of the run it
    starts: another driver routing the same submission again finds the same run, and a key
    submitted again after the dedup window (or retried) starts a run with a larger id.
    """
    client = names.client_of_submit_subject(msg_subject)
    # `submitted_at` is JetStream's stored time of the submission: the same when another
    # driver routes it again, so the row lands in the same day partition.
    at = submitted_at
    # The key is read from the dedup header when the body cannot be trusted, so even a
    # malformed submission gets a rejected state under the id its client will look for; but
    # only a key the schema would accept, or a bad header could make an unstorable row.
    prefix = f"{client}:"
    key = header_msg_id[len(prefix) :] if header_msg_id and header_msg_id.startswith(prefix) else ""
    key = key.split(names.RETRY_MARK, 1)[0]  # an operator's retry: the same task's next run
    key = names.strip_keyed_suffix(key)  # a keyed id (`names.msg_id`): its tag is no key's
    if not re.match(NAME_RE, client):
        # No client can be registered under it, so nobody can be told: a dead letter.
        raise Unroutable(
            f"{msg_subject!r} does not name a valid client (names match {NAME_RE})", client=None
        )
    if not _KEY.match(key):
        # No valid header: the body may still name the task. Without either, no state can
        # be filed under an id the client would look for: a dead letter, not a made-up id.
        key = _key_in_body(data) or ""
        if not key:
            raise Unroutable(
                "no task key: the Nats-Msg-Id header is not "
                f"'{client}:<key>' and the body has no valid `key`",
                client=client,
            )

    def reject(reason: str) -> Decision:
        sensitive = bool(record and record.sensitive)
        return Decision(
            event=Rejected(
                task_id=task_id(client, key),
                client=client,
                key=key,
                attempt=0,
                at=at,
                submitted_at=at,
                reason=reason,
                finished_at=at,
                sensitive=sensitive,
                run=stream_seq,
            )
        )

    record = lookup(client)
    if len(data) > limits.max_task_bytes:
        return reject(f"task is {len(data)} bytes; the limit is {limits.max_task_bytes}")
    if record is None:
        return reject(f"unknown client {client!r}: register it with `tidegate client add`")
    try:
        spec = decode_spec(data)
    except InvalidTask as exc:
        return reject(str(exc))
    if header_msg_id is not None and not names.msg_id_matches(header_msg_id, client, spec.key):
        return reject(
            f"Nats-Msg-Id {header_msg_id!r} does not match the task key; "
            f"use {names.msg_id(client, spec.key)!r}"
        )
    # The client's command policy, as it is now: a change reaches the tasks routed after it.
    refused = command_refusal(record, spec)
    if refused is not None:
        return reject(refused)
    tid = task_id(client, spec.key)
    pool = spec.pool or record.default_pool or settings.default_pool
    cls = task_class(spec.timeout_s, settings.short_max_timeout_s)
    work = WorkItem(
        task_id=tid,
        client=client,
        spec=spec,
        pool=pool,
        task_class=cls,
        submitted_at=at,
        sensitive=record.sensitive,
        run=stream_seq,
    )
    queued = Queued(
        task_id=tid,
        client=client,
        key=spec.key,
        attempt=0,
        at=at,
        submitted_at=at,
        spec=spec,
        pool=pool,
        task_class=cls,
        sensitive=record.sensitive,
        run=stream_seq,
    )
    return Decision(event=queued, work=work)


def to_publish(d: Decision) -> list[Outgoing]:
    """The messages of a decision: its ready message (when routed) before its event."""
    event_out = Outgoing(
        subject=names.event_subject(d.event.client),
        payload=encode(d.event),
        msg_id=d.event.event_id,
    )
    if d.work is None:
        return [event_out]
    ready_out = Outgoing(
        subject=names.ready_subject(d.work.client, d.work.pool),
        payload=encode(d.work),
        msg_id=names.run_msg_id(d.work.task_id, d.work.run),
    )
    return [ready_out, event_out]
