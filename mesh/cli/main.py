"""`tidegate`: parse, find the command's handler, and turn errors into exit codes.

Exit codes: 0 success, 2 bad usage or invalid input (the error class says so), 1 anything else,
including a missing extra (an installation problem, not bad input).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tidegate.cli.commands import BASE, Command
from tidegate.cli.parser import build_parser
from tidegate.errors import MissingExtra, TidegateError

Handler = Callable[[argparse.Namespace, Command], int]


def load_handler(command: Command) -> Handler:
    """Import the command's handler; a missing third-party module names the extra to install."""
    module_name, _, function = command.handler.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "tidegate" or command.extra == BASE:
            raise
        raise MissingExtra(
            f"`{command.name}` needs the `{command.extra}` extra, which is not installed "
            f"(no module {missing!r}): pip install 'tidegate[{command.extra}]'"
        ) from exc
    handler: Handler = getattr(module, function)
    return handler


def configure_logging(level: str | None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("TIDEGATE_LOG_LEVEL") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # APScheduler logs every run of every job at INFO: once a second, that drowns the rest.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per callback


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.command_spec
    try:
        configure_logging(args.log_level)
        return int(load_handler(command)(args, command))
    except TidegateError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a bad --log-level
        print(f"tidegate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
