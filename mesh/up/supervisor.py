"""The component processes of one `tidegate up`: started with pid files, restarted with backoff
when they die, killed at the end; and what a killed earlier run on the directory left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tidegate.backoff import Backoff
from tidegate.embedded.children import kill_trees, signal_alive, spawn_component

log = logging.getLogger("tidegate.up")

RESTART = Backoff(base_s=1.0, cap_s=30.0)  # per crash in a row
STABLE_AFTER_S = 60.0  # a child that ran this long before crashing starts its backoff over
STALE_GRACE_S = 5.0


@dataclass
class Child:
    """One supervised component process."""

    name: str
    args: list[str]  # after `python -m tidegate`
    env: dict[str, str] = field(default_factory=dict)  # its own, over `Children.env`
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time before which a crashed child is not restarted
    crashes: int = 0  # in a row: a child that ran STABLE_AFTER_S before dying starts over

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Children:
    """Starts, restarts and stops the component processes of one data directory."""

    data_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    on_change: Callable[[], None] | None = None  # after a (re)start: rewrite endpoints.json

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def log_path(self, child: Child) -> Path:
        return self.log_dir / f"{child.name}.log"

    def add(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        # --data-dir on the command line (not only in the environment) makes the child
        # recognisable in `ps` and to the stale-process cleanup of a later run.
        self.children.append(
            Child(name=name, args=["--data-dir", str(self.data_dir), *args], env=env or {})
        )

    def start(self, child: Child) -> None:
        # Popen runs on the main thread only: PR_SET_PDEATHSIG fires when the *thread* that
        # forked the child ends, so a child started from a worker thread would die with it.
        child.proc = spawn_component(
            child.args,
            env={**self.env, **child.env},
            log_path=self.log_path(child),
            header=f"--- started by tidegate up at {time.strftime('%F %T')} ---\n",
        )
        child.started_at = time.monotonic()
        (self.run_dir / f"{child.name}.pid").write_text(f"{child.proc.pid}\n")
        log.info("started %s (pid %d), log %s", child.name, child.proc.pid, self.log_path(child))

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)
        if self.on_change:
            self.on_change()

    def supervise(self) -> None:
        """One round: report children that died, restart those whose backoff has passed."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                if now - child.started_at >= STABLE_AFTER_S:
                    child.crashes = 0
                child.restarts += 1
                child.crashes += 1
                delay = RESTART.delay(child.crashes)
                child.next_start = now + delay
                log.error(
                    "%s (pid %d) DIED with exit code %s; restart #%d in %.0fs. Last lines of %s:"
                    "\n%s",
                    child.name,
                    child.proc.pid,
                    code,
                    child.restarts,
                    delay,
                    self.log_path(child),
                    tail(self.log_path(child)),
                )
                child.proc = None
            if child.proc is None and now >= child.next_start:
                self.start(child)
                changed = True
        if changed and self.on_change:
            self.on_change()

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children if c.proc is not None}

    def signal_all(self, sig: signal.Signals) -> None:
        signal_alive((c.proc for c in self.children if c.proc is not None), sig)

    def any_alive(self) -> bool:
        return any(c.alive() for c in self.children)

    def reap(self) -> None:
        """After the stop: SIGKILL whatever is left, wait for it, forget the pid files."""
        left = []
        for child in self.children:
            if child.alive():
                assert child.proc is not None
                log.warning("killing %s (pid %d)", child.name, child.proc.pid)
                with contextlib.suppress(psutil.Error):
                    left.append(psutil.Process(child.proc.pid))
        kill_trees(left)
        for child in self.children:
            if child.proc is not None:
                child.proc.wait()
                child.proc = None
            (self.run_dir / f"{child.name}.pid").unlink(missing_ok=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"    (cannot read: {exc})"
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


def stop_stale_children(data_dir: Path, grace_s: float = STALE_GRACE_S) -> list[int]:
    """Stop components a killed `up` on this directory left running; returns their pids.

    A pid is only acted on if it still is a Tidegate component of this data directory: after a
    reboot the number may belong to anything.
    """
    procs: list[psutil.Process] = []
    for pid_file in (data_dir / "run").glob("*.pid"):
        try:
            proc = psutil.Process(int(pid_file.read_text().split()[0]))
            cmdline = proc.cmdline()
        except (ValueError, IndexError, OSError, psutil.Error):
            cmdline = []
        if "tidegate" in cmdline and str(data_dir) in cmdline:
            log.warning(
                "stopping %s (pid %d) left behind by an earlier run", pid_file.stem, proc.pid
            )
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
                procs.append(proc)
        pid_file.unlink(missing_ok=True)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill_trees(alive)
    return [p.pid for p in procs]
