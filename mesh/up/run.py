"""The run of `tidegate up`: servers, then components, supervised until a signal stops all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import IO

import nats

from tidegate.bus.natsconn import servers
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.embedded.natsauth import client_user
from tidegate.embedded.servers import free_port
from tidegate.endpoints import OperatorLogin, endpoints_path, write_endpoints
from tidegate.errors import ConfigError
from tidegate.up.announce import banner, endpoints
from tidegate.up.demo import DEMO_CLIENT, demo_loop
from tidegate.up.prepare import check_port_free, prepare, take_lock
from tidegate.up.servers import ServerGaveUp, Servers
from tidegate.up.supervisor import Children, stop_stale_children
from tidegate.urlpolicy import LOCAL_CALLBACK_NETS

log = logging.getLogger("tidegate.up")

POLL_S = 0.25
CONSOLE_READY_S = 30.0
# Executors finish their running tasks on SIGTERM (up to drain_timeout_s); then this margin.
STOP_MARGIN_S = 5.0
NO_NATS_GRACE_S = 3.0


class Up:
    def __init__(
        self,
        settings: Settings,
        *,
        executors: int,
        console_port: int,
        slots: int,
        demo: bool,
        nats_auth: bool = True,
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
        self.servers = Servers(
            self.data_dir,
            nats_url=settings.connection.nats_url,
            database_url=settings.connection.database_url,
            nats_auth=nats_auth,
            auth_clients=(DEMO_CLIENT,),
        )
        self.children: Children | None = None
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()  # a second Ctrl-C: kill the children now
        self.exit_code = 0
        self.announced = False
        self.metrics_ports: dict[str, int] = {}
        self.operator: OperatorLogin | None = None
        self._lock: IO[str] | None = None

    @property
    def endpoints_path(self) -> Path:
        return endpoints_path(self.data_dir)

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def run(self) -> int:
        for sub in ("", "run", "logs"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._lock = take_lock(self.data_dir)
        # Until the event loop installs its handlers, SIGTERM must unwind like Ctrl-C does,
        # so the servers started so far are stopped by the `finally` below.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            stop_stale_children(self.data_dir)
            self.endpoints_path.unlink(missing_ok=True)
            if self.console_port == 0:
                self.console_port = free_port()
            check_port_free(self.console_port)
            self.servers.start()
            asyncio.run(self._serve())
            return self.exit_code
        finally:
            # Cleanup must finish even if the operator keeps pressing Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                if self.children is not None:
                    self.children.reap()
                self.servers.stop()
                self.endpoints_path.unlink(missing_ok=True)
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, previous)
                self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- the event loop part ---

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.operator = await prepare(
            self.servers.url_for("operator"), self.servers.database_url, self.settings
        )
        self.children = self._plan_children()
        self.children.on_change = self._write_endpoints
        self.children.start_all()
        demo_url = self.servers.url_for(client_user(DEMO_CLIENT))
        demo = asyncio.create_task(demo_loop(demo_url)) if self.demo else None
        try:
            await self._wait_console()
            if not self.stopping.is_set():
                self.announced = True
                self._write_endpoints()
                print(
                    banner(
                        self.servers,
                        self.children,
                        console_url=self.console_url,
                        metrics_ports=self.metrics_ports,
                        endpoints_path=self.endpoints_path,
                        operator=self.operator,
                    ),
                    flush=True,
                )
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
            TIDEGATE_NATS_URL=self.servers.nats_url,
            TIDEGATE_DATABASE_URL=self.servers.database_url,
            TIDEGATE_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",  # their logs should reach logs/*.log as they happen
        )
        # A machine of one's own: the demo client's receiver is on loopback (announced).
        env.setdefault("TIDEGATE_CALLBACK_ALLOW_NETS", LOCAL_CALLBACK_NETS)
        children = Children(self.data_dir, env)
        # Each component its own /metrics port, fixed for the run so a restart keeps it.
        self.metrics_ports["driver"] = free_port()
        # Each kind of component connects as itself, with only its own permissions.
        url = self.servers.url_for
        children.add(
            "driver",
            "driver",
            "--metrics-port",
            str(self.metrics_ports["driver"]),
            env={"TIDEGATE_NATS_URL": url("driver")},
        )
        for i in range(self.executors):
            name = f"exec-{i}"
            self.metrics_ports[name] = free_port()
            children.add(
                name,
                "executor",
                "--pool",
                self.settings.executor.pool,
                "--slots",
                str(self.slots),
                "--executor-id",
                name,
                "--metrics-port",
                str(self.metrics_ports[name]),
                env={"TIDEGATE_NATS_URL": url("executor")},
            )
        children.add(
            "console",
            "console",
            "--port",
            str(self.console_port),
            env={"TIDEGATE_NATS_URL": url("console")},
        )
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
                    self.console_url,
                    self.data_dir / "logs" / "console.log",
                )
                return
            assert self.children is not None
            self.children.supervise()
            await asyncio.sleep(POLL_S)

    async def _supervise(self) -> None:
        assert self.children is not None
        while not self.stopping.is_set():
            try:
                back = await self.servers.heal()
            except ServerGaveUp as exc:
                log.error("%s; stopping everything", exc)
                self.exit_code = 1
                return
            if "nats-server" in back:
                await self._restore_topology()
            if back:
                self._write_endpoints()  # the servers' new pids
            self.children.supervise()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), POLL_S)

    async def _restore_topology(self) -> None:
        """After a nats-server restart: the in-memory buckets (heartbeats, leases, rates) died
        with it; the streams and file buckets are back from disk."""
        try:
            nc = await nats.connect(
                servers(self.servers.url_for("operator")), name="tidegate-up", connect_timeout=5
            )
            try:
                await ensure_all(nc.jetstream(), self.settings.limits)
            finally:
                await nc.close()
        except Exception as exc:  # the components create what they miss on their next start
            log.error("could not restore the JetStream topology after the restart: %s", exc)

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
            if not nats_gone and self.servers.nats_exited():
                # A Ctrl-C in the terminal also reaches nats-server (same process group):
                # without it nothing can be handed off, so waiting for drains only delays.
                # Unacknowledged work is redelivered on the next start.
                nats_gone = True
                deadline = min(deadline, time.monotonic() + NO_NATS_GRACE_S)
                log.warning(
                    "nats-server has stopped; giving the components %.0fs, then killing them",
                    NO_NATS_GRACE_S,
                )
            await asyncio.sleep(0.1)
        self.children.reap()

    def _write_endpoints(self) -> None:
        # Only once announced: the file's appearance means "ready", so tests and scripts wait
        # for it; afterwards a restarted child's new pid is written.
        if self.announced and not self.stopping.is_set():
            write_endpoints(
                self.endpoints_path,
                endpoints(
                    self.servers,
                    self.children,
                    console_url=self.console_url,
                    metrics_ports=self.metrics_ports,
                    operator=self.operator,
                ),
            )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_up(
    settings: Settings,
    *,
    executors: int,
    console_port: int,
    slots: int,
    demo: bool,
    nats_auth: bool = True,
) -> int:
    """Run the whole system until SIGINT/SIGTERM; 0 after a clean stop."""
    up = Up(
        settings,
        executors=executors,
        console_port=console_port,
        slots=slots,
        demo=demo,
        nats_auth=nats_auth,
    )
    return up.run()
