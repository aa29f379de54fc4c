"""Real processes for integration tests: drivers and executors as `python -m tidegate …`."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidegate.bus.clients import publish_client
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.store.store import Store
from tidegate.urlpolicy import LOCAL_CALLBACK_NETS, parse_nets
from tidegate.wire import ClientRecord

# The tests' callback receivers are on loopback, refused by default (mesh/urlpolicy.py).
LOOPBACK = parse_nets(LOCAL_CALLBACK_NETS)

# Short timings so fault tests finish in seconds, not minutes.
FAST_ENV = {
    "TIDEGATE_WORK_ACK_WAIT_S": "3",
    "TIDEGATE_HEARTBEAT_INTERVAL_S": "0.5",
    "TIDEGATE_HEARTBEAT_TTL_S": "2",
    "TIDEGATE_KILL_GRACE_S": "1",
    "TIDEGATE_PROJECTOR_MAX_LINGER_S": "0.05",
    "TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S": "50",
    "TIDEGATE_DRAIN_TIMEOUT_S": "5",
    "TIDEGATE_LOG_LEVEL": "INFO",
    # The tests' callback receivers listen on loopback, which production refuses by default.
    "TIDEGATE_CALLBACK_ALLOW_NETS": "127.0.0.0/8",
    # Tasks write their side effects into the test's private temporary directories: they run
    # as the suite's own user, not as `nobody` (what a root executor does by default; the
    # isolation tests start theirs with TIDEGATE_TASK_USER="" for that).
    "TIDEGATE_TASK_USER": pwd.getpwuid(os.geteuid()).pw_name,
}


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", *self.argv],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop within {timeout}s") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    nats_url: str
    database_url: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)

    def env(self, **more: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FAST_ENV)
        env.update(
            TIDEGATE_NATS_URL=self.nats_url,
            TIDEGATE_DATABASE_URL=self.database_url,
            TIDEGATE_DATA_DIR=str(self.workdir),
        )
        env.update(self.extra_env)
        env.update(more)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Component:
        c = Component(name, argv, env, self.workdir / "logs" / f"{name}.log").start()
        self.components.append(c)
        return c

    def driver(self, *args: str, **env: str) -> Component:
        n = sum(c.name.startswith("driver") for c in self.components)
        return self._spawn(f"driver{n}", ["driver", *args], self.env(**env))

    def executor(self, *, pool: str = "default", slots: int = 8, **env: str) -> Component:
        n = sum(c.name.startswith("executor") for c in self.components)
        argv = ["executor", "--pool", pool, "--slots", str(slots), "--executor-id", f"exec-{n}"]
        return self._spawn(f"executor{n}", argv, self.env(**env))

    def stop_all(self) -> None:
        for c in reversed(self.components):
            if c.alive():
                try:
                    c.stop(timeout=20)
                except AssertionError:
                    pass

    def logs(self) -> str:
        return "\n".join(f"===== {c.name}\n{c.log()[-6000:]}" for c in self.components)


def cli(env: dict[str, str], *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def wait_for(
    check: Callable[[], Awaitable[Any]], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last={last!r}")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


CLIENTS = ["alpha", "beta", "gamma", "delta", "epsilon"]


async def register(nats_url: str, database_url: str, *records: ClientRecord) -> None:
    nc = await connect(nats_url, "test-setup")
    try:
        buckets = await ensure_all(nc.jetstream(), Settings.from_env(FAST_ENV).limits)
        async with Store(database_url) as store:
            for record in records:
                await store.add_client(record)
                stored = await store.get_client(record.name)
                assert stored is not None
                await publish_client(buckets.registry, stored)
    finally:
        await nc.drain()


def scrape(port: int) -> str:
    """The Prometheus text a component serves on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (all label sets)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


# The keys of one mode in `tidegate bench flood --json`: a stable shape.
MODE_KEYS = {
    "persist",
    "tasks",
    "submitted",
    "duplicates",
    "submit_s",
    "submit_per_s",
    "terminal_s",
    "tasks_per_s",
    "terminal",
    "succeeded",
    "completed",
    "commits",
    "poller_commits",
    "commits_per_task",
    "peak_commits_per_s",
    "write_commits",
    "peak_write_commits_1s",
    "commit_cap_per_s",
    "autovacuum_commits",
    "rows_written",
    "rows_per_task",
    "writes_by_kind",
    "routed_s",
    "route_wait_s",
    "error",
    "terminal_x_spawn",
    "submit_x_publish",
    "sensitive_clients",
    "sensitive_tasks",
    "callbacks_expected",
    "callbacks_received",
    "callback_duplicates",
    "callbacks_out_of_order",
    "callbacks_by_state",
    "callback_requests",
    "callbacks_s",
    "callbacks_per_s",
    "callback_latency_ms",
    "db_lag_ms",
    "usage",
    "timeline",
    "commit_samples",
}
