"""`DATA_DIR/endpoints.json`: how every command finds a running `tidegate up`.

`tidegate up` writes it (atomically, private to its user: a URL may hold a password); the other
commands read it when `TIDEGATE_NATS_URL` / `TIDEGATE_DATABASE_URL` are not set.

`DATA_DIR/operator.json` keeps the console login `up` generated for its first operator: the
database holds only the password's hash, so this file is what lets a later `up` on the same
directory show the same login again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.config import Connection, Settings
from tidegate.errors import ConfigError
from tidegate.urlpolicy import Net, parse_nets

ENDPOINTS_FILE = "endpoints.json"
OPERATOR_FILE = "operator.json"


@dataclass(frozen=True, slots=True)
class OperatorLogin:
    """A console login in clear text: only ever the one `tidegate up` generated."""

    username: str
    password: str

    def as_json(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}


def endpoints_path(data_dir: Path) -> Path:
    return data_dir / ENDPOINTS_FILE


def resolve_connection(settings: Settings) -> Connection:
    """URLs from the environment, else from the endpoints file a running `tidegate up` wrote."""
    conn = settings.connection
    if conn.nats_url and conn.database_url:
        return conn
    path = endpoints_path(conn.data_dir)
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            "no servers configured: set TIDEGATE_NATS_URL and TIDEGATE_DATABASE_URL, "
            f"or start `tidegate up` (it writes {path})"
        ) from None
    # `replace`: every other field of the connection (TLS, …) is kept as configured.
    return dataclasses.replace(
        conn,
        nats_url=conn.nats_url or found["nats_url"],
        database_url=conn.database_url or found["database_url"],
    )


def callback_nets(settings: Settings) -> tuple[Net, ...]:
    """The ranges callbacks may reach: the environment's, else those of the running `tidegate
    up` (a command beside it must accept the callback URLs its drivers will call)."""
    if settings.driver.callback_allow_nets:
        return parse_nets(settings.driver.callback_allow_nets)
    try:
        found = json.loads(endpoints_path(settings.connection.data_dir).read_text())
    except (OSError, ValueError):
        return ()
    value = found.get("callback_allow_nets", "") if isinstance(found, dict) else ""
    return parse_nets(value) if isinstance(value, str) else ()


def nats_users_dir(settings: Settings) -> Path | None:
    """Where the NATS users of this deployment are kept (natsauth.py): those of the running
    `tidegate up` (endpoints.json names its `auth.conf`), else `DATA_DIR/nats` if an operator
    keeps an existing cluster's users there; None: the server's users are not Tidegate's."""
    try:
        found = json.loads(endpoints_path(settings.connection.data_dir).read_text())
    except (OSError, ValueError):
        found = None
    if isinstance(found, dict) and "nats_auth" in found:
        auth = found["nats_auth"]  # null: that `up` runs without users (--no-nats-auth)
        conf = auth.get("auth_conf") if isinstance(auth, dict) else None
        return Path(conf).parent if isinstance(conf, str) and conf else None
    own = settings.connection.data_dir / "nats"
    return own if (own / "users.json").exists() else None


def with_connection(settings: Settings) -> Settings:
    """`settings` with the servers resolved as `resolve_connection` does."""
    return settings.replace(connection=resolve_connection(settings))


def write_endpoints(path: Path, value: dict[str, Any]) -> None:
    """Atomic, so a reader never sees half a file; private, as a URL may hold a password."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def read_operator_login(data_dir: Path) -> OperatorLogin | None:
    """The login `up` saved in this data directory, or None (none saved, or unreadable)."""
    try:
        found = json.loads((data_dir / OPERATOR_FILE).read_text())
        return OperatorLogin(username=str(found["username"]), password=str(found["password"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_operator_login(data_dir: Path, login: OperatorLogin) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    write_endpoints(data_dir / OPERATOR_FILE, login.as_json())


def redact(url: str) -> str:
    """A connection string fit to print: the password replaced by `***`."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)
