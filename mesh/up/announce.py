"""Telling the operator where a running `tidegate up` is: endpoints.json and the banner."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tidegate.endpoints import OPERATOR_LOGIN, redact
from tidegate.up.demo import DEMO_CLIENT
from tidegate.up.servers import Servers
from tidegate.up.supervisor import Children


def endpoints(
    servers: Servers,
    children: Children | None,
    *,
    console_url: str,
    metrics_ports: Mapping[str, int],
) -> dict[str, Any]:
    """The contents of endpoints.json."""
    pids: dict[str, int | None] = {"up": os.getpid()}
    if servers.nats is not None:
        pids["nats-server"] = servers.nats_pid()
    if servers.postgres is not None:
        pids["postgres"] = servers.postgres_pid()
    if children is not None:
        pids.update(children.pids())
    return {
        "nats_url": servers.nats_url,
        "database_url": servers.database_url,
        "console_url": console_url,
        "data_dir": str(servers.data_dir),
        "operator_login": OPERATOR_LOGIN,
        "metrics": {
            name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()
        },
        "embedded": {"nats": servers.nats is not None, "postgres": servers.postgres is not None},
        "pids": pids,
    }


def banner(
    servers: Servers,
    children: Children | None,
    *,
    console_url: str,
    metrics_ports: Mapping[str, int],
    endpoints_path: Path,
) -> str:
    """What `up` prints once the console answers: the addresses and commands to try."""
    data_dir = servers.data_dir
    default_dir = Path("tidegate-data").resolve()
    hint = "" if data_dir == default_dir else f" --data-dir {data_dir}"
    names = ", ".join(c.name for c in children.children) if children else ""
    metrics = ", ".join(f"{n} :{p}" for n, p in metrics_ports.items())
    return (
        f"Tidegate is up; data in {data_dir}\n"
        f"  NATS:           {redact(servers.nats_url)}\n"
        f"  database:       {redact(servers.database_url)}\n"
        f"  console:        {console_url}\n"
        f"  operator login: {OPERATOR_LOGIN}\n"
        f"  components:     {names} (logs in {data_dir / 'logs'})\n"
        f"  metrics:        {metrics}\n"
        f"  written to:     {endpoints_path}\n"
        f"Try:  tidegate{hint} submit --client {DEMO_CLIENT} -- echo hi\n"
        f"      tidegate{hint} tasks\n"
        "Press Ctrl-C to stop."
    )
