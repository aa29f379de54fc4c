"""`tidegate up` (the `embedded` extra)."""

from __future__ import annotations

import argparse

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.up import run_up


def up(args: argparse.Namespace, command: Command) -> int:
    return run_up(
        settings_from(args, command.options),
        executors=args.executors,
        console_port=args.console_port,
        slots=args.slots,
        demo=args.demo,
        nats_auth=args.nats_auth,
    )
