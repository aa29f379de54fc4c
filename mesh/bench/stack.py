"""A private stack for one benchmark mode: its own nats-server and PostgreSQL under a fresh
directory, and the driver and executors as real processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

import psutil

from tidegate.bench.committs import PG_OPTIONS
from tidegate.bench.model import BenchError
from tidegate.embedded.children import kill_trees, signal_alive, spawn_component
from tidegate.embedded.servers import EmbeddedNats, EmbeddedPostgres

log = logging.getLogger("tidegate.bench")

DB_NAME: Final = "tidegate"
STOP_TIMEOUT_S: Final = 45.0  # executors drain (nothing runs by then) and drivers flush


class _Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """One mode's servers and component processes under `root`; `close` stops all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats = EmbeddedNats(root / "nats")
        self.pg = EmbeddedPostgres(root, options=PG_OPTIONS)
        self.children: list[_Child] = []
        self.nats_url = ""
        self.admin_url = ""  # the `postgres` database: where the commit sampler connects
        self.database_url = ""

    def start_servers(self) -> None:
        self.nats_url = self.nats.start()
        self.pg.start()
        self.admin_url = self.pg.admin_url
        self.database_url = self.pg.create_database(DB_NAME)

    def postmaster_pid(self) -> int | None:
        """PostgreSQL's root process (its first line of postmaster.pid), for the usage figures."""
        try:
            return int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TIDEGATE_NATS_URL=self.nats_url,
            TIDEGATE_DATABASE_URL=self.database_url,
            TIDEGATE_DATA_DIR=str(self.root / "data"),
        )
        # The benchmark's callback sink listens on loopback.
        env.setdefault("TIDEGATE_CALLBACK_ALLOW_NETS", "127.0.0.0/8")
        # Executors log every task at INFO: 20k lines of I/O would be measured too.
        env.setdefault("TIDEGATE_LOG_LEVEL", "WARNING")
        return env

    def spawn(self, name: str, *argv: str) -> None:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = spawn_component(
            argv, env=self.env(), log_path=log_path, cwd=self.root, new_session=True
        )
        self.children.append(_Child(name, proc, log_path))

    def check_children(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise BenchError(f"{c.name} exited with code {code}; see {c.log_path}:\n{c.tail()}")

    def stop_children(self, timeout: float = STOP_TIMEOUT_S) -> None:
        alive = [c for c in self.children if c.proc.poll() is None]
        signal_alive((c.proc for c in alive), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in alive:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", c.name, timeout)
                # With its tasks: they run in sessions of their own and would outlive it.
                with contextlib.suppress(psutil.NoSuchProcess):
                    kill_trees([psutil.Process(c.proc.pid)])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(5)

    def check_stopped(self) -> None:
        """After `stop_children`: say which child did not exit cleanly (its log tells why)."""
        for c in self.children:
            if c.proc.returncode not in (0, None):
                log.warning("%s exited with code %s; see %s", c.name, c.proc.returncode, c.log_path)

    def close(self) -> None:
        """Stop everything; each step runs even if an earlier one failed."""
        for step in (self.stop_children, self.pg.stop, self.nats.stop):
            try:
                step()
            except Exception as exc:
                log.warning("cleanup: %s failed: %s", getattr(step, "__qualname__", step), exc)
