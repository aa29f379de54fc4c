"""`tidegate operator add | list | set-password | remove`: the console's accounts.

Only PostgreSQL is needed. Every change writes its audit line (actor "cli") in the same
transaction as the change. A password is never taken as an argument (it would sit in the
shell history and in `ps`): it is generated and printed once, or read from standard input.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable

import msgspec

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.config import Settings
from tidegate.endpoints import resolve_connection
from tidegate.errors import UsageError
from tidegate.store import operators
from tidegate.store.store import Store

ACTOR = "cli"

Work = Callable[[Store], Awaitable[int]]


def _database_url(settings: Settings) -> str:
    # The database alone: no need for a NATS URL as well, unlike `resolve_connection`.
    return settings.connection.database_url or resolve_connection(settings).database_url


def run_with_store(args: argparse.Namespace, command: Command, work: Work) -> int:
    """Run `work` with a one-connection store on the database alone (no NATS needed)."""
    url = _database_url(settings_from(args, command.options))

    async def main() -> int:
        async with Store(url, min_size=1, max_size=1, name="tidegate-cli") as store:
            return await work(store)

    return asyncio.run(main())


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """(the password, whether it was generated)."""
    if not args.password_stdin:
        return operators.generate_password(), True
    if sys.stdin.isatty():
        text = getpass.getpass("password: ")
    else:
        text = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise UsageError("the password on standard input must be one line")
    return operators.check_password(text), False


def _show_generated(password: str) -> None:
    print(f"password (shown once; it cannot be recovered): {password}")


def add(args: argparse.Namespace, command: Command) -> int:
    username = operators.check_username(args.name)
    role = operators.check_role(args.role)
    password, generated = _password(args)

    async def work(store: Store) -> int:
        await operators.add_operator(
            store, username=username, password=password, role=role, actor=ACTOR
        )
        print(f"operator {username} added (role {role})")
        if generated:
            _show_generated(password)
        return 0

    return run_with_store(args, command, work)


def list_(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store) -> int:
        records = await operators.list_operators(store)
        if args.json:
            print(msgspec.json.encode(records).decode())
            return 0
        if not records:
            print("no operators yet: add one with `tidegate operator add NAME`", file=sys.stderr)
        for r in records:
            print(f"{r.username:<24} {r.role:<9} since {r.created_at:%Y-%m-%d %H:%M} UTC")
        return 0

    return run_with_store(args, command, work)


def set_password(args: argparse.Namespace, command: Command) -> int:
    username = operators.check_username(args.name)
    password, generated = _password(args)

    async def work(store: Store) -> int:
        await operators.set_password(store, username=username, password=password, actor=ACTOR)
        print(f"password of {username} changed; their console sessions end within seconds")
        if generated:
            _show_generated(password)
        return 0

    return run_with_store(args, command, work)


def remove(args: argparse.Namespace, command: Command) -> int:
    username = args.name

    async def work(store: Store) -> int:
        await operators.remove_operator(store, username=username, actor=ACTOR)
        print(f"operator {username} removed; their console sessions end within seconds")
        return 0

    return run_with_store(args, command, work)
