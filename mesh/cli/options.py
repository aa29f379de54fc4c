"""Every command-line option, declared once: its flags, its help and its `TIDEGATE_…` variable.

An option that maps to a setting names it (`setting="executor.slots"`); its variable is then
the one `Settings.from_env` reads (`TIDEGATE_SLOTS`), and `--help` shows it. A flag given on
the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidegate.config import Settings

ENV_PREFIX = "TIDEGATE_"


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    setting: str | None = None  # "section.field" of `Settings` this flag overrides
    env: str | None = None  # a variable read outside `Settings` (only `--log-level`)
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_"))

    @property
    def envvar(self) -> str | None:
        if self.setting:
            return ENV_PREFIX + self.setting.rpartition(".")[2].upper()
        return self.env

    def add_to(self, parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
        kwargs = dict(self.kwargs)
        if suppress:  # a global option repeated after the command: absent means "not given"
            kwargs["default"] = argparse.SUPPRESS
        text = self.help + (f" [env: {self.envvar}]" if self.envvar else "")
        parser.add_argument(*self.flags, help=text, **kwargs)


def opt(*flags: str, help: str, setting: str | None = None, **kwargs: Any) -> Option:
    return Option(flags=flags, help=help, setting=setting, kwargs=kwargs)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` (or plain seconds) as seconds."""
    found = _DURATION.match(text.strip())
    try:
        value = float(found[1]) * _UNIT_S[found[2]] if found else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give e.g. 90s, 30m, 24h or 7d"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative, not {text!r}")
    return value


BUFFER_MAX_DEFAULT = 0  # `--buffer-max default`: back to the stream-wide quota


def buffer_quota(text: str) -> int:
    """A client's own buffer quota: a whole number from 1, or `default` (the stream-wide
    TIDEGATE_CLIENT_BUFFER_MAX), given as `BUFFER_MAX_DEFAULT`."""
    if text.strip().lower() == "default":
        return BUFFER_MAX_DEFAULT
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or `default`)") from None


def _float(text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be within {low:g} … {high:g}, not {value:g}")
    return value


def fraction(text: str) -> float:
    return _float(text, 0.0, 1.0)


def milliseconds(text: str) -> float:
    return _float(text, 0.0, 60_000.0)


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, not {value}")
    return value


# --- accepted before or after the command ------------------------------------------------------

GLOBAL: Sequence[Option] = (
    opt(
        "--data-dir",
        type=Path,
        setting="connection.data_dir",
        help="state directory; endpoints.json of a running `tidegate up` is read from it "
        "(default ./tidegate-data)",
    ),
    opt(
        "--nats-url",
        setting="connection.nats_url",
        help="NATS server(s); unset: from endpoints.json (`up`: start an embedded one)",
    ),
    opt(
        "--database-url",
        setting="connection.database_url",
        help="PostgreSQL conninfo; unset: from endpoints.json (`up`: start an embedded one)",
    ),
    Option(
        flags=("--log-level",),
        env="TIDEGATE_LOG_LEVEL",
        help="DEBUG, INFO (default), WARNING, ERROR",
    ),
)

# --- per command -------------------------------------------------------------------------------

JSON = opt("--json", action="store_true", help="print JSON with a stable shape")

UP = (
    opt("--executors", type=int, default=1, help="executor processes to run (0 or more)"),
    opt("--slots", type=positive_int, default=4, help="slots per executor"),
    opt("--console-port", type=port, default=8700, help="the console's loopback port"),
    opt("--demo", action="store_true", help="also submit a demo task every few seconds"),
    opt(
        "--no-nats-auth",
        dest="nats_auth",
        action="store_false",
        help="let anyone on this machine use the embedded NATS server, as before users and "
        "permissions (default: every component and client system connects as itself)",
    ),
)
DRIVER = (
    opt(
        "--persist",
        choices=["batch", "per-event"],
        setting="driver.persist",
        help="batch (default) or per-event: one transaction per event, for comparison",
    ),
    opt(
        "--metrics-port",
        type=port,
        setting="driver.metrics_port",
        help="serve /metrics on this loopback port (0: any free port)",
    ),
)
EXECUTOR = (
    opt("--pool", setting="executor.pool", help="the pool whose work this executor takes"),
    opt("--slots", type=positive_int, setting="executor.slots", help="tasks run at once"),
    opt("--executor-id", setting="executor.executor_id", help="its name (default host-pid)"),
    opt(
        "--workers",
        type=positive_int,
        setting="executor.executor_workers",
        help="worker processes sharing the slots, each executor <id>-w<i> (default 1: this "
        "process); for an executor bound by one Python process's CPU",
    ),
    opt(
        "--metrics-port",
        type=port,
        setting="executor.metrics_port",
        help="serve /metrics on this loopback port (0: any free port)",
    ),
    opt(
        "--task-env-allow",
        setting="executor.task_env_allow",
        help="the executor's variables its tasks see, comma-separated (`LC_*` for a prefix; "
        "default PATH,HOME,USER,LOGNAME,LANG,LANGUAGE,LC_*,TZ,TMPDIR,SHELL,TERM); never TIDEGATE_*",
    ),
    opt(
        "--task-user",
        setting="executor.task_user",
        help="user its tasks run as (default: nobody when run as root, else its own user)",
    ),
    opt(
        "--task-rlimit-cpu-s",
        type=positive_int,
        setting="executor.task_rlimit_cpu_s",
        help="CPU seconds per task process (default: inherited)",
    ),
    opt(
        "--task-rlimit-as-mb",
        type=positive_int,
        setting="executor.task_rlimit_as_mb",
        help="address space (memory) per task process, MiB (default: inherited)",
    ),
    opt(
        "--task-rlimit-nofile",
        type=positive_int,
        setting="executor.task_rlimit_nofile",
        help="open files per task process (default: inherited)",
    ),
)
CONSOLE = (
    opt("--host", default="127.0.0.1", help="address to listen on"),
    opt("--port", type=port, default=8700, help="port to listen on"),
    opt(
        "--tls-cert",
        setting="console.console_tls_cert",
        help="serve HTTPS with this certificate (chain), a PEM file; needs --tls-key",
    ),
    opt(
        "--tls-key",
        setting="console.console_tls_key",
        help="the private key of --tls-cert, a PEM file",
    ),
)

_LIMITS = (
    opt("--max-running", type=int, help="cap on this client's running tasks"),
    opt(
        "--max-submit-rate",
        dest="max_submit_per_s",
        type=float,
        help="tasks per second started from its backlog",
    ),
    opt("--default-pool", help="pool of its tasks that name none"),
    opt(
        "--callback-batch-max",
        type=int,
        help="callbacks per request, as a JSON array, when above 1",
    ),
    opt(
        "--callback-held-max",
        type=int,
        help="events held for its endpoint at once; the rest waits in the outbox",
    ),
    opt(
        "--buffer-max",
        type=buffer_quota,
        metavar="N",
        help="its tasks that may wait (submitted + routed, not dispatched) before its "
        "submissions get BufferFull; `default`: TIDEGATE_CLIENT_BUFFER_MAX, also the ceiling",
    ),
)
# Its command policy, checked where its tasks are routed; a refused task ends `rejected`.
_COMMAND_POLICY = (
    opt(
        "--allow-executable",
        dest="allowed_executables",
        action="append",
        metavar="PATH",
        help="an absolute path or glob argv[0] may be (/usr/bin/python3, '/opt/jobs/*', "
        "'/opt/jobs/**'); repeat it: the list given replaces the current one, and argv[0] must "
        "then be absolute (default: any executable)",
    ),
    opt("--any-executable", action="store_true", help="let it run any executable again"),
    opt(
        "--allow-cwd",
        dest="allowed_cwds",
        action="append",
        metavar="DIR",
        help="a directory its tasks' cwd must be in (or under); repeat it: the list given "
        "replaces the current one, and tasks must then give a cwd (default: any)",
    ),
    opt("--any-cwd", action="store_true", help="let its tasks run in any directory again"),
    opt(
        "--shell",
        dest="allow_shell",
        action="store_true",
        default=None,
        help="allow `shell` tasks (the default); they run /bin/sh -c, so with "
        "--allow-executable list /bin/sh too",
    ),
    opt("--no-shell", dest="allow_shell", action="store_false", help="refuse `shell` tasks"),
)
CLIENT_NAME = opt("name", help="the client system's name")
CLIENT_ADD = (
    CLIENT_NAME,
    opt(
        "--json",
        action="store_true",
        help="print JSON: the client, its NATS credentials (user, password, inbox_prefix; "
        "shown once) and a callback secret generated for it",
    ),
    opt("--sensitive", action="store_true", help="persist every transition before its callback"),
    opt("--callback-url", help="HTTP webhook for state callbacks"),
    opt(
        "--callback-nats",
        action="store_true",
        help="callbacks as NATS requests on tg.callback.NAME",
    ),
    opt(
        "--callback-secret",
        help="callback signing secret, Standard Webhooks (default: a new whsec_ one, printed)",
    ),
    *_LIMITS,
    *_COMMAND_POLICY,
)
CLIENT_SET = (
    CLIENT_NAME,
    opt(
        "--sensitive",
        dest="sensitive",
        action="store_true",
        default=None,
        help="persist every transition before its callback",
    ),
    opt(
        "--no-sensitive",
        dest="sensitive",
        action="store_false",
        help="terminal callbacks only, intermediate states in batches",
    ),
    opt("--callback-url", help="switch to HTTP callbacks at this URL"),
    opt(
        "--callback-nats",
        action="store_true",
        default=None,
        help="switch to NATS request callbacks",
    ),
    opt("--callback-secret", help="new callback signing secret (Standard Webhooks)"),
    opt("--pause", dest="paused", action="store_true", default=None, help="keep its tasks queued"),
    opt("--resume", dest="paused", action="store_false", help="start its tasks again"),
    *_LIMITS,
    *_COMMAND_POLICY,
)
CLIENT_CREDENTIALS = (
    CLIENT_NAME,
    opt("--revoke", action="store_true", help="remove its NATS credentials instead"),
    JSON,
)
NATS_CONFIG = (
    opt(
        "--init",
        action="store_true",
        help="first make the component users (driver, executor, console, operator) that are "
        "missing, their passwords in DATA_DIR/nats/credentials.json",
    ),
    opt(
        "--from-env",
        action="store_true",
        help="first take the component users' passwords from TIDEGATE_NATS_<USER>_PASSWORD "
        "(e.g. TIDEGATE_NATS_DRIVER_PASSWORD; compose.yaml's .env) instead of making them",
    ),
    opt(
        "--url-for",
        metavar="USER",
        help="print instead the NATS URL (--nats-url's servers) with USER's password from "
        "credentials.json in it: what that component's TIDEGATE_NATS_URL should be",
    ),
)
CLIENT_ROTATE = (
    CLIENT_NAME,
    opt(
        "--overlap",
        type=duration_s,
        default=24 * 3600.0,
        help="how long the old secret still signs beside the new one (e.g. 90s, 30m, 24h, 7d; "
        "default 24h): time for the receiver to switch",
    ),
    opt("--secret", help="the new secret (default: generated, and printed once)"),
    JSON,
)
SUBMIT = (
    opt("--client", required=True, help="the submitting client system"),
    opt("--key", help="idempotency key (default: random)"),
    opt("--pool", help="the pool to run on (default: the client's)"),
    opt("--timeout", type=float, default=3600.0, help="seconds before the task is killed"),
    opt("--shell", help="a command line for /bin/sh -c, instead of ARGV"),
    opt("--cwd", help="working directory of the task"),
    opt(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the task (repeatable)",
    ),
    opt("--label", action="append", default=[], metavar="NAME=VALUE", help="a label (repeatable)"),
    opt("--priority", type=int, default=0, help="stored; does not reorder tasks yet"),
    opt("--max-attempts", type=positive_int, default=3, help="deliveries before `lost`"),
    opt("--file", help="JSON lines, one task spec per line, instead of one task"),
    opt("argv", nargs="*", help="the command to run, after `--`"),
)
OPERATOR_NAME = opt("name", help="the operator's username (letters, digits, '_', '.', '-')")
PASSWORD_STDIN = opt(
    "--password-stdin",
    action="store_true",
    help="read the password from standard input (default: generate one and print it once)",
)
OPERATOR_ADD = (
    OPERATOR_NAME,
    opt(
        "--role",
        choices=["viewer", "operator"],
        default="viewer",
        help="viewer (default): reads everything; operator: may also change things",
    ),
    PASSWORD_STDIN,
)
OPERATOR_SET_PASSWORD = (OPERATOR_NAME, PASSWORD_STDIN)
TOKEN_NAME = opt("name", help="the token's name (letters, digits, '_', '.', '-')")
TOKEN_ADD = (
    TOKEN_NAME,
    opt("--client", help="scope: submit, read and cancel this client's own tasks, nothing else"),
    opt("--operator", action="store_true", help="scope: what an operator may do in the console"),
    opt("--viewer", action="store_true", help="scope: read what the console shows, change nothing"),
    JSON,
)
TASK_ID = opt("id", help="the task id, CLIENT:KEY")
RUN = opt(
    "--run",
    type=int,
    help="the run to cancel (its id, as `task show` prints it); without it, every run of the "
    "task submitted until now, never a later one",
)
TASKS = (
    opt("--client", help="only this client's tasks"),
    opt("--state", help="only tasks in this state"),
    opt("--limit", type=positive_int, default=100, help="at most this many, newest first"),
    JSON,
)
DEAD_KIND = opt(
    "--kind",
    choices=["callback", "message"],
    required=True,
    help="callback: callbacks that exhausted their retries (by id); message: messages a stage "
    "could not process, set aside on the bus (by sequence)",
)
DEAD_ID = opt("id", type=positive_int, help="the dead letter's id (callback) or sequence (message)")
DEAD_LIST = (
    DEAD_KIND,
    opt("--client", help="only this client's dead letters"),
    opt(
        "--stage",
        choices=["submit", "route", "ready", "work", "event", "heartbeat", "notify"],
        help="message dead letters of this stage only",
    ),
    opt("--limit", type=positive_int, default=100, help="at most this many, newest first"),
    opt("--before", type=positive_int, help="only older than this id or sequence (next page)"),
    JSON,
)
DEAD_SHOW = (DEAD_ID, DEAD_KIND, JSON)
DEAD_REDRIVE = (
    DEAD_ID,
    DEAD_KIND,
    opt(
        "--new-id",
        action="store_true",
        help="message: publish under a new message id (the original is still in its stream's "
        "dedup window, which would drop the re-drive as a duplicate)",
    ),
    JSON,
)
BENCH_WORK_DIR = opt("--work-dir", type=Path, help="parent of the temporary stack directories")
BENCH_KEEP = opt("--keep", action="store_true", help="keep the stack's data and logs")
BENCH_FLOOD = (
    opt("--tasks", type=positive_int, default=20_000, help="tasks in the flood"),
    opt("--clients", type=positive_int, default=10, help="client systems submitting them"),
    opt("--executors", type=positive_int, default=2, help="executor processes"),
    opt("--slots", type=positive_int, default=16, help="slots per executor"),
    opt(
        "--drivers",
        type=positive_int,
        default=1,
        help="driver processes; the commit cap is per driver, the report's peak is the fleet's "
        "(default 1)",
    ),
    opt(
        "--persist",
        choices=["batch", "per-event", "both"],
        default="both",
        help="projection modes to measure",
    ),
    opt(
        "--timeout",
        type=float,
        help="seconds for all tasks to finish, per mode (default: 60 + tasks/100)",
    ),
    opt(
        "--sensitive-share",
        type=fraction,
        default=0.0,
        help="fraction of the clients that are sensitive, 0 … 1 (default 0)",
    ),
    opt(
        "--callback-latency-ms",
        type=milliseconds,
        default=0.0,
        help="the benchmark's callback receiver answers each request after this (default 0)",
    ),
    opt(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr (default: when stderr is a terminal)",
    ),
    opt(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory for flood.json, flood.md and flood.png (default ./bench-results)",
    ),
    BENCH_WORK_DIR,
    BENCH_KEEP,
    JSON,
)
BENCH_CONSOLE = (
    opt(
        "--rows",
        type=positive_int,
        default=1_000_000,
        help="rows filled into the tasks table (default 1,000,000)",
    ),
    opt(
        "--clients",
        type=positive_int,
        default=20,
        help="client systems the rows belong to (default 20)",
    ),
    opt(
        "--days",
        type=positive_int,
        default=7,
        help="days (day partitions) the rows span (default 7)",
    ),
    opt("--requests", type=positive_int, default=50, help="timed GETs of each page (default 50)"),
    BENCH_WORK_DIR,
    BENCH_KEEP,
    JSON,
)


def settings_from(args: argparse.Namespace, options: Sequence[Option]) -> Settings:
    """`Settings` from the environment, overridden by the flags given among `options`."""
    overrides: dict[str, dict[str, Any]] = {}
    for option in (*GLOBAL, *options):
        value = getattr(args, option.dest, None)
        if option.setting and value is not None:
            section, _, name = option.setting.partition(".")
            overrides.setdefault(section, {})[name] = value
    return Settings.from_env(**overrides)
