"""What `tidegate bench flood` is asked to do and what it reports, as msgspec structs."""

from __future__ import annotations

from typing import Final

import msgspec

from tidegate.bench.ceilings import Ceilings
from tidegate.bench.figures import Spread
from tidegate.bench.kinds import KindWrites
from tidegate.bench.timeline import Point
from tidegate.bench.usage import Usage
from tidegate.config import PersistMode
from tidegate.errors import TidegateError

MODES: Final[tuple[PersistMode, ...]] = ("batch", "per-event")
POOL: Final = "default"
COMMAND: Final = ("/bin/true",)
# The states called back per task, in order (mesh/driver/notify_rules.py): a sensitive client
# hears every transition after the PubAck, a non-sensitive one only the end.
CALLED_BACK: Final = {True: ("dispatched", "running", "succeeded"), False: ("succeeded",)}


class BenchError(TidegateError):
    """The benchmark could not run a mode; the message names the log to read."""


class FloodConfig(msgspec.Struct, frozen=True, kw_only=True):
    tasks: int
    clients: int
    executors: int
    slots: int
    persist: list[str]
    command: list[str]
    timeout_s: float  # deadline for every task to be terminal, per mode
    sensitive_share: float = 0.0  # fraction of the clients that are sensitive
    callback_latency_ms: float = 0.0  # the sink answers every callback request after this
    drivers: int = 1  # driver processes; the commit cap is per driver


class ModeResult(msgspec.Struct, kw_only=True):
    """One mode's figures; filled in as the run goes, so a failed run still shows how far."""

    persist: str
    tasks: int
    submitted: int = 0  # PubAcks received
    duplicates: int = 0
    submit_s: float | None = None
    submit_per_s: float | None = None  # PubAcks per second
    # Flood start until all were accepted and none waited to be routed (timeline samples).
    routed_s: float | None = None
    # Seconds from each submission's PubAck until it was routed (timeline.route_waits).
    route_wait_s: Spread | None = None
    terminal_s: float | None = None  # flood start until every task is terminal; None: deadline
    tasks_per_s: float | None = None  # tasks / terminal_s: the end-to-end rate
    terminal: int = 0
    succeeded: int = 0
    completed: bool = False
    commits: int | None = None  # the database's commits, the poller's own subtracted
    poller_commits: int = 0
    commits_per_task: float | None = None
    # Over 1 s of pg_stat samples, which can hold up to 2 s of one backend's (measure.py).
    peak_commits_per_s: float | None = None
    # Exact, from commit timestamps (committs.py): the write transactions of the run, but for
    # autovacuum's and autoanalyze's (counted apart).
    write_commits: int | None = None
    peak_write_commits_1s: int | None = None  # the most in any one-second window
    commit_cap_per_s: float | None = None  # the fleet's: each driver's cap times the drivers
    autovacuum_commits: int | None = None
    rows_written: int | None = None  # n_tup_ins + n_tup_upd over the tasks partitions
    rows_per_task: float | None = None
    # The same per kind of client, from the benchmark's triggers on `tasks` (kinds.py).
    writes_by_kind: dict[str, KindWrites] = msgspec.field(default_factory=dict)
    error: str | None = None
    # Ratios to the raw ceilings measured in the same run (1.0: as fast as the ceiling).
    terminal_x_spawn: float | None = None  # terminal_s / the spawn ceiling's seconds
    submit_x_publish: float | None = None  # submit_s / the publish ceiling's seconds
    # Callbacks, as the benchmark's sink received them.
    sensitive_clients: int = 0
    sensitive_tasks: int = 0
    callbacks_expected: int = 0
    callbacks_received: int = 0
    callback_duplicates: int = 0
    callbacks_out_of_order: int = 0  # a task's callback after a newer state of the task
    callbacks_by_state: dict[str, int] = msgspec.field(default_factory=dict)  # distinct events
    callback_requests: int = 0
    callbacks_s: float | None = None  # flood start until the last expected callback
    callbacks_per_s: float | None = None
    # Arrival minus the event's time, ms, by "sensitive" / "non-sensitive".
    callback_latency_ms: dict[str, Spread] = msgspec.field(default_factory=dict)
    # Non-sensitive tasks: the terminal row's write (updated_at) minus the terminal callback's
    # arrival, ms (negative: the row was there first).
    db_lag_ms: Spread | None = None
    usage: dict[str, Usage] = msgspec.field(default_factory=dict)  # per component
    timeline: list[Point] = msgspec.field(default_factory=list)
    commit_samples: list[tuple[float, int]] = msgspec.field(default_factory=list)  # (t, counter)


class Machine(msgspec.Struct, kw_only=True):
    cpus: int
    cpu_model: str
    memory_gb: float
    python: str
    system: str
    load_before: list[float]  # 1, 5, 15 min load averages: other work on the machine shows here
    load_after: list[float] = msgspec.field(default_factory=list)


class FloodReport(msgspec.Struct, kw_only=True):
    benchmark: str
    config: FloodConfig
    modes: dict[str, ModeResult]
    commit_ratio: float | None  # per-event commits / batch commits, when both ran
    ok: bool
    ceilings: Ceilings | None = None
    machine: Machine | None = None
