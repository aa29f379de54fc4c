"""Telling the operator where a running `tidegate up` is: endpoints.json and the banner."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tidegate.endpoints import OperatorLogin, redact
from tidegate.up.demo import DEMO_CLIENT
from tidegate.up.servers import Servers
from tidegate.up.supervisor import Children


def endpoints(
    servers: Servers,
    children: Children | None,
    *,
    console_url: str,
    metrics_ports: Mapping[str, int],
    operator: OperatorLogin | None = None,
) -> dict[str, Any]:
    """The contents of endpoints.json (`operator` is null when `up` knows no password)."""
    pids: dict[str, int | None] = {"up": os.getpid()}
    if servers.nats is not None:
        pids["nats-server"] = servers.nats_pid()
    if servers.postgres is not None:
        pids["postgres"] = servers.postgres_pid()
    restarts = servers.restarts()  # how often each died and was started again by `up`
    if children is not None:
        pids.update(children.pids())
        restarts.update({c.name: c.restarts for c in children.children})
    return {
        # The operator's own credentials are in it (when the embedded server has users):
        # the commands beside this `up` connect as the operator.
        "nats_url": servers.url_for("operator"),
        "nats_auth": None
        if servers.auth is None
        else {"user": "operator", "auth_conf": str(servers.auth.conf)},
        "database_url": servers.database_url,
        "console_url": console_url,
        "data_dir": str(servers.data_dir),
        "operator": None if operator is None else operator.as_json(),
        "metrics": {
            name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()
        },
        "embedded": {"nats": servers.nats is not None, "postgres": servers.postgres is not None},
        "pids": pids,
        "restarts": restarts,
        # The commands beside this `up` accept the callback URLs its drivers will call.
        "callback_allow_nets": (children.env if children else {}).get(
            "TIDEGATE_CALLBACK_ALLOW_NETS", ""
        ),
    }


def banner(
    servers: Servers,
    children: Children | None,
    *,
    console_url: str,
    metrics_ports: Mapping[str, int],
    endpoints_path: Path,
    operator: OperatorLogin | None = None,
) -> str:
    """What `up` prints once the console answers: the addresses and commands to try."""
    allowed_nets = (children.env if children else {}).get("TIDEGATE_CALLBACK_ALLOW_NETS", "")
    allowed_nets = allowed_nets or "no internal address"
    data_dir = servers.data_dir
    default_dir = Path("tidegate-data").resolve()
    hint = "" if data_dir == default_dir else f" --data-dir {data_dir}"
    names = ", ".join(c.name for c in children.children) if children else ""
    metrics = ", ".join(f"{n} :{p}" for n, p in metrics_ports.items())
    return (
        f"Tidegate is up; data in {data_dir}\n"
        f"  NATS:           {nats_line(servers)}\n"
        f"  database:       {redact(servers.database_url)}\n"
        f"  console:        {console_url}\n"
        f"  operator login: {login_line(operator, hint)}\n"
        f"  components:     {names} (logs in {data_dir / 'logs'})\n"
        f"  metrics:        {metrics}\n"
        f"  callbacks:      may go to {allowed_nets} (TIDEGATE_CALLBACK_ALLOW_NETS; a production "
        "deployment allows no internal range by default)\n"
        f"  written to:     {endpoints_path}\n"
        f"Try:  tidegate{hint} submit --client {DEMO_CLIENT} -- echo hi\n"
        f"      tidegate{hint} tasks\n"
        "Press Ctrl-C to stop."
    )


def nats_line(servers: Servers) -> str:
    if servers.auth is None:
        return redact(servers.nats_url)
    # Shown as the console login is: the operator's own, on the operator's own terminal.
    return (
        f"{servers.url_for('operator')} (as the operator; each client system gets its own: "
        "`tidegate client add NAME --json`)"
    )


def login_line(operator: OperatorLogin | None, hint: str) -> str:
    if operator is not None:
        return f"{operator.username} (password {operator.password})"
    # The operators were made or changed by someone: their passwords are theirs to know.
    return (
        f"an existing operator's (`tidegate{hint} operator list`; a new password: "
        f"`tidegate{hint} operator set-password NAME`)"
    )
