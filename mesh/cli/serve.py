"""`tidegate driver`, `tidegate executor`, `tidegate migrate` (the `server` extra)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.config import Settings
from tidegate.driver.main import run_driver
from tidegate.endpoints import with_connection
from tidegate.executor.main import run_executor
from tidegate.store.migrate import migrate as apply_migrations
from tidegate.supervise import install_stop_signals

Component = Callable[[Settings, asyncio.Event], Awaitable[None]]


def _run_component(run: Component, settings: Settings) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run(settings, stop)
        return 0

    return asyncio.run(main())


def driver(args: argparse.Namespace, command: Command) -> int:
    return _run_component(run_driver, with_connection(settings_from(args, command.options)))


def executor(args: argparse.Namespace, command: Command) -> int:
    return _run_component(run_executor, with_connection(settings_from(args, command.options)))


def migrate(args: argparse.Namespace, command: Command) -> int:
    url = with_connection(settings_from(args, command.options)).connection.database_url
    applied = asyncio.run(apply_migrations(url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0
