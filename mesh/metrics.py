"""Prometheus metrics, one registry per component (no global registry), served on /metrics."""

from __future__ import annotations

import logging
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
        self.callbacks = Counter(
            "tidegate_callbacks",
            "Callbacks delivered at once or written to the outbox",
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


def serve(registry: CollectorRegistry, port: int) -> tuple[WSGIServer, int]:
    """Serve /metrics on loopback; port 0 picks a free one (returned)."""
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics on http://127.0.0.1:%d/metrics", bound)
    return server, bound
