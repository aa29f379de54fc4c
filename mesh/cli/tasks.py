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
from tidegate.store.attempts import AttemptRecord
from tidegate.store.rows import RunSummary, TaskRecord, run_summary
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
        runs = await store.task_runs(args.id)
        if not runs:
            raise TaskNotFound(
                f"no task {args.id!r} in the database (projection lags a few seconds; "
                "check the id, `client:key`)"
            )
        # The latest run, and a summary of the earlier ones (a key submitted again after the
        # dedup window, or retried, is the task's next run), latest first.
        record, earlier = runs[0], [run_summary(r) for r in runs[1:]]
        if args.json:
            print_json({**msgspec.structs.asdict(record), "runs": earlier})
        else:
            _print_task(record)
            _print_runs(len(runs), earlier)
        return 0

    return _with_store(args, command, work)


def _print_task(record: TaskRecord) -> None:
    fields = msgspec.structs.asdict(record)
    tail = fields.pop("log_tail", "") or ""
    attempts = fields.pop("attempts", [])
    for name, value in fields.items():
        if value not in (None, "", {}, []):
            print(f"{name:>13}: {value}")
    if attempts:
        print("     attempts: (newest first)")
        _print_attempts(attempts, "   | ")
    if tail:
        print("     log tail:")
        print("\n".join("   | " + line for line in tail.rstrip("\n").splitlines()))


def _print_attempts(attempts: list[AttemptRecord], indent: str) -> None:
    for a in attempts:
        parts = [f"attempt {a.attempt}: {a.state}"]
        if a.executor:
            parts.append(f"on {a.executor}")
        if a.started_at:
            parts.append(f"started {a.started_at}")
        if a.finished_at:
            parts.append(f"finished {a.finished_at}")
        if a.duration_s is not None:
            parts.append(f"{a.duration_s:.3f} s")
        if a.exit_code is not None:
            parts.append(f"exit {a.exit_code}")
        print(indent + ", ".join(parts) + (f" ({a.reason})" if a.reason else ""))


def _print_runs(count: int, earlier: list[RunSummary]) -> None:
    if not earlier:
        return
    print(f"  earlier runs: (this is run {count} of {count})")
    for n, r in enumerate(earlier, start=1):
        ended = f" finished {r.finished_at}" if r.finished_at else ""
        why = f" ({r.reason})" if r.reason else ""
        print(
            f"   | run {count - n} (id {r.run}): submitted {r.submitted_at}, {r.state}, "
            f"attempt {r.attempt}{ended}{why}"
        )
        if len(r.attempts) > 1:  # one attempt: the line above says it all
            _print_attempts(r.attempts, "   |   ")


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
