"""Which settings of a stream, consumer or bucket Tidegate owns, and which are the operator's.

Every component start ensures the topology. A missing stream (consumer, bucket) is created with
Tidegate's values. An existing one keeps what an operator may have tuned on the server (sizes,
ages, replicas, in-flight caps: `nats stream edit`, `nats consumer edit`), and only the fields
that make Tidegate work as designed (subjects, retention, discard, dedup window, ack waits,
delivery bounds, ...) are brought to this version's values. A start never resets an operator's
choice; what differs is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, TypeVar

from nats.js.api import ConsumerConfig, StreamConfig

log = logging.getLogger(__name__)

C = TypeVar("C", StreamConfig, ConsumerConfig)

# How the stream behaves: a different value would break a guarantee (no silent drop, dedup,
# one consumer per subject). Everything else we set (max_bytes, max_age, num_replicas, ...) is
# only the value a new stream starts with.
STREAM_OWNED = frozenset(
    {
        "subjects",
        "retention",
        "discard",
        "storage",
        "duplicate_window",
        "max_msg_size",
        "discard_new_per_subject",
        "subject_transform",  # the events stream's notifier partitions
    }
)
# A KV bucket's stream: one value per key, its TTL and expiry markers are how the bucket works
# (heartbeats and leases age out). Its size and replicas are the operator's.
BUCKET_OWNED = frozenset(
    {
        "subjects",
        "storage",
        "max_age",
        "max_msgs_per_subject",
        "subject_delete_marker_ttl",
        "duplicate_window",
    }
)
# How messages flow: what is delivered, when it is redelivered, when it is given up on.
# max_ack_pending (a fleet-wide in-flight cap) is the operator's once the consumer exists;
# replicas are inherited from the stream (num_replicas 0).
CONSUMER_OWNED = frozenset(
    {
        "ack_policy",
        "deliver_policy",
        "filter_subject",
        "filter_subjects",
        "ack_wait",
        "max_deliver",
        "backoff",
        "inactive_threshold",
    }
)
# Identity, not settings.
_IDENTITY = frozenset({"name", "durable_name", "bucket"})


@dataclasses.dataclass(frozen=True)
class Merge:
    """The config to apply (`config`), the owned fields it changes, and the fields where the
    server keeps a value other than ours (an operator's choice, or an older default)."""

    config: Any
    changed: dict[str, tuple[Any, Any]]  # field → (server's value, ours)
    kept: dict[str, tuple[Any, Any]]  # field → (server's value, ours)


def _same(a: Any, b: Any) -> bool:
    # The server leaves out what is unset: None, 0, "" and [] all mean "not set".
    return (a or None) == (b or None)


def merge(existing: C, ours: C, owned: frozenset[str]) -> Merge:
    """`existing` with the owned fields taken from `ours`; everything else stays as it is on
    the server, including fields this version does not set at all."""
    changed: dict[str, tuple[Any, Any]] = {}
    kept: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(ours):
        if f.name in _IDENTITY:
            continue
        theirs, mine = getattr(existing, f.name), getattr(ours, f.name)
        if _same(theirs, mine):
            continue
        if f.name in owned:
            changed[f.name] = (theirs, mine)
        elif mine is not None:
            kept[f.name] = (theirs, mine)
    config = existing.evolve(**{name: mine for name, (_, mine) in changed.items()})
    return Merge(config=config, changed=changed, kept=kept)


def report(kind: str, name: str, result: Merge) -> None:
    """Log what a start changes on an existing stream/consumer and what it leaves alone."""
    for field, (theirs, mine) in result.changed.items():
        log.info("%s %s: %s %r -> %r (owned by Tidegate)", kind, name, field, theirs, mine)
    for field, (theirs, mine) in result.kept.items():
        log.info(
            "%s %s: keeping %s=%r as set on the server (this version would start with %r)",
            kind,
            name,
            field,
            theirs,
            mine,
        )
