"""`tidegate console` (the `console` extra)."""

from __future__ import annotations

import argparse

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.console.app import serve_console
from tidegate.endpoints import with_connection


def console(args: argparse.Namespace, command: Command) -> int:
    settings = with_connection(settings_from(args, command.options))
    return serve_console(settings, host=args.host, port=args.port)
