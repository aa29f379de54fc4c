"""Before `tidegate up` starts any component: the checks that refuse to run, then the schema,
the streams, the `demo` client and the console's first operator."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

import nats

from tidegate.bus.clients import publish_client
from tidegate.bus.natsconn import servers
from tidegate.bus.topology import ensure_all
from tidegate.config import Settings
from tidegate.endpoints import OperatorLogin, redact
from tidegate.errors import ConfigError, TidegateError
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.up.demo import DEMO_CLIENT
from tidegate.up.login import first_login
from tidegate.wire import ClientRecord

log = logging.getLogger("tidegate.up")


class UpError(TidegateError):
    """`tidegate up` cannot run; the message says what to change."""


def take_lock(data_dir: Path) -> IO[str]:
    """Hold run/up.lock (closing the file lets go): one `up` per data directory."""
    # flock, not a pid file: the kernel drops it when its holder dies, even by SIGKILL.
    lock = open(data_dir / "run" / "up.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UpError(
            f"`tidegate up` is already running on {data_dir} (pid {holder}); stop it "
            "first, or use another --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_port_free(port: int) -> None:
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


async def prepare(nats_url: str, database_url: str, settings: Settings) -> OperatorLogin | None:
    """Schema, streams and the `demo` client, before any component or submission needs them;
    returns the console login to show (None: the operators were made by someone else)."""
    applied = await migrate(database_url)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    try:
        nc = await nats.connect(
            servers(nats_url), name="tidegate-up", connect_timeout=5, max_reconnect_attempts=3
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
            await publish_client(buckets.registry, record)
            return await first_login(store, settings.connection.data_dir.resolve())
    finally:
        await nc.drain()
