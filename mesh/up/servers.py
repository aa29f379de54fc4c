"""nats-server and PostgreSQL for `tidegate up`: embedded ones from their wheels, unless
`TIDEGATE_NATS_URL` / `TIDEGATE_DATABASE_URL` name running servers."""

from __future__ import annotations

import logging
from pathlib import Path

from tidegate.embedded.children import process_alive
from tidegate.embedded.servers import EmbeddedNats, EmbeddedPostgres
from tidegate.errors import TidegateError

log = logging.getLogger("tidegate.up")


class Servers:
    """The two servers of one run; an empty URL means "start the embedded one"."""

    def __init__(self, data_dir: Path, *, nats_url: str, database_url: str) -> None:
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.database_url = database_url
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None

    def start(self) -> None:
        if not self.nats_url:
            self.nats = EmbeddedNats(self.data_dir / "nats")
            self.nats_url = self.nats.start()
            log.info("nats-server up at %s (pid %d)", self.nats_url, self.nats_pid())
        if not self.database_url:
            self.postgres = EmbeddedPostgres(self.data_dir)
            self.database_url = self.postgres.start()
            log.info("postgres up at %s (pid %s)", self.database_url, self.postgres_pid())

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

    def died(self) -> str | None:
        """What went wrong if an embedded server is gone, else None."""
        if self.nats is not None and self.nats_exited():
            return f"nats-server exited; see {self.nats.log_path}"
        if self.postgres is not None and not process_alive(self.postgres_pid()):
            return f"postgres is gone; see {self.postgres.log_path}"
        return None
