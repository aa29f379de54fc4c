"""`tidegate driver`, `tidegate executor`, `tidegate migrate` (the `server` extra)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence

from tidegate.cli.commands import Command
from tidegate.cli.options import GLOBAL, Option, settings_from
from tidegate.collector import tune_for_floods
from tidegate.config import Settings
from tidegate.driver.main import run_driver
from tidegate.endpoints import with_connection
from tidegate.executor.main import run_executor
from tidegate.executor.workers import WorkerSupervisor
from tidegate.store.migrate import migrate as apply_migrations
from tidegate.supervise import install_stop_signals

Component = Callable[[Settings, asyncio.Event], Awaitable[None]]


def _run_component(run: Component, settings: Settings) -> int:
    async def main() -> int:
        tune_for_floods()
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run(settings, stop)
        return 0

    return asyncio.run(main())


def driver(args: argparse.Namespace, command: Command) -> int:
    return _run_component(run_driver, with_connection(settings_from(args, command.options)))


def executor(args: argparse.Namespace, command: Command) -> int:
    settings = with_connection(settings_from(args, command.options))
    if settings.executor.executor_workers > 1:
        # A supervisor of worker processes, each this same command with its share of the slots.
        given = [*_given_flags(args, GLOBAL), *_given_flags(args, command.options)]
        return WorkerSupervisor(settings.executor, ["executor", *given]).run()
    return _run_component(run_executor, settings)


def _given_flags(args: argparse.Namespace, options: Sequence[Option]) -> list[str]:
    """The flags given (with a value) among `options`, as they would be typed again."""
    flags: list[str] = []
    for option in options:
        value = getattr(args, option.dest, None)
        if value is not None:
            flags += [option.flags[0], str(value)]
    return flags


def migrate(args: argparse.Namespace, command: Command) -> int:
    url = with_connection(settings_from(args, command.options)).connection.database_url
    applied = asyncio.run(apply_migrations(url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0
