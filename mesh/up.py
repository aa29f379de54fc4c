"""`tidegate up`: the whole system on one machine, on embedded servers, until Ctrl-C.

It starts nats-server and PostgreSQL from their wheels (unless `TIDEGATE_NATS_URL` /
`TIDEGATE_DATABASE_URL` name running servers), applies the migrations, registers the `demo`
client, and runs a driver, executors and the console as supervised child processes. Everything
it starts can be found again from the data directory, so a run that was killed with SIGKILL is
cleaned up by the next `tidegate up` on the same directory.

Layout of the data directory:

    endpoints.json      the addresses (read by the other commands), removed on a clean stop
    run/<name>.pid      each child's pid; run/up.lock is held while `up` runs
    logs/<name>.log     each child's output (executors also keep task logs here)
    nats/, pg/          the embedded servers' state
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

from mesh.cli import ENDPOINTS_FILE
from mesh.config import Settings
from mesh.embedded import EmbeddedNats, EmbeddedPostgres, die_with_parent, free_port
from mesh.errors import ConfigError, TidegateError

log = logging.getLogger("tidegate.up")

DEMO_CLIENT = "demo"
DEMO_INTERVAL_S = 5.0
OPERATOR_LOGIN = "none yet (the console has no login; it listens on loopback only)"

POLL_S = 0.25
RESTART_BACKOFF_S = (1.0, 30.0)  # first delay, cap; doubles per crash in a row
STABLE_AFTER_S = 60.0  # a child that ran this long before crashing starts over at 1 s
CONSOLE_READY_S = 30.0
STALE_GRACE_S = 5.0
# Executors finish their running tasks on SIGTERM (up to drain_timeout_s); then this margin.
STOP_MARGIN_S = 5.0
NO_NATS_GRACE_S = 3.0


class UpError(TidegateError):
    """`tidegate up` cannot run; the message says what to change."""


# --- children ---------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised component process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time before which a crashed child is not restarted
    backoff_s: float = RESTART_BACKOFF_S[0]

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

    def add(self, name: str, *args: str) -> None:
        # --data-dir on the command line (not only in the environment) makes the child
        # recognisable in `ps` and to the stale-process cleanup of a later run.
        argv = [sys.executable, "-m", "mesh.cli", "--data-dir", str(self.data_dir), *args]
        self.children.append(Child(name=name, argv=argv))

    def start(self, child: Child) -> None:
        # Popen runs on the main thread only: PR_SET_PDEATHSIG fires when the *thread* that
        # forked the child ends, so a child started from a worker thread would die with it.
        with open(self.log_path(child), "ab") as out:
            out.write(f"--- started by tidegate up at {time.strftime('%F %T')} ---\n".encode())
            out.flush()
            # Own process group: a Ctrl-C in the terminal reaches `up` only, which then stops
            # the children in order instead of all of them racing each other.
            child.proc = subprocess.Popen(
                child.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                process_group=0,
            )  # fmt: skip
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
                    child.backoff_s = RESTART_BACKOFF_S[0]
                child.restarts += 1
                child.next_start = now + child.backoff_s
                log.error(
                    "%s (pid %d) DIED with exit code %s; restart #%d in %.0fs. Last lines of %s:"
                    "\n%s",
                    child.name, child.proc.pid, code, child.restarts, child.backoff_s,
                    self.log_path(child), _tail(self.log_path(child)),
                )  # fmt: skip
                child.backoff_s = min(child.backoff_s * 2, RESTART_BACKOFF_S[1])
                child.proc = None
            if child.proc is None and now >= child.next_start:
                self.start(child)
                changed = True
        if changed and self.on_change:
            self.on_change()

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children if c.proc is not None}

    def signal_all(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child.alive():
                assert child.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

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


def _tail(path: Path, lines: int = 15) -> str:
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
        if "mesh.cli" in cmdline and str(data_dir) in cmdline:
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


def kill_trees(procs: list[psutil.Process], timeout: float = STALE_GRACE_S) -> None:
    """SIGKILL processes and their descendants: an executor killed this way cannot stop its
    tasks, which run in sessions of their own and would otherwise outlive it."""
    victims: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            victims.extend(proc.children(recursive=True))
        victims.append(proc)
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=timeout)


# --- helpers ------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """A connection string fit to print: the password replaced by `***`."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections a previous console closed may linger in TIME_WAIT.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(
                f"console port {port} is in use (another `tidegate up`?); pass "
                "--console-port with a free port, or --console-port 0 for any free port"
            ) from None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomic, so a reader never sees half a file; private, as a URL may hold a password."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def _postgres_pid(pg: EmbeddedPostgres) -> int | None:
    try:
        return int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


# --- the run ------------------------------------------------------------------------------------


class Up:
    def __init__(
        self, settings: Settings, *, executors: int, console_port: int, slots: int, demo: bool
    ) -> None:
        if executors < 0:
            raise ConfigError(f"--executors must be 0 or more, not {executors}")
        if slots < 1:
            raise ConfigError(f"--slots must be 1 or more, not {slots}")
        self.settings = settings
        self.data_dir = settings.connection.data_dir.resolve()
        self.executors = executors
        self.slots = slots
        self.demo = demo
        self.console_port = console_port
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.nats_url = settings.connection.nats_url
        self.database_url = settings.connection.database_url
        self.children: Children | None = None
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()  # a second Ctrl-C: kill the children now
        self.exit_code = 0
        self.announced = False
        self.metrics_ports: dict[str, int] = {}
        self._lock: IO[str] | None = None

    @property
    def endpoints_path(self) -> Path:
        return self.data_dir / ENDPOINTS_FILE

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def run(self) -> int:
        for sub in ("", "run", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._take_lock()
        # Until the event loop installs its handlers, SIGTERM must unwind like Ctrl-C does,
        # so the servers started so far are stopped by the `finally` below.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            stop_stale_children(self.data_dir)
            self.endpoints_path.unlink(missing_ok=True)
            if self.console_port == 0:
                self.console_port = free_port()
            _check_port_free(self.console_port)
            self._start_servers()
            asyncio.run(self._serve())
            return self.exit_code
        finally:
            # Cleanup must finish even if the operator keeps pressing Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                if self.children is not None:
                    self.children.reap()
                self._stop_servers()
                self.endpoints_path.unlink(missing_ok=True)
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, previous)
                self._release_lock()

    # --- one `up` per directory ---

    def _take_lock(self) -> None:
        # flock, not a pid file: the kernel drops it when its holder dies, even by SIGKILL.
        lock = open(self.data_dir / "run" / "up.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise UpError(
                f"`tidegate up` is already running on {self.data_dir} (pid {holder}); stop it "
                "first, or use another --data-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- servers ---

    def _start_servers(self) -> None:
        if not self.nats_url:
            self.nats = EmbeddedNats(self.data_dir / "nats")
            self.nats_url = self.nats.start()
            log.info("nats-server up at %s (pid %d)", self.nats_url, self._nats_pid())
        if not self.database_url:
            self.postgres = EmbeddedPostgres(self.data_dir)
            self.database_url = self.postgres.start()
            log.info("postgres up at %s (pid %s)", self.database_url, _postgres_pid(self.postgres))

    def _nats_pid(self) -> int | None:
        return self.nats.proc.pid if self.nats is not None and self.nats.proc else None

    def _stop_servers(self) -> None:
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except TidegateError as exc:
                log.error("could not stop postgres: %s", exc)
            self.postgres = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def _server_died(self) -> str | None:
        if self.nats is not None and self._embedded_nats_exited():
            return f"nats-server exited; see {self.nats.log_path}"
        if self.postgres is not None and not _process_alive(_postgres_pid(self.postgres)):
            return f"postgres is gone; see {self.postgres.log_path}"
        return None

    # --- the event loop part ---

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await prepare(self.nats_url, self.database_url, self.settings)
        self.children = self._plan_children()
        self.children.on_change = self._write_endpoints
        self.children.start_all()
        demo = asyncio.create_task(demo_loop(self.nats_url)) if self.demo else None
        try:
            await self._wait_console()
            if not self.stopping.is_set():
                self.announced = True
                self._write_endpoints()
                self._print_banner()
            await self._supervise()
        finally:
            if demo is not None:
                demo.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await demo
            await self._stop_children()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        log.info("stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("%s again: killing the components now", sig.name)
            self.hurry.set()
            return
        log.info("%s: stopping (press Ctrl-C again to kill the components at once)", sig.name)
        self.stopping.set()

    def _plan_children(self) -> Children:
        env = dict(os.environ)
        env.update(
            TIDEGATE_NATS_URL=self.nats_url,
            TIDEGATE_DATABASE_URL=self.database_url,
            TIDEGATE_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",  # their logs should reach logs/*.log as they happen
        )
        children = Children(self.data_dir, env)
        # Each component its own /metrics port, fixed for the run so a restart keeps it.
        self.metrics_ports["driver"] = free_port()
        children.add("driver", "driver", "--metrics-port", str(self.metrics_ports["driver"]))
        for i in range(self.executors):
            name = f"exec-{i}"
            self.metrics_ports[name] = free_port()
            children.add(
                name, "executor", "--pool", self.settings.executor.pool,
                "--slots", str(self.slots), "--executor-id", name,
                "--metrics-port", str(self.metrics_ports[name]),
            )  # fmt: skip
        children.add("console", "console", "--port", str(self.console_port))
        return children

    async def _wait_console(self) -> None:
        """Announce the addresses only once the console answers (or clearly does not)."""
        deadline = time.monotonic() + CONSOLE_READY_S
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.console_port)
                writer.close()
                return
            if time.monotonic() > deadline:
                log.warning(
                    "the console does not answer on %s yet; see %s",
                    self.console_url, self.data_dir / "logs" / "console.log",
                )  # fmt: skip
                return
            assert self.children is not None
            self.children.supervise()
            await asyncio.sleep(POLL_S)

    async def _supervise(self) -> None:
        assert self.children is not None
        while not self.stopping.is_set():
            died = self._server_died()
            if died is not None:
                # The signal that stops us may be the one that stopped the server: look again.
                await asyncio.sleep(0.5)
                if self.stopping.is_set():
                    return
                log.error("%s; stopping everything (run `tidegate up` again)", died)
                self.exit_code = 1
                return
            self.children.supervise()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), POLL_S)

    async def _stop_children(self) -> None:
        if self.children is None:
            return
        self.children.signal_all(signal.SIGTERM)
        limit = self.settings.executor.drain_timeout_s + STOP_MARGIN_S
        started = time.monotonic()
        deadline = started + limit
        nats_gone = False
        while self.children.any_alive() and not self.hurry.is_set():
            if time.monotonic() > deadline:
                waited = time.monotonic() - started
                log.warning("components still running after %.0fs: killing them", waited)
                break
            if not nats_gone and self._embedded_nats_exited():
                # A Ctrl-C in the terminal also reaches nats-server (same process group):
                # without it nothing can be handed off, so waiting for drains only delays.
                # Unacknowledged work is redelivered on the next start.
                nats_gone = True
                deadline = min(deadline, time.monotonic() + NO_NATS_GRACE_S)
                log.warning(
                    "nats-server has stopped; giving the components %.0fs, then killing them",
                    NO_NATS_GRACE_S,
                )  # fmt: skip
            await asyncio.sleep(0.1)
        self.children.reap()

    def _embedded_nats_exited(self) -> bool:
        proc = self.nats.proc if self.nats is not None else None
        return proc is not None and proc.poll() is not None

    # --- telling the operator ---

    def _endpoints(self) -> dict[str, Any]:
        pids: dict[str, int | None] = {"up": os.getpid()}
        if self.nats is not None:
            pids["nats-server"] = self._nats_pid()
        if self.postgres is not None:
            pids["postgres"] = _postgres_pid(self.postgres)
        if self.children is not None:
            pids.update(self.children.pids())
        return {
            "nats_url": self.nats_url,
            "database_url": self.database_url,
            "console_url": self.console_url,
            "data_dir": str(self.data_dir),
            "operator_login": OPERATOR_LOGIN,
            "metrics": {
                name: f"http://127.0.0.1:{port}/metrics"
                for name, port in self.metrics_ports.items()
            },
            "embedded": {"nats": self.nats is not None, "postgres": self.postgres is not None},
            "pids": pids,
        }

    def _write_endpoints(self) -> None:
        # Only once announced: the file's appearance means "ready", so tests and scripts wait
        # for it; afterwards a restarted child's new pid is written.
        if self.announced and not self.stopping.is_set():
            _write_json(self.endpoints_path, self._endpoints())

    def _print_banner(self) -> None:
        default_dir = Path("tidegate-data").resolve()
        hint = "" if self.data_dir == default_dir else f" --data-dir {self.data_dir}"
        names = ", ".join(c.name for c in self.children.children) if self.children else ""
        metrics = ", ".join(f"{n} :{p}" for n, p in self.metrics_ports.items())
        print(
            f"Tidegate is up; data in {self.data_dir}\n"
            f"  NATS:           {redact(self.nats_url)}\n"
            f"  database:       {redact(self.database_url)}\n"
            f"  console:        {self.console_url}\n"
            f"  operator login: {OPERATOR_LOGIN}\n"
            f"  components:     {names} (logs in {self.data_dir / 'logs'})\n"
            f"  metrics:        {metrics}\n"
            f"  written to:     {self.endpoints_path}\n"
            f"Try:  tidegate{hint} submit --client {DEMO_CLIENT} -- echo hi\n"
            f"      tidegate{hint} tasks\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def prepare(nats_url: str, database_url: str, settings: Settings) -> None:
    """Schema, streams and the `demo` client, before any component or submission needs them."""
    import nats

    from mesh.clients import publish_client
    from mesh.store.migrate import migrate
    from mesh.store.store import ClientRecord, Store
    from mesh.topology import ensure_all

    applied = await migrate(database_url)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    try:
        nc = await nats.connect(
            nats_url, name="tidegate-up", connect_timeout=5, max_reconnect_attempts=3
        )
    except Exception as exc:
        raise UpError(
            f"cannot reach NATS at {redact(nats_url)} ({exc or type(exc).__name__}); "
            "check TIDEGATE_NATS_URL, or unset it to use the embedded server"
        ) from exc
    try:
        # The streams exist before the addresses are announced, so a submission made the
        # moment endpoints.json appears is accepted even if the driver is still starting.
        buckets = await ensure_all(nc.jetstream(), settings.limits)
        async with Store(database_url, min_size=1, max_size=1, name="tidegate-up") as store:
            record = await store.get_client(DEMO_CLIENT)
            if record is None:
                record = await store.add_client(ClientRecord(name=DEMO_CLIENT))
                log.info("registered client %r", DEMO_CLIENT)
            await publish_client(buckets.clients, record)
    finally:
        await nc.drain()


async def demo_loop(nats_url: str, interval_s: float = DEMO_INTERVAL_S) -> None:
    """Submit `echo hello from tidegate` as client `demo` every few seconds, until cancelled."""
    from mesh.client import TidegateClient
    from mesh.wire import TaskSpec

    run = time.strftime("%Y%m%dT%H%M%S")
    n = 0
    while True:
        try:
            async with await TidegateClient.connect(nats_url, DEMO_CLIENT) as tg:
                while True:
                    n += 1
                    receipt = await tg.submit(TaskSpec(
                        key=f"demo-{run}-{n}", argv=["echo", "hello from tidegate"],
                        labels={"name": "demo"}, timeout_s=60,
                    ))  # fmt: skip
                    log.info("demo: submitted %s", receipt.task_id)
                    await asyncio.sleep(interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("demo: submitting failed (%s); trying again in %.0fs", exc, interval_s)
            await asyncio.sleep(interval_s)


def run_up(settings: Settings, *, executors: int, console_port: int, slots: int, demo: bool) -> int:
    """Run the whole system until SIGINT/SIGTERM; 0 after a clean stop."""
    up = Up(settings, executors=executors, console_port=console_port, slots=slots, demo=demo)
    return up.run()
