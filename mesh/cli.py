"""The `tidegate` command line. Exit codes: 0 success, 2 bad usage or invalid input, 1 other."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from mesh.config import Connection, Settings
from mesh.errors import (
    ConfigError,
    InvalidTask,
    TaskNotFound,
    TidegateError,
    UnknownClient,
    UsageError,
)

log = logging.getLogger("tidegate")

ENDPOINTS_FILE = "endpoints.json"


def resolve_connection(settings: Settings) -> Connection:
    """URLs from the environment, else from the endpoints file a running `tidegate up` wrote."""
    conn = settings.connection
    if conn.nats_url and conn.database_url:
        return conn
    path = conn.data_dir / ENDPOINTS_FILE
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


def _with_connection(settings: Settings) -> Settings:
    return Settings(
        connection=resolve_connection(settings), limits=settings.limits,
        driver=settings.driver, executor=settings.executor,
    )  # fmt: skip


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {"connection": {}, "driver": {}, "executor": {}}
    if getattr(args, "data_dir", None):
        overrides["connection"]["data_dir"] = Path(args.data_dir)
    for name in ("persist", "metrics_port"):
        if getattr(args, name, None) is not None and args.command == "driver":
            overrides["driver"][name] = getattr(args, name)
    if args.command == "executor":
        for name in ("pool", "slots", "metrics_port", "executor_id"):
            if getattr(args, name, None) is not None:
                overrides["executor"][name] = getattr(args, name)
    return Settings.from_env(**overrides)


def _run(coro: Awaitable[int]) -> int:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- long-running components ----------------------------------------------------------------


async def _component(run: Callable[[Settings, asyncio.Event], Awaitable[None]], s: Settings) -> int:
    from executor.main import install_stop_signals

    stop = asyncio.Event()
    install_stop_signals(stop)
    await run(_with_connection(s), stop)
    return 0


def cmd_driver(args: argparse.Namespace) -> int:
    from mesh.driver import run_driver

    return _run(_component(run_driver, _settings(args)))


def cmd_executor(args: argparse.Namespace) -> int:
    from executor.main import run_executor

    return _run(_component(run_executor, _settings(args)))


def cmd_console(args: argparse.Namespace) -> int:
    from console.app import serve_console

    return serve_console(_with_connection(_settings(args)), host=args.host, port=args.port)


def cmd_up(args: argparse.Namespace) -> int:
    from mesh.up import run_up

    return run_up(
        _settings(args),
        executors=args.executors,
        console_port=args.console_port,
        slots=args.slots,
        demo=args.demo,
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from mesh.store.migrate import migrate

    applied = _run_value(migrate(_with_connection(_settings(args)).connection.database_url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _run_value(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# --- state-changing and reading commands ----------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from mesh.client import TidegateClient
    from mesh.wire import TaskSpec, check_spec, decode_spec

    specs: list[TaskSpec] = []
    if args.file:
        with open(args.file, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        specs.append(decode_spec(line))
                    except InvalidTask as exc:
                        raise InvalidTask(f"{args.file}:{n}: {exc}") from None
    else:
        if bool(args.argv) == bool(args.shell):
            raise InvalidTask("give a command after `--`, or --shell 'command line' (not both)")
        env = dict(_pair(e) for e in args.env)
        labels = dict(_pair(e) for e in args.label)
        specs.append(check_spec(TaskSpec(
            key=args.key or uuid.uuid4().hex, argv=args.argv or None, shell=args.shell,
            env=env, cwd=args.cwd, timeout_s=args.timeout, pool=args.pool, labels=labels,
            priority=args.priority, max_attempts=args.max_attempts,
        )))  # fmt: skip
    conn = resolve_connection(_settings(args))

    async def main() -> int:
        async with await TidegateClient.connect(conn.nats_url, args.client) as tg:
            receipts = await tg.submit_many(specs)
        for r in receipts:
            print(r.task_id + ("  (duplicate: already submitted)" if r.duplicate else ""))
        return 0

    return asyncio.run(main())


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise InvalidTask(f"{text!r} is not NAME=VALUE")
    return name, value


async def _with_store(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    from mesh.store.store import Store

    async with Store(resolve_connection(settings).database_url, min_size=1, max_size=2) as store:
        return await work(store)


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value)).decode() + "\n")


def cmd_task_show(args: argparse.Namespace) -> int:
    async def work(store: Any) -> int:
        record = await store.get_task(args.id)
        if record is None:
            raise TaskNotFound(
                f"no task {args.id!r} in the database (projection lags a few seconds; "
                "check the id, `client:key`)"
            )
        if args.json:
            _print_json(record)
        else:
            _print_task(record)
        return 0

    return asyncio.run(_with_store(_settings(args), work))


def _print_task(record: Any) -> None:
    fields = msgspec.structs.asdict(record)
    tail = fields.pop("log_tail", "") or ""
    for name, value in fields.items():
        if value not in (None, "", {}, []):
            print(f"{name:>13}: {value}")
    if tail:
        print("     log tail:")
        print("\n".join("   | " + line for line in tail.rstrip("\n").splitlines()))


def cmd_tasks(args: argparse.Namespace) -> int:
    async def work(store: Any) -> int:
        records = await store.list_tasks(client=args.client, state=args.state, limit=args.limit)
        if args.json:
            _print_json(records)
            return 0
        for r in records:
            code = "" if r.exit_code is None else f"exit={r.exit_code}"
            print(f"{r.task_id:<40} {r.state:<10} attempt={r.attempt} {code}")
        return 0

    return asyncio.run(_with_store(_settings(args), work))


def cmd_task_cancel(args: argparse.Namespace) -> int:
    from mesh import names
    from mesh.natsconn import connect
    from mesh.topology import ensure_buckets

    settings = _settings(args)
    conn = resolve_connection(settings)

    async def main() -> int:
        nc = await connect(conn.nats_url, "tidegate-cli")
        try:
            buckets = await ensure_buckets(nc.jetstream(), settings.limits)
            await buckets.cancel.put(names.kv_key(args.id), args.id.encode())
        finally:
            await nc.drain()
        print(f"cancel requested for {args.id}")
        return 0

    return asyncio.run(main())


def build_parser() -> argparse.ArgumentParser:
    from mesh.cli_clients import add_client_commands

    p = argparse.ArgumentParser(prog="tidegate", description=__doc__)
    p.add_argument(
        "--data-dir", help="state directory (default: $TIDEGATE_DATA_DIR or ./tidegate-data)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole system on embedded defaults")
    up.add_argument("--executors", type=int, default=1)
    up.add_argument("--slots", type=int, default=4, help="slots per executor")
    up.add_argument("--console-port", type=int, default=8700)
    up.add_argument("--demo", action="store_true", help="also submit a demo task every few seconds")
    up.set_defaults(func=cmd_up)

    d = sub.add_parser("driver", help="run one driver")
    d.add_argument("--persist", choices=["batch", "per-event"])
    d.add_argument("--metrics-port", type=int)
    d.set_defaults(func=cmd_driver)

    e = sub.add_parser("executor", help="run one executor")
    e.add_argument("--pool")
    e.add_argument("--slots", type=int)
    e.add_argument("--executor-id")
    e.add_argument("--metrics-port", type=int)
    e.set_defaults(func=cmd_executor)

    c = sub.add_parser("console", help="run the web console")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8700)
    c.set_defaults(func=cmd_console)

    sub.add_parser("migrate", help="apply the SQL migrations").set_defaults(func=cmd_migrate)
    add_client_commands(sub)

    s = sub.add_parser("submit", help="submit a task (or --file F.jsonl), print its id")
    s.add_argument("--client", required=True)
    s.add_argument("--key", help="idempotency key (default: random)")
    s.add_argument("--pool")
    s.add_argument("--timeout", type=float, default=3600.0)
    s.add_argument("--shell", help="a command line for /bin/sh -c, instead of ARGV")
    s.add_argument("--cwd")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    s.add_argument("--label", action="append", default=[], metavar="NAME=VALUE")
    s.add_argument("--priority", type=int, default=0)
    s.add_argument("--max-attempts", type=int, default=3)
    s.add_argument("--file", help="JSON lines, one task spec per line")
    s.add_argument("argv", nargs="*")
    s.set_defaults(func=cmd_submit)

    t = sub.add_parser("task", help="one task")
    tsub = t.add_subparsers(dest="task_command", required=True)
    show = tsub.add_parser("show", help="show a task's state")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_task_show)
    cancel = tsub.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_task_cancel)

    ts = sub.add_parser("tasks", help="list tasks")
    ts.add_argument("--client")
    ts.add_argument("--state")
    ts.add_argument("--limit", type=int, default=100)
    ts.add_argument("--json", action="store_true")
    ts.set_defaults(func=cmd_tasks)

    from mesh.bench import add_bench_commands

    add_bench_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("TIDEGATE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # APScheduler logs every run of every job at INFO: once a second, that drowns the rest.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per callback
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
    except (InvalidTask, ConfigError, UnknownClient, UsageError) as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 2
    except TidegateError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
