"""The argparse parser, built from the command table; global options go before or after."""

from __future__ import annotations

import argparse
from typing import Any

from tidegate.cli.commands import COMMANDS, GROUPS
from tidegate.cli.options import GLOBAL

DESCRIPTION = (
    "Tidegate, an offline task execution engine. "
    "Exit codes: 0 success, 2 bad usage or invalid input, 1 anything else."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidegate", description=DESCRIPTION)
    for option in GLOBAL:
        option.add_to(parser)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        sub = top
        if len(command.words) > 1:
            group = command.words[0]
            if group not in groups:
                gp = top.add_parser(group, help=GROUPS[group])
                groups[group] = gp.add_subparsers(
                    dest=f"{group}_command", required=True, metavar="COMMAND"
                )
            sub = groups[group]
        leaf = sub.add_parser(command.words[-1], help=command.help, description=command.help)
        for option in command.options:
            option.add_to(leaf)
        for option in GLOBAL:
            option.add_to(leaf, suppress=True)
        leaf.set_defaults(command_spec=command)
    return parser
