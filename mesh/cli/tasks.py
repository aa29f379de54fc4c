"""`tidegate task show` and `tidegate tasks`: state read from the database."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.endpoints import resolve_connection
from tidegate.errors import TaskNotFound
from tidegate.store.rows import TaskRecord
from tidegate.store.store import Store


def _with_store(
    args: argparse.Namespace, command: Command, work: Callable[[Store], Awaitable[int]]
) -> int:
    url = resolve_connection(settings_from(args, command.options)).database_url

    async def main() -> int:
        async with Store(url, min_size=1, max_size=2) as store:
            return await work(store)

    return asyncio.run(main())


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value)).decode() + "\n")


def show(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store) -> int:
        record = await store.get_task(args.id)
        if record is None:
            raise TaskNotFound(
                f"no task {args.id!r} in the database (projection lags a few seconds; "
                "check the id, `client:key`)"
            )
        if args.json:
            print_json(record)
        else:
            _print_task(record)
        return 0

    return _with_store(args, command, work)


def _print_task(record: TaskRecord) -> None:
    fields = msgspec.structs.asdict(record)
    tail = fields.pop("log_tail", "") or ""
    for name, value in fields.items():
        if value not in (None, "", {}, []):
            print(f"{name:>13}: {value}")
    if tail:
        print("     log tail:")
        print("\n".join("   | " + line for line in tail.rstrip("\n").splitlines()))


def list_(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store) -> int:
        records = await store.list_tasks(client=args.client, state=args.state, limit=args.limit)
        if args.json:
            print_json(records)
            return 0
        for r in records:
            code = "" if r.exit_code is None else f"exit={r.exit_code}"
            print(f"{r.task_id:<40} {r.state:<10} attempt={r.attempt} {code}")
        return 0

    return _with_store(args, command, work)
