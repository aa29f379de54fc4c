"""`tidegate executor --workers W`: a small supervisor of W executor processes.

One asyncio process tops out at a few hundred tasks a second (starting subprocesses is much of
its CPU). With W > 1 the `tidegate executor` process runs no tasks itself: it starts W workers,
each an ordinary executor (`python -m tidegate executor … --workers 1`) with its share of the
slots, and:

- identity: worker i is executor `<id>-w<i>`, with its own heartbeat (its slots, its running
  tasks), so the console lists W rows and the reconciler sees each worker's tasks, exactly as
  for separate executors. A restarted worker keeps its id.
- cordon and drain: every worker follows the control keys of all W ids (executor/control.py),
  so a cordon or drain of any row applies to the whole executor: a drain drains every worker.
- SIGTERM/SIGINT is forwarded to every worker, which drains as any executor does; the
  supervisor exits once all have exited: 0, or 1 if any worker failed. A worker that exits 0
  by itself was drained by an operator: the others are stopped as well.
- a worker that dies (kill -9, a crash) is logged and restarted with backoff. Its tasks' work
  comes back through JetStream after the ack wait, as for any dead executor; their processes,
  orphaned, are reparented to this supervisor (a child subreaper on Linux) and killed at once,
  since no executor can report them any more: a task that is run again does not also run on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tidegate.backoff import Backoff
from tidegate.config import ExecutorSettings
from tidegate.errors import ConfigError
from tidegate.executor.agent import default_executor_id

log = logging.getLogger(__name__)

# The ids of all the workers of one executor, comma-separated: set by the supervisor for its
# workers (internal, not a setting); a worker follows all their control keys.
WORKER_GROUP_ENV = "TIDEGATE_WORKER_GROUP"
RESTART = Backoff(base_s=0.5, cap_s=30.0)
STEADY_S = 60.0  # a worker that ran this long was well: its next death starts the backoff anew
POLL_S = 0.1  # how often exits are reaped and signals acted on
STOP_SLACK_S = 30.0  # beyond its drain bound, a stopping worker is killed
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1
# How a worker told to stop may end: drained (0), or by the signal itself when it came once
# the worker's loop had closed (its drain done) or before it had started (nothing to drain):
# SIGTERM's default action, or Ctrl-C's KeyboardInterrupt (130).
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 130})


def split_slots(slots: int, workers: int) -> list[int]:
    """`slots` over `workers`, as evenly as possible, each at least one."""
    if workers < 1:
        raise ConfigError(f"an executor needs at least one worker, not {workers}")
    if workers > slots:
        raise ConfigError(
            f"--workers {workers} is more than --slots {slots}: each worker needs a slot"
        )
    base, extra = divmod(slots, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def worker_ids(executor_id: str, workers: int) -> list[str]:
    return [f"{executor_id}-w{i}" for i in range(workers)]


def worker_group(executor_id: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The control keys this executor follows: its own, and its siblings' if it is a worker."""
    raw = (os.environ if env is None else env).get(WORKER_GROUP_ENV, "")
    ids = [i for i in raw.split(",") if i]
    return ids if executor_id in ids else [executor_id]


@dataclass
class _Worker:
    index: int
    id: str
    slots: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths: int = 0  # in a row, for the backoff
    restart_at: float | None = None
    done: bool = False  # exited, not to be started again


@dataclass
class WorkerSupervisor:
    settings: ExecutorSettings
    command: Sequence[str]  # `executor` and the flags it was given; the worker's follow
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False
    failed: bool = False
    _stop_signal: int | None = None
    _stop_by: float = 0.0

    def __post_init__(self) -> None:
        ex = self.settings
        self.id = ex.executor_id or default_executor_id()
        shares = split_slots(ex.slots, ex.executor_workers)
        ids = worker_ids(self.id, len(shares))
        self._env = {**self.env, WORKER_GROUP_ENV: ",".join(ids)}
        for i, (wid, slots) in enumerate(zip(ids, shares, strict=True)):
            argv = [*self.command, "--workers", "1", "--slots", str(slots), "--executor-id", wid]
            if ex.metrics_port:  # one port each, from the one given (0: any free port each)
                argv += ["--metrics-port", str(ex.metrics_port + i)]
            self.workers.append(_Worker(index=i, id=wid, slots=slots, argv=argv))

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        _become_subreaper()
        log.info(
            "executor %s: %d workers for pool %s, slots %s",
            self.id,
            len(self.workers),
            self.settings.pool,
            "+".join(str(w.slots) for w in self.workers),
        )
        for w in self.workers:
            self._start(w)
        while True:
            if self._stop_signal is not None and not self.stopping:
                log.info(
                    "executor %s: signal %d, draining every worker", self.id, self._stop_signal
                )
                self._begin_stop()
            self._reap()
            if self.stopping:
                if all(w.done for w in self.workers):
                    break
                self._kill_late()
            else:
                self._restart_due()
            time.sleep(POLL_S)
        log.info("executor %s: every worker has exited", self.id)
        return 1 if self.failed else 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _start(self, w: _Worker) -> None:
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", *w.argv], env=self._env, preexec_fn=_drain_with_us
        )
        w.started_at = time.monotonic()
        w.restart_at = None
        log.info("executor %s: worker %s started (pid %d)", self.id, w.id, w.proc.pid)

    def _begin_stop(self) -> None:
        self.stopping = True
        ex = self.settings
        self._stop_by = time.monotonic() + ex.drain_timeout_s + ex.kill_grace_s + STOP_SLACK_S
        for w in self.workers:
            if w.proc is None:
                w.done = True  # waiting for a restart: nothing to stop
            else:
                # os.kill, not Popen.send_signal: that polls, and would reap an exit that
                # `_reap` must see. Not reaped yet, the pid cannot have been reused.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGTERM)

    def _kill_late(self) -> None:
        if time.monotonic() < self._stop_by:
            return
        for w in self.workers:
            if w.proc is not None:
                log.error("executor %s: worker %s is still draining: killed", self.id, w.id)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)
        self._stop_by = float("inf")  # once; the kills are reaped as exits

    def _reap(self) -> None:
        """Every child that exited: a worker, or an orphaned task process of a dead one."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.proc and w.proc.pid == pid), None)
            if worker is not None:
                self._exited(worker, os.waitstatus_to_exitcode(status))

    def _exited(self, w: _Worker, code: int) -> None:
        assert w.proc is not None
        pid, ran_s = w.proc.pid, time.monotonic() - w.started_at
        w.proc.returncode = code  # reaped here, not by Popen
        w.proc = None
        if self.stopping:
            w.done = True
            if code not in _STOPPED:
                self.failed = True
                killed = _kill_orphans(self._live_pids())
                log.error(
                    "executor %s: worker %s (pid %d) exited %d while stopping; %d orphaned task "
                    "processes killed",
                    self.id,
                    w.id,
                    pid,
                    code,
                    killed,
                )
            return
        if code == 0:
            # Only a drain ends a worker by itself: an operator's, which every worker follows.
            log.info("executor %s: worker %s drained; stopping the others", self.id, w.id)
            w.done = True
            self._begin_stop()
            return
        killed = _kill_orphans(self._live_pids())
        w.deaths = 1 if ran_s >= STEADY_S else w.deaths + 1
        delay = RESTART.delay(w.deaths)
        w.restart_at = time.monotonic() + delay
        log.error(
            "executor %s: WORKER %s (pid %d) DIED (%s) after %.0fs; %d orphaned task "
            "processes killed, its tasks come back after the work ack wait; restart #%d in %.1fs",
            self.id,
            w.id,
            pid,
            f"signal {-code}" if code < 0 else f"exit {code}",
            ran_s,
            killed,
            w.deaths,
            delay,
        )

    def _restart_due(self) -> None:
        at = time.monotonic()
        for w in self.workers:
            if w.proc is None and not w.done and w.restart_at is not None and at >= w.restart_at:
                self._start(w)

    def _live_pids(self) -> set[int]:
        return {w.proc.pid for w in self.workers if w.proc is not None}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # The process's own symbols: no `find_library`, which runs a program (not in a preexec_fn).
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(option: int, value: int) -> bool:
    """Linux's prctl; False where it failed or does not exist."""
    libc = _libc()
    try:
        return libc is not None and int(libc.prctl(option, value, 0, 0, 0)) == 0
    except AttributeError:  # not Linux
        return False


def _become_subreaper() -> None:
    """Orphans of a dead worker become this process's children (Linux), not init's."""
    if not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        log.warning("not a child subreaper: a dead worker's task processes are not killed")


def _drain_with_us() -> None:
    """In a worker, before it runs: SIGTERM (a drain) when the supervisor dies, even of kill -9,
    rather than run on unsupervised."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _kill_orphans(workers: set[int]) -> int:
    """Kill the process group of every child that is not a worker: a task of a dead worker
    (each task leads its own group). Reaped later, with the workers' exits."""
    me, mine = os.getpid(), os.getpgrp()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in workers:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        ppid, pgrp = int(fields[1]), int(fields[2])
        if ppid != me:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgrp != mine:
                os.killpg(pgrp, signal.SIGKILL)
            else:
                os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
    return killed
