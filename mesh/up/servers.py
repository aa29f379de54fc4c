"""nats-server and PostgreSQL for `tidegate up`: embedded ones from their wheels, unless
`TIDEGATE_NATS_URL` / `TIDEGATE_DATABASE_URL` name running servers.

An embedded server that dies is started again on its data directory and port: the components
hold its URL and reconnect by themselves, and the flood goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidegate.backoff import Backoff
from tidegate.embedded.children import process_alive
from tidegate.embedded.natsauth import AuthFiles, url_with_credentials
from tidegate.embedded.servers import EmbeddedNats, EmbeddedPostgres
from tidegate.endpoints import redact
from tidegate.errors import EmbeddedServerError, TidegateError
from tidegate.up.supervisor import tail

log = logging.getLogger("tidegate.up")

# Quick at first: every component is waiting for the server.
REVIVE = Backoff(base_s=0.5, cap_s=10.0)
REVIVE_STABLE_AFTER_S = 60.0  # a server that ran this long before dying starts its count over
# Deaths soon after a start, and failed starts, in a row; then `up` gives up, loudly: something
# (a full disk, a damaged data directory) needs the operator, and restarting cannot fix it.
REVIVE_MAX_QUICK_FAILURES = 6


class ServerGaveUp(TidegateError):
    """An embedded server keeps dying; `up` stops and says where to look."""


@dataclass
class Revival:
    """Watches one embedded server and starts it again when it is gone."""

    name: str
    log_path: Path
    is_down: Callable[[], bool]
    start: Callable[[], object]  # raises EmbeddedServerError
    pid: Callable[[], int | None]
    threaded: bool = False  # start off the event loop (pg_ctl waits for the server)
    restarts: int = 0
    quick_failures: int = 0
    started_at: float = 0.0
    down_since: float | None = None
    next_try: float = 0.0
    last_pid: int | None = None

    async def round(self) -> bool:
        """True if the server was started again in this round."""
        now = time.monotonic()
        if self.down_since is None:
            if not self.is_down():
                self.last_pid = self.pid()
                return False
            self._failed(now, f"{self.name} (pid {self.last_pid}) DIED")
        if now < self.next_try:
            return False
        try:
            if self.threaded:
                await asyncio.to_thread(self.start)
            else:
                self.start()
        except EmbeddedServerError as exc:
            self._failed(time.monotonic(), f"{self.name} did not start again: {exc}")
            return False
        now = time.monotonic()
        assert self.down_since is not None
        self.restarts += 1
        self.last_pid = self.pid()
        log.warning(
            "%s restarted (pid %s) on the same data and port after %.1fs down (restart #%d)",
            self.name,
            self.last_pid,
            now - self.down_since,
            self.restarts,
        )
        self.started_at = now
        self.down_since = None
        return True

    def _failed(self, now: float, what: str) -> None:
        """Count a death or a failed start; schedule the next try, or give up."""
        if self.down_since is None:
            if now - self.started_at >= REVIVE_STABLE_AFTER_S:
                self.quick_failures = 0
            self.down_since = now
        self.quick_failures += 1
        if self.quick_failures > REVIVE_MAX_QUICK_FAILURES:
            raise ServerGaveUp(
                f"{what}; giving up after {REVIVE_MAX_QUICK_FAILURES} quick restarts failed. "
                f"See {self.log_path}, fix the cause and run `tidegate up` again"
            )
        delay = REVIVE.delay(self.quick_failures)
        self.next_try = now + delay
        log.error(
            "%s; restarting it in %.1fs (try %d of %d). Last lines of %s:\n%s",
            what,
            delay,
            self.quick_failures,
            REVIVE_MAX_QUICK_FAILURES,
            self.log_path,
            tail(self.log_path),
        )


class Servers:
    """The two servers of one run; an empty URL means "start the embedded one".

    An embedded nats-server with `nats_auth` admits only the users of `DATA_DIR/nats`
    (natsauth.py): each component and `auth_clients` client gets its own credentials
    (`url_for`). A server named by URL is configured by its operator: every component
    connects with that URL as it is."""

    def __init__(
        self,
        data_dir: Path,
        *,
        nats_url: str,
        database_url: str,
        nats_auth: bool = False,
        auth_clients: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.database_url = database_url
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.revivals: list[Revival] = []
        self.nats_auth = nats_auth
        self.auth_clients = auth_clients
        self.auth: AuthFiles | None = None
        self.passwords: dict[str, str] = {}  # user -> password of those `up` connects as

    def url_for(self, user: str) -> str:
        """The NATS URL `user` connects with (the plain URL when there is no auth)."""
        password = self.passwords.get(user)
        if password is None:
            return self.nats_url
        return url_with_credentials(self.nats_url, user, password)

    def start(self) -> None:
        if not self.nats_url:
            config = None
            if self.nats_auth:
                self.auth = AuthFiles(self.data_dir / "nats")
                self.passwords = self.auth.ensure(self.auth_clients)
                config = self.auth.conf
            nats = self.nats = EmbeddedNats(self.data_dir / "nats", config_file=config)
            self.nats_url = nats.start()
            log.info("nats-server up at %s (pid %d)", self.nats_url, self.nats_pid())
            self.revivals.append(
                Revival(
                    "nats-server",
                    nats.log_path,
                    is_down=self.nats_exited,
                    start=nats.start,
                    pid=self.nats_pid,
                    started_at=time.monotonic(),
                )
            )
        if not self.database_url:
            pg = self.postgres = EmbeddedPostgres(self.data_dir)
            self.database_url = pg.start()
            log.info("postgres up at %s (pid %s)", redact(self.database_url), self.postgres_pid())
            self.revivals.append(
                Revival(
                    "postgres",
                    pg.log_path,
                    is_down=lambda: not process_alive(self.postgres_pid()),
                    start=pg.start,
                    pid=self.postgres_pid,
                    threaded=True,
                    started_at=time.monotonic(),
                )
            )

    async def heal(self) -> list[str]:
        """One round: start again an embedded server that died; the names of those started.

        Raises `ServerGaveUp` once one has failed too often in a row."""
        return [r.name for r in self.revivals if await r.round()]

    def restarts(self) -> dict[str, int]:
        return {r.name: r.restarts for r in self.revivals}

    def stop(self) -> None:
        if self.postgres is not None:
            try:
                self.postgres.stop()
            except TidegateError as exc:
                log.error("could not stop postgres: %s", exc)
            self.postgres = None
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

    def nats_pid(self) -> int | None:
        return self.nats.proc.pid if self.nats is not None and self.nats.proc else None

    def postgres_pid(self) -> int | None:
        if self.postgres is None:
            return None
        try:
            return int((self.postgres.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def nats_exited(self) -> bool:
        """True once an embedded nats-server has exited (never for one we did not start)."""
        proc = self.nats.proc if self.nats is not None else None
        return proc is not None and proc.poll() is not None
