"""The one place that spells NATS subjects, streams, consumers and KV buckets.

Nobody else builds a subject string by hand: import the function or constant from here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Final

from tidegate.wire import NAME_RE, TaskClass, task_id

# Streams ------------------------------------------------------------------------------------
TASKS_STREAM: Final = "TG_TASKS"  # submissions, a work queue drained by the drivers' route step
READY_STREAM: Final = "TG_READY"  # validated tasks waiting for their client's turn, cap and rate
WORK_STREAM: Final = "TG_WORK"  # dispatched tasks, a work queue per pool and class
EVENTS_STREAM: Final = "TG_EVENTS"  # state events, kept until projector and notifier acked them
STATS_STREAM: Final = "TG_STATS"  # drivers' counter samples of the last hour (console charts)

SUBMIT_ALL: Final = "tg.submit.>"
READY_ALL: Final = "tg.ready.>"
WORK_ALL: Final = "tg.work.>"
EVENT_ALL: Final = "tg.event.>"
STATS_ALL: Final = "tg.stats.>"

# Durable consumers --------------------------------------------------------------------------
LEGACY_ROUTE_CONSUMER: Final = "route"  # one consumer for all clients, before fair routing
PROJECTOR_CONSUMER: Final = "projector"
NOTIFY_CONSUMER: Final = "notify"

# KV buckets ---------------------------------------------------------------------------------
EXECUTORS_BUCKET: Final = "tg_executors"  # heartbeats; a key that ages out is a dead executor
EXECUTOR_CONTROL_BUCKET: Final = "tg_executor_control"  # cordon/drain, keyed by executor id
CLIENTS_BUCKET: Final = "tg_clients"  # mirror of the clients table
CANCEL_BUCKET: Final = "tg_cancel"  # cancel requests, keyed by encoded task id
LEASES_BUCKET: Final = "tg_leases"  # short leases: one notifier, one dispatcher per client
DISPATCH_BUCKET: Final = "tg_dispatch"  # per-client rate-limit state shared by all drivers
SESSIONS_BUCKET: Final = "tg_console_sessions"  # console logins; a key ages out with its session
NOTIFIER_LEASE: Final = "notifier"

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


def parse_ready_subject(subject: str) -> tuple[str, str] | None:
    """(client, pool) of a `tg.ready.<client>.<pool>` subject, None for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["tg", "ready"]:
        return None
    return parts[2], parts[3]


def ready_consumer(client: str, pool: str) -> str:
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
    return f"work_{pool}_{task_class}"


def event_subject(client: str) -> str:
    return f"tg.event.{client}"


def stats_subject(driver: str) -> str:
    """Where one driver publishes its counter samples. A driver id holds its host name,
    whose dots would split the subject into more tokens: anything unplain becomes `_`."""
    return "tg.stats." + (re.sub(r"[^A-Za-z0-9_-]", "_", driver) or "_")


def callback_subject(client: str) -> str:
    return f"tg.callback.{client}"


def msg_id(client: str, key: str) -> str:
    """The `Nats-Msg-Id` of a submission: JetStream drops a second publish with the same id.

    It is the task id, so a duplicate is exactly "the same task"."""
    return task_id(client, key)


def kv_key(task_id: str) -> str:
    """Task ids hold characters KV keys forbid (`:` and more); base64url keeps them unique."""
    return base64.urlsafe_b64encode(task_id.encode()).decode().rstrip("=")


def executor_log_subject(executor_id: str) -> str:
    """Where one executor answers requests for its task log files (`LogRequest`).

    Executor ids may hold dots (a subject separator) and other characters a token should not:
    such ids get their base64url form, marked by a `=` that no plain id contains.
    """
    token = executor_id if re.match(NAME_RE, executor_id) else "=" + kv_key(executor_id)
    return f"tg.exec.{token}.log"
