"""Prometheus metrics, one registry per component (no global registry), served on /metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


@dataclass
class DriverMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.routed = Counter(
            "tidegate_tasks_routed", "Tasks routed to a pool", ["pool", "task_class"], registry=r
        )
        self.rejected = Counter(
            "tidegate_tasks_rejected",
            "Submissions rejected, by kind of reason",
            ["reason"],
            registry=r,
        )
        self.dispatched = Counter(
            "tidegate_tasks_dispatched",
            "Tasks moved to their pool's work queue",
            ["pool"],
            registry=r,
        )
        self.backlog = Gauge(
            "tidegate_client_backlog",
            "Tasks routed and waiting for their client's turn",
            ["client"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tidegate_client_in_flight",
            "Tasks dispatched and not finished (queued in a pool or running)",
            ["client"],
            registry=r,
        )
        self.handoff_failures = Counter(
            "tidegate_route_handoff_failures",
            "Submissions whose hand-off to the work stream failed and will be retried",
            registry=r,
        )
        self.events = Counter(
            "tidegate_events_projected", "Events consumed by the projector", ["state"], registry=r
        )
        self.bad_events = Counter(
            "tidegate_events_undecodable", "Events the projector could not decode", registry=r
        )
        self.message_dead_letters = Counter(
            "tidegate_message_dead_letters",
            "Messages a stage could not process, set aside as message dead letters",
            ["stage", "client"],
            registry=r,
        )
        self.projection_redelivered = Counter(
            "tidegate_projection_redelivered",
            "Events the projector received more than once (its ack wait ran out before it acked "
            "them: a keep-alive came too late, or a driver died holding them)",
            registry=r,
        )
        self.heartbeat_rows_dropped = Counter(
            "tidegate_projection_heartbeat_rows_dropped",
            "`running` rows from heartbeats dropped while the database was away (over the cap; "
            "the task's later events still project)",
            registry=r,
        )
        self.rows = Counter("tidegate_projection_rows", "Task rows written", registry=r)
        self.commits = Counter("tidegate_projection_commits", "Database commits", registry=r)
        self.refused_rows = Counter(
            "tidegate_projection_refused_rows",
            "Rows the database refused for their content (logged with the task id, not projected)",
            registry=r,
        )
        self.write_failures = Counter(
            "tidegate_projection_write_failures", "Failed projection writes (retried)", registry=r
        )
        self.batch_size = Histogram(
            "tidegate_projection_batch_rows",
            "Rows per projection commit",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.coalesced = Counter(
            "tidegate_projection_coalesced",
            "Transitions merged into another row write",
            registry=r,
        )
        # The driver's shared commit cap (mesh/store/pace.py): turns taken and time waited,
        # by writer (sensitive, callbacks, projector, housekeeping).
        self.commit_turns = Counter(
            "tidegate_commit_turns",
            "Transactions granted by the commit cap",
            ["writer"],
            registry=r,
        )
        self.commit_wait = Counter(
            "tidegate_commit_wait_seconds",
            "Time spent waiting for the commit cap",
            ["writer"],
            registry=r,
        )
        self.callbacks = Counter(
            "tidegate_callbacks",
            "Callbacks delivered at once or written to the outbox (or left to the ack wait by a "
            "holder whose lease passed)",
            ["result"],
            registry=r,
        )
        self.retries = Counter(
            "tidegate_callback_retries",
            "Outbox retries: delivered, failed again, dead-lettered",
            ["result"],
            registry=r,
        )
        self.executors = Gauge(
            "tidegate_executors_alive", "Executors with a live heartbeat", registry=r
        )
        self.heartbeat_age = Gauge(
            "tidegate_executor_heartbeat_age_seconds",
            "Seconds since each executor's heartbeat",
            ["executor"],
            registry=r,
        )
        self.running = Gauge(
            "tidegate_running_tasks", "Tasks running, from executor heartbeats", registry=r
        )
        # What the alert rules watch (mesh/alerts/tidegate.rules.yml), sampled from JetStream
        # by every driver (driver/gauges.py): alert on their max over the drivers.
        self.oldest_waiting = Gauge(
            "tidegate_oldest_waiting_seconds",
            "Age of the client's oldest task not yet dispatched (submitted or ready), 0 if none",
            ["client"],
            registry=r,
        )
        self.pool_live_executors = Gauge(
            "tidegate_pool_live_executors",
            "Executors of the pool with a live heartbeat that take work (not cordoned/draining)",
            ["pool"],
            registry=r,
        )
        self.pool_waiting = Gauge(
            "tidegate_pool_waiting_tasks",
            "Tasks waiting for the pool: ready for it, or in its work queue and not yet fetched",
            ["pool"],
            registry=r,
        )
        self.stream_bytes = Gauge(
            "tidegate_stream_bytes", "Bytes stored in a stream", ["stream"], registry=r
        )
        self.stream_max_bytes = Gauge(
            "tidegate_stream_max_bytes",
            "A stream's size limit (publishers are refused past it); -1: none",
            ["stream"],
            registry=r,
        )
        self.stream_messages = Gauge(
            "tidegate_stream_messages", "Messages stored in a stream", ["stream"], registry=r
        )
        self.projection_pending = Gauge(
            "tidegate_projection_pending_events",
            "Events not yet projected into the database (waiting or in a batch)",
            registry=r,
        )
        self.client_api = Counter(
            "tidegate_client_api_requests",
            "Client API requests answered (tg.api.<client>.<op>), by operation and result (ok, "
            "or the error code of the reply)",
            ["op", "result"],
            registry=r,
        )
        self.projection_lag = Gauge(
            "tidegate_projection_lag_seconds",
            "Age of the oldest event not yet projected into the database, 0 if none",
            registry=r,
        )


@dataclass
class ExecutorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.running = Gauge("tidegate_executor_running_tasks", "Tasks running here", registry=r)
        self.slots = Gauge("tidegate_executor_slots", "Slots of this executor", registry=r)
        self.fetched = Counter("tidegate_executor_fetched", "Work messages fetched", registry=r)
        self.finished = Counter(
            "tidegate_executor_finished", "Tasks finished, by state", ["state"], registry=r
        )
        self.bad_work = Counter(
            "tidegate_executor_bad_work", "Work messages that could not be decoded", registry=r
        )
        self.heartbeat_age = Gauge(
            "tidegate_executor_heartbeat_age_seconds",
            "Seconds since this executor's last heartbeat was stored",
            registry=r,
        )
        self.let_go = Counter(
            "tidegate_executor_let_go",
            "Attempts killed unreported: their progress was not accepted within the ack wait",
            registry=r,
        )
        self.executor_errors = Counter(
            "tidegate_executor_errors",
            "Executor errors during an attempt (handed_back: before the process started)",
            ["handed_back"],
            registry=r,
        )


def count_dead_letter(metrics: DriverMetrics) -> Callable[[str, str | None], None]:
    """The callback that counts one message dead letter (the bus does not import metrics)."""

    def count(stage: str, client: str | None) -> None:
        metrics.message_dead_letters.labels(stage=stage, client=client or "").inc()

    return count


def serve(registry: CollectorRegistry, port: int) -> tuple[WSGIServer, int]:
    """Serve /metrics on loopback; port 0 picks a free one (returned)."""
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://127.0.0.1:%d/metrics", bound)
    return server, bound
