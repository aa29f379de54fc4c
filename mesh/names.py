"""The one place that spells NATS subjects, streams, consumers and KV buckets.

Nobody else builds a subject string by hand: import the function or constant from here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final

from tidegate.wire import NAME_RE, TaskClass, run_ref, task_id

# Streams ------------------------------------------------------------------------------------
TASKS_STREAM: Final = "TG_TASKS"  # submissions, a work queue drained by the drivers' route step
READY_STREAM: Final = "TG_READY"  # validated tasks waiting for their client's turn, cap and rate
WORK_STREAM: Final = "TG_WORK"  # dispatched tasks, a work queue per pool and class
EVENTS_STREAM: Final = "TG_EVENTS"  # state events, kept until projector and notifier acked them
STATS_STREAM: Final = "TG_STATS"  # drivers' counter samples of the last hour (console charts)
DEAD_STREAM: Final = "TG_DEAD"  # message dead letters: poison set aside by a stage, with reason
# `tidegate bench flood` only, on its private server: the raw publish ceiling.
BENCH_CEILING_STREAM: Final = "TG_BENCH_CEILING"
BENCH_CEILING_SUBJECT: Final = "tg.bench.ceiling"

SUBMIT_ALL: Final = "tg.submit.>"
READY_ALL: Final = "tg.ready.>"
WORK_ALL: Final = "tg.work.>"
EVENT_ALL: Final = "tg.event.>"
STATS_ALL: Final = "tg.stats.>"
DEAD_ALL: Final = "tg.dead.>"
# JetStream's advisory when a consumer delivered a message `max_deliver` times (fire-and-forget).
MAX_DELIVERIES_ADVISORY_ALL: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"
# The drivers share the advisories as one queue group: one driver handles each.
POISON_QUEUE: Final = "tidegate-poison"

# Durable consumers --------------------------------------------------------------------------
LEGACY_ROUTE_CONSUMER: Final = "route"  # one consumer for all clients, before fair routing
PROJECTOR_CONSUMER: Final = "projector"
NOTIFY_CONSUMER: Final = "notify"  # partition 0's (`notify_consumer`)

# KV buckets ---------------------------------------------------------------------------------
EXECUTORS_BUCKET: Final = "tg_executors"  # heartbeats; a key that ages out is a dead executor
EXECUTOR_CONTROL_BUCKET: Final = "tg_executor_control"  # cordon/drain, keyed by executor id
CLIENTS_BUCKET: Final = "tg_clients"  # mirror of the clients table, without secrets
# Callback signing secrets, per client: read by drivers only (not executors, not clients).
CLIENT_SECRETS_BUCKET: Final = "tg_client_secrets"
CANCEL_BUCKET: Final = "tg_cancel"  # cancel requests, keyed by encoded task id
LEASES_BUCKET: Final = "tg_leases"  # short leases: one notifier, one dispatcher per client
DISPATCH_BUCKET: Final = "tg_dispatch"  # per-client rate-limit state shared by all drivers
NOTIFY_FENCE_BUCKET: Final = "tg_notify_fence"  # newest state called back, per task (failover)
HANDBACKS_BUCKET: Final = "tg_handbacks"  # graceful hand-backs per work message (not attempts)
SESSIONS_BUCKET: Final = "tg_console_sessions"  # console logins; a key ages out with its session
NOTIFIER_LEASE: Final = "notifier"  # partition 0's (`notifier_lease`)
RECONCILE_LEASE: Final = "reconcile"  # one driver at a time looks for stranded tasks

TASK_CLASSES: Final[tuple[TaskClass, ...]] = ("short", "long")


def submit_subject(client: str) -> str:
    return f"tg.submit.{client}"


def client_of_submit_subject(subject: str) -> str:
    return subject.removeprefix("tg.submit.")


def route_consumer(client: str) -> str:
    """The route consumer of one client's submissions.

    Any subject token can arrive (an unregistered client's, to be rejected), but consumer
    names are stricter: names that are not plain get a stable digest instead.
    """
    if re.match(NAME_RE, client):
        return f"route_{client}"
    return "route_x" + hashlib.sha256(client.encode()).hexdigest()[:24]


def ready_subject(client: str, pool: str) -> str:
    return f"tg.ready.{client}.{pool}"


def client_ready_filter(client: str) -> str:
    """Every ready subject of one client (all its pools)."""
    return f"tg.ready.{client}.>"


def parse_ready_subject(subject: str) -> tuple[str, str] | None:
    """(client, pool) of a `tg.ready.<client>.<pool>` subject, None for anything else (a
    token that is not a name is a stray publish: no consumer may be made for it)."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["tg", "ready"]:
        return None
    if not (re.match(NAME_RE, parts[2]) and re.match(NAME_RE, parts[3])):
        return None
    return parts[2], parts[3]


def ready_consumer(client: str, pool: str) -> str:
    """The ready consumer of one client and pool. Names may hold `_`, so `_` cannot separate
    them (`team_x`+`default` and `team`+`x_default` would meet); `=` is legal in a consumer
    name but in no client or pool name, and no name of the earlier form holds it."""
    return f"ready_{client}={pool}"


def legacy_ready_consumer(client: str, pool: str) -> str:
    """The ambiguous name earlier versions gave a ready consumer: deleted at first use, when
    its filter is this client's and pool's (a work-queue stream refuses overlapping ones)."""
    return f"ready_{client}_{pool}"


def work_subject(pool: str, task_class: TaskClass, client: str) -> str:
    # The client token lets any driver count a client's tasks in flight from the stream's
    # per-subject totals: the cap on running tasks needs no shared counter.
    return f"tg.work.{pool}.{task_class}.{client}"


def client_work_filter(client: str) -> str:
    """Every work subject of one client, across pools and classes."""
    return f"tg.work.*.*.{client}"


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket (JetStream's naming)."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket stores one key's values on (JetStream's naming)."""
    return f"$KV.{bucket}.{key}"


def work_filter(pool: str, task_class: TaskClass) -> str:
    return f"tg.work.{pool}.{task_class}.*"


def parse_work_subject(subject: str) -> tuple[str, str, str] | None:
    """(pool, class, client) of a `tg.work.<pool>.<class>.<client>` subject, else None."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != ["tg", "work"]:
        return None
    return parts[2], parts[3], parts[4]


def dispatch_lease(client: str) -> str:
    return f"dispatch.{client}"


def work_consumer(pool: str, task_class: TaskClass) -> str:
    # Unambiguous although pools may hold `_`: the class, from a fixed set, is the suffix.
    return f"work_{pool}_{task_class}"


def event_subject(client: str) -> str:
    return f"tg.event.{client}"


def client_of_event_subject(subject: str) -> str | None:
    """The client token of an event's subject as published (`tg.event.<client>`) or as stored
    with notifier partitions (`tg.event.<partition>.<client>`), None for anything else."""
    parts = subject.split(".")
    if parts[:2] != ["tg", "event"]:
        return None
    if len(parts) == 3:
        return parts[2]
    if len(parts) == 4 and parts[2].isdigit():
        return parts[3]
    return None


def check_event_subject(subject: str, client: str) -> None:
    """An event is its subject's client's: one naming another client (forged, or published by
    hand on the wrong subject) would move that client's task and be called back to it, signed
    with its secret. Raises ValueError, which the stages set aside as a dead letter."""
    if client_of_event_subject(subject) != client:
        raise ValueError(
            f"an event of client {client!r} on {subject!r}, not its own subject "
            f"({event_subject(client)!r}): set aside, its task untouched"
        )


# Notifier partitions ------------------------------------------------------------------------
# Clients are hashed into `Limits.notify_partitions` partitions; each has its own lease and
# durable consumer, so several drivers share the callbacks while a client's events stay in one
# partition, in order. Publishers keep publishing `tg.event.<client>`: the events stream maps
# the subject to `tg.event.<partition>.<client>` when it stores it (a JetStream subject
# transform, `{{partition(N,1)}}`), so every component agrees on a client's partition without
# asking anyone. With one partition there is no transform: subjects are stored as published.
# Partition 0 keeps the names of the single notifier of earlier versions (its consumer and
# lease): no migration, and an older driver in a rolling upgrade contends for the same lease.


def notify_consumer(partition: int) -> str:
    return NOTIFY_CONSUMER if partition == 0 else f"{NOTIFY_CONSUMER}_{partition}"


def notify_partition_of_consumer(consumer: str) -> int | None:
    """The partition of a notify consumer's name, None for any other consumer."""
    if consumer == NOTIFY_CONSUMER:
        return 0
    head, _, tail = consumer.partition("_")
    if head != NOTIFY_CONSUMER or not tail.isdigit() or tail != str(int(tail)):
        return None
    return int(tail)


NOTIFY_MEMBERS_ALL: Final = "notify-member.>"


def notify_member(owner: str) -> str:
    """A driver's key among the notifier's members (the leases bucket): the live ones share
    the partitions out."""
    return f"notify-member.{kv_key(owner)}"


def notifier_lease(partition: int) -> str:
    return NOTIFIER_LEASE if partition == 0 else f"{NOTIFIER_LEASE}_{partition}"


def event_partition_transform(partitions: int) -> tuple[str, str] | None:
    """(source, destination) of the events stream's subject transform; None for one partition.
    The source matches only the published form (three tokens): a stored subject republished
    as it is (a re-driven dead letter) keeps its partition."""
    if partitions <= 1:
        return None
    return "tg.event.*", f"tg.event.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"


def notify_filters(partition: int, partitions: int) -> list[str]:
    """What partition `partition` of `partitions` consumes. Partition 0 also takes events
    stored untransformed (published while there was one partition, or by an earlier version)."""
    if partitions <= 1:
        return [EVENT_ALL]
    own = f"tg.event.{partition}.*"
    return [own, "tg.event.*"] if partition == 0 else [own]


def event_partition(client: str, partitions: int) -> int:
    """The partition the events stream stores `client`'s events in: the server's
    `{{partition(N,1)}}` mapping (FNV-1a, 32 bits, of the token, modulo N)."""
    if partitions <= 1:
        return 0
    h = 0x811C9DC5
    for byte in client.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def stats_subject(driver: str) -> str:
    """Where one driver publishes its counter samples. A driver id holds its host name,
    whose dots would split the subject into more tokens: anything unplain becomes `_`."""
    return "tg.stats." + (re.sub(r"[^A-Za-z0-9_-]", "_", driver) or "_")


def callback_subject(client: str) -> str:
    return f"tg.callback.{client}"


# A client's processes share its NATS callbacks as one queue group: each callback goes to one.
CALLBACK_QUEUE: Final = "tidegate-callbacks"

# The client API (wire/api.py): request/reply per client and operation, served by every
# driver as one queue group (one answers). The client is the subject's token, so a client's
# permission to publish on its own `tg.api.<client>.>` alone limits it to its own tasks.
API_ALL: Final = "tg.api.*.*"
API_QUEUE: Final = "tidegate-api"


def api_subject(client: str, op: str) -> str:
    return f"tg.api.{client}.{op}"


def client_api_filter(client: str) -> str:
    """Every API subject of one client (what its publish permission names)."""
    return f"tg.api.{client}.>"


def inbox_prefix(user: str) -> str:
    """The reply inbox of one NATS user (`inbox_prefix` when connecting): with permissions,
    a connection may subscribe only to its own replies, never to `_INBOX.>` (everyone's)."""
    return f"_INBOX_{user}"


def parse_api_subject(subject: str) -> tuple[str, str] | None:
    """(client, op) of a `tg.api.<client>.<op>` subject, None for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["tg", "api"]:
        return None
    return parts[2], parts[3]


def client_of_api_subject(subject: str) -> str | None:
    parsed = parse_api_subject(subject)
    return None if parsed is None else parsed[0]


# A submission's id carries a tag only its publisher can compute: JetStream deduplicates on
# `Nats-Msg-Id` across the whole stream, and NATS permissions cannot restrict a header, so an
# id anyone could write lets one client publish another's id on its own subject and have the
# other's real task dropped as a "duplicate". The tag is an HMAC keyed by the publishing
# connection's own NATS password, which no other client knows.
KEYED_MARK: Final = "#id-"
ID_TAG_HEX: Final = 20  # 80 bits: guessing one is hopeless within a dedup window
_KEYED_SUFFIX = re.compile(re.escape(KEYED_MARK) + f"[0-9a-f]{{{ID_TAG_HEX}}}$")


def id_tag(client: str, key: str, secret: bytes) -> str:
    """The tag of `client:key`'s submission id: HMAC-SHA256 keyed by `secret` (the
    publisher's NATS password, UTF-8) over `<client>:<key>`, hex, its first `ID_TAG_HEX`."""
    mac = hmac.new(secret, task_id(client, key).encode(), hashlib.sha256)
    return mac.hexdigest()[:ID_TAG_HEX]


def msg_id(client: str, key: str, secret: bytes | None = None) -> str:
    """The `Nats-Msg-Id` of a submission: JetStream drops a second publish with the same id.

    Without a secret (a server without users: anyone may publish on anyone's subject, there
    is nothing to protect) it is the task id, so a duplicate is exactly "the same task". With
    one it is keyed, `<client>:<key>#id-<tag>` (`id_tag`): the same publisher's resubmissions
    still meet, and nobody without its password can make one of them."""
    plain = task_id(client, key)
    if not secret:
        return plain
    return f"{plain}{KEYED_MARK}{id_tag(client, key, secret)}"


def strip_keyed_suffix(text: str) -> str:
    """`text` without a trailing keyed-id tag (`#id-` and `ID_TAG_HEX` hex digits)."""
    return _KEYED_SUFFIX.sub("", text, count=1)


RETRY_MARK: Final = "#retry-"
# A mark with nothing after it names no retry and no tag: not an id of the task.
_BARE_MARKS: Final = frozenset({RETRY_MARK[1:], KEYED_MARK[1:]})


def retry_msg_id(client: str, key: str, token: str) -> str:
    """The `Nats-Msg-Id` of an operator's retry: the submission's id with a mark that no
    earlier publish used, so the submission dedup lets it through as the task's next run."""
    return f"{msg_id(client, key)}{RETRY_MARK}{token}"


def msg_id_matches(header: str, client: str, key: str) -> bool:
    """Whether a submission's `Nats-Msg-Id` belongs to the task `client:key`: its plain id,
    or the plain id, `#` and a suffix (a keyed id's tag, a retry's or a re-drive's mark).

    Matched against the body's key as given: keys may themselves hold `#`. Whether a tag is
    right is not checked (the route step cannot know the publisher's password): a wrong one
    only costs its own publisher the dedup, on a subject only it may publish on."""
    plain = task_id(client, key)
    if header == plain:
        return True
    if not header.startswith(plain + "#"):
        return False
    suffix = header[len(plain) + 1 :]
    return bool(suffix) and suffix not in _BARE_MARKS


def run_msg_id(task_id: str, run: int) -> str:
    """The dedup id of one run's ready and work messages: a redelivered submission routes to
    the same id (a no-op), a later run of the task to a new one."""
    return run_ref(task_id, run)


def kv_key(task_id: str) -> str:
    """Task ids hold characters KV keys forbid (`:` and more); base64url keeps them unique."""
    return base64.urlsafe_b64encode(task_id.encode()).decode().rstrip("=")


def handback_key(task_id: str, work_seq: int) -> str:
    """One work message's hand-back count: the task and the message's stream sequence (a new
    run, or a work stream made anew, is a new message and starts from zero)."""
    return f"{kv_key(task_id)}.{work_seq}"


def executor_log_subject(executor_id: str) -> str:
    """Where one executor answers requests for its task log files (`LogRequest`).

    Executor ids may hold dots (a subject separator) and other characters a token should not:
    such ids get their base64url form, marked by a `=` that no plain id contains.
    """
    token = executor_id if re.match(NAME_RE, executor_id) else "=" + kv_key(executor_id)
    return f"tg.exec.{token}.log"


# Message dead letters -------------------------------------------------------------------------
# A client token that no client name (NAME_RE) and no base64url form (`=`…) can be: the
# message's client could not be told.
UNKNOWN_CLIENT_TOKEN: Final = "~"


def client_token(client: str | None) -> str:
    """A client name as one subject token: plain names as they are, anything else (dots,
    wildcards, spaces: a broken submission's subject) in base64url behind a `=`."""
    if client is None:
        return UNKNOWN_CLIENT_TOKEN
    return client if re.match(NAME_RE, client) else "=" + kv_key(client)


def client_of_token(token: str) -> str | None:
    """The client a `client_token` stands for (None for the unknown client)."""
    if token == UNKNOWN_CLIENT_TOKEN:
        return None
    if token.startswith("="):
        raw = token[1:]
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode(errors="replace")
    return token


def dead_subject(stage: str, client: str | None) -> str:
    """Where a stage sets a message aside: `tg.dead.<stage>.<client-token>`."""
    return f"tg.dead.{stage}.{client_token(client)}"


def dead_filter(stage: str | None = None, client: str | None = None) -> str:
    """The dead letters of one stage and/or one client (None: any)."""
    return f"tg.dead.{stage or '*'}.{'*' if client is None else client_token(client)}"


def parse_dead_subject(subject: str) -> tuple[str, str | None] | None:
    """(stage, client) of a dead letter's subject, None for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["tg", "dead"]:
        return None
    return parts[2], client_of_token(parts[3])


def redrive_msg_id(original: str | None, dead_seq: int) -> str:
    """A new `Nats-Msg-Id` for a re-driven dead letter whose own id is still in its stream's
    dedup window: the original's with a retry mark (see `msg_id_matches`)."""
    return f"{original or 'dead'}{RETRY_MARK}dead-{dead_seq}"


def max_deliveries_advisory(stream: str, consumer: str) -> str:
    """JetStream's advisory for one consumer's message that reached its `max_deliver`."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
