"""`DATA_DIR/endpoints.json`: how every command finds a running `tidegate up`.

`tidegate up` writes it (atomically, private to its user: a URL may hold a password); the other
commands read it when `TIDEGATE_NATS_URL` / `TIDEGATE_DATABASE_URL` are not set.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tidegate.config import Connection, Settings
from tidegate.errors import ConfigError

ENDPOINTS_FILE = "endpoints.json"
OPERATOR_LOGIN = "none yet (the console has no login; it listens on loopback only)"


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
    return Connection(
        nats_url=conn.nats_url or found["nats_url"],
        database_url=conn.database_url or found["database_url"],
        data_dir=conn.data_dir,
    )


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


def redact(url: str) -> str:
    """A connection string fit to print: the password replaced by `***`."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)
