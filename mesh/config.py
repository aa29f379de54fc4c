"""Typed settings, built once from environment variables (and CLI flags) and passed explicitly.

Every knob has a `TIDEGATE_*` variable named after its field (`projector_max_batch` →
`TIDEGATE_PROJECTOR_MAX_BATCH`); CLI flags override the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

from tidegate.errors import ConfigError

PersistMode = Literal["batch", "per-event"]

T = TypeVar("T")

# Each partition is a lease, a durable consumer and a few tasks in the holding driver.
NOTIFY_PARTITIONS_MAX = 64


@dataclass(frozen=True, kw_only=True)
class Connection:
    """Where the servers are. Empty URLs mean "use the embedded servers" (only `tidegate up`)."""

    nats_url: str = ""
    database_url: str = ""
    data_dir: Path = Path("tidegate-data")
    # TLS to NATS: a CA bundle that verifies the server (set, or a `tls://` URL, means TLS),
    # and a client certificate and key for mutual TLS. Environment only: every connection,
    # the SDK's included, reads them where it is made (mesh/bus/natstls.py `from_env`).
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""

    def __post_init__(self) -> None:
        _both_or_neither(
            "TIDEGATE_NATS_TLS_CERT", self.nats_tls_cert, "TIDEGATE_NATS_TLS_KEY", self.nats_tls_key
        )


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    """The console's own HTTPS: a certificate (chain) and its private key, as PEM files."""

    console_tls_cert: str = ""
    console_tls_key: str = ""

    def __post_init__(self) -> None:
        _both_or_neither(
            "TIDEGATE_CONSOLE_TLS_CERT",
            self.console_tls_cert,
            "TIDEGATE_CONSOLE_TLS_KEY",
            self.console_tls_key,
        )


def _both_or_neither(cert_var: str, cert: str, key_var: str, key: str) -> None:
    if bool(cert) != bool(key):
        given, missing = (cert_var, key_var) if cert else (key_var, cert_var)
        raise ConfigError(
            f"{given} is set but {missing} is not: give both (the certificate and its private "
            "key, as PEM files) or neither"
        )


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Buffer sizes and timings shared by every component that creates the JetStream topology."""

    tasks_max_bytes: int = 4 * 1024**3  # the submission buffer; full → publishers get an error
    # One client's quota of waiting tasks: submitted and not routed yet (per client), and routed
    # and not dispatched yet (per client and pool). A paused, capped or unserved client that
    # reaches it gets `BufferFull` alone; the others' room is untouched. Holds a midnight flood.
    client_buffer_max: int = 1_000_000
    work_max_bytes: int = 4 * 1024**3
    events_max_bytes: int = 4 * 1024**3
    duplicate_window_s: float = 3600.0  # a key resubmitted within this window runs once
    max_task_bytes: int = 64 * 1024  # larger task bodies are rejected with a reason
    work_ack_wait_s: float = 30.0  # an executor silent this long loses its task to another
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 6.0
    # Message dead letters (poison set aside by a stage). Refused when full rather than
    # dropping the oldest: a dead letter is data an operator has not looked at yet.
    dead_max_bytes: int = 1024**3
    dead_max_age_s: float = 30 * 24 * 3600.0
    # Deliveries of one message to a route, ready, projector or notify consumer before it is
    # set aside as a dead letter (the work consumer's bound is its own: attempts count there).
    max_deliver: int = 20
    # How long the projector's consumer waits for an ack before it redelivers (the projector
    # keeps a batch it holds through a database outage alive at a third of this, whatever
    # the outage's length). Shorter only to make tests of long outages fast.
    projector_ack_wait_s: float = 30.0
    # How long a notifier partition's consumer waits for an ack before it redelivers (its
    # holder keeps what it holds alive at a third of this). The events a frozen or killed
    # holder held reach the next holder after at most this long. Shorter only for tests.
    notify_ack_wait_s: float = 60.0
    # Copies of every stream and bucket in a NATS cluster (1, 3 or 5; more than 1 needs a
    # cluster). Used when a stream or bucket is created: an existing one keeps its replicas,
    # which an operator changes on the server (`nats stream edit NAME --replicas 3`).
    replicas: int = 1
    # Notifier partitions: clients are hashed into this many, each with its own lease, so
    # several drivers call back at once (a client's callbacks stay in one partition, in order).
    # It shapes the events stream (a subject transform): give every component the same value.
    # Raising it takes effect for events published afterwards; lowering it is not supported
    # while events of the dropped partitions wait (they keep their consumer, which no driver
    # reads any more).
    notify_partitions: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:  # JetStream's own bound
            raise ConfigError(f"TIDEGATE_REPLICAS={self.replicas}: must be 1 to 5 (1, 3 or 5)")
        if not 1 <= self.notify_partitions <= NOTIFY_PARTITIONS_MAX:
            raise ConfigError(
                f"TIDEGATE_NOTIFY_PARTITIONS={self.notify_partitions}: must be 1 to "
                f"{NOTIFY_PARTITIONS_MAX}"
            )


@dataclass(frozen=True, kw_only=True)
class DriverSettings:
    # Submissions routed per round, shared among waiting clients. A round costs a few round
    # trips whatever its size: routing 30,000 from 20 clients, a driver alone did 6.0-6.1k/s
    # at 500 and 7.1-7.4k/s at 2,000.
    route_batch: int = 2000
    short_max_timeout_s: float = 300.0  # tasks with a longer timeout go to the `long` class
    default_pool: str = "default"
    projector_max_batch: int = 5000
    # A flood's terminal events trickle in as tasks finish: each commit takes what arrived in a
    # linger. 20,000-task floods (non-sensitive clients): 0.0088 commits per task and the
    # database 120 ms behind the callbacks (p50) at 0.2 s; 0.0047 and 239 ms at 0.5 s.
    projector_max_linger_s: float = 0.5
    projector_max_commits_per_s: float = 20.0
    persist: PersistMode = "batch"
    per_event_connections: int = 8  # baseline mode: concurrent one-row transactions
    metrics_port: int | None = None  # None: no /metrics server; 0: any free port
    retention_days: int = 30
    callback_timeout_s: float = 5.0  # an endpoint slower than this has failed
    # Address ranges callbacks may go to although they are loopback, link-local, private or
    # multicast (comma-separated CIDR; mesh/urlpolicy.py). Empty: none of those, ever.
    callback_allow_nets: str = ""
    # Callback requests in flight at once per client (the notifier's and the retry job's),
    # in order per task: a task's next callback waits for its previous one.
    callback_concurrency: int = 16
    retry_every_s: float = 1.0  # how often each driver looks for due callbacks
    retry_base_s: float = 1.0  # backoff: base * factor^(attempt-1), capped, with ±20% jitter
    retry_factor: float = 2.0
    retry_cap_s: float = 300.0
    retry_max_attempts: int = 20  # then the callback is dead-lettered ...
    retry_max_age_s: float = 24 * 3600  # ... or when it is this old
    dispatch_quantum: int = 500  # most tasks of one client moved per round
    dispatch_backlog_per_slot: int = 4  # a pool's work queue holds this many tasks per slot
    dispatch_min_backlog: int = 64  # ... and at least this many (pools with no live executor)
    # How often a driver publishes its counters to the stats stream (the console's charts and
    # rates): shorter gives finer charts, at one small message per driver per period.
    stats_every_s: float = 5.0
    # A client's route consumer is deleted by the server after this long without a pull
    # (the router forgets it after half of it, and makes it again when the client returns).
    route_inactive_threshold_s: float = 7 * 24 * 3600.0
    # The reconciler: a task that waited this long for a live executor of its pool, or whose
    # executor died with nobody to take it over (counted after the work ack wait), is `lost`.
    lost_after_s: float = 600.0
    reconcile_every_s: float = 5.0  # how often a driver looks for stranded tasks


@dataclass(frozen=True, kw_only=True)
class ExecutorSettings:
    pool: str = "default"
    slots: int = 4
    executor_id: str = ""  # empty: host-pid
    # Worker processes sharing the slots (executor/workers.py); 1: this process runs the tasks.
    executor_workers: int = 1
    kill_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this
    log_tail_bytes: int = 4096
    log_max_bytes: int = 1024 * 1024
    drain_timeout_s: float = 30.0
    task_log_retention_h: float = 48.0  # task log files older than this are removed
    metrics_port: int | None = None
    pidfd_watcher: bool = True  # Linux: reap task processes through pidfds, not a thread each
    # What this pool's tasks get (executor/taskenv.py). The executor's variables a task sees:
    # comma-separated names, `LC_*` for a prefix; empty: the default list (PATH, HOME, LANG, …).
    # Never the engine's TIDEGATE_* variables or its server URLs, whatever this says.
    task_env_allow: str = ""
    # The user tasks run as: empty means `nobody` when the executor runs as root, else the
    # executor's own user (only root can start processes as another user).
    task_user: str = ""
    # Limits of each task's process; None: the executor's own, inherited.
    task_rlimit_cpu_s: int | None = None  # CPU seconds: SIGXCPU, then SIGKILL after kill grace
    task_rlimit_as_mb: int | None = None  # address space (memory) in MiB
    task_rlimit_nofile: int | None = None  # open files


@dataclass(frozen=True, kw_only=True)
class Settings:
    connection: Connection = field(default_factory=Connection)
    limits: Limits = field(default_factory=Limits)
    driver: DriverSettings = field(default_factory=DriverSettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `TIDEGATE_*` variables; `overrides` are `section={field: value}`."""
        env = os.environ if env is None else env
        sections = {}
        for f in dataclasses.fields(cls):
            section_type = f.type if isinstance(f.type, type) else get_type_hints(cls)[f.name]
            values = _from_env(section_type, env)
            values.update({k: v for k, v in overrides.get(f.name, {}).items() if v is not None})
            sections[f.name] = section_type(**values)
        return cls(**sections)

    def replace(self, **sections: Any) -> Settings:
        """A copy with whole sections swapped (`connection=…`)."""
        return dataclasses.replace(self, **sections)


def _from_env(section: type[T], env: Mapping[str, str]) -> dict[str, Any]:
    hints = get_type_hints(section)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        var = f"TIDEGATE_{f.name.upper()}"
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        value = _parse(var, raw, hints[f.name])
        if isinstance(value, int | float) and not isinstance(value, bool):
            low = 0 if f.name in _ZERO_ALLOWED else None
            # `not value > 0` also refuses NaN, which compares false with everything.
            if (low is None and not value > 0) or (low is not None and not value >= low):
                bound = "0 or more" if low is not None else "greater than 0"
                raise ConfigError(f"{var}={raw!r} is not valid: it must be {bound}")
        values[f.name] = value
    return values


# Numbers that may be zero (0 = "pick a free port"); every other number must be positive.
_ZERO_ALLOWED = frozenset({"metrics_port"})


def _parse(var: str, raw: str, hint: Any) -> Any:
    text = str(hint)
    try:
        if hint is int or text == "int | None":
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is bool:
            return raw.lower() in {"1", "true", "yes", "on"}
        if hint is Path:
            return Path(raw)
        if hint is PersistMode:
            if raw not in ("batch", "per-event"):
                raise ValueError("expected `batch` or `per-event`")
            return raw
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r} is not valid: {exc}") from None
    return raw
