"""What `tidegate bench flood` is asked to do and what it reports, as msgspec structs."""

from __future__ import annotations

from typing import Final

import msgspec

from tidegate.config import PersistMode
from tidegate.errors import TidegateError

MODES: Final[tuple[PersistMode, ...]] = ("batch", "per-event")
POOL: Final = "default"
COMMAND: Final = ("/bin/true",)


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


class ModeResult(msgspec.Struct, kw_only=True):
    """One mode's figures; filled in as the run goes, so a failed run still shows how far."""

    persist: str
    tasks: int
    submitted: int = 0  # PubAcks received
    duplicates: int = 0
    submit_s: float | None = None
    submit_per_s: float | None = None  # PubAcks per second
    terminal_s: float | None = None  # flood start until every task is terminal; None: deadline
    tasks_per_s: float | None = None  # tasks / terminal_s: the end-to-end rate
    terminal: int = 0
    succeeded: int = 0
    completed: bool = False
    commits: int | None = None  # the database's commits, the poller's own subtracted
    poller_commits: int = 0
    commits_per_task: float | None = None
    peak_commits_per_s: float | None = None
    rows_written: int | None = None  # n_tup_ins + n_tup_upd over the tasks partitions
    rows_per_task: float | None = None
    error: str | None = None


class FloodReport(msgspec.Struct, kw_only=True):
    benchmark: str
    config: FloodConfig
    modes: dict[str, ModeResult]
    commit_ratio: float | None  # per-event commits / batch commits, when both ran
    ok: bool
