"""The `tidegate bench` commands (also `python -m mesh.bench …`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.bench.model import COMMAND, MODES, FloodConfig
from mesh.bench.report import format_json, format_table
from mesh.bench.run import run_flood


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_bench_commands(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks on a private, temporary stack")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    f = bsub.add_parser(
        "flood", help="the midnight flood: N tasks from C clients at once, per persist mode"
    )
    f.add_argument("--tasks", type=_positive, default=20_000)
    f.add_argument("--clients", type=_positive, default=10)
    f.add_argument("--executors", type=_positive, default=2)
    f.add_argument("--slots", type=_positive, default=16, help="slots per executor")
    f.add_argument("--persist", choices=[*MODES, "both"], default="both")
    f.add_argument(
        "--timeout", type=float, help="seconds for all tasks to finish, per mode "
        "(default: 60 + tasks/100)",
    )  # fmt: skip
    f.add_argument("--work-dir", type=Path, help="parent of the temporary stack directories")
    f.add_argument("--keep", action="store_true", help="keep the stack's data and logs")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_bench_flood)


def cmd_bench_flood(args: argparse.Namespace) -> int:
    modes: list[str] = list(MODES) if args.persist == "both" else [args.persist]
    cfg = FloodConfig(
        tasks=args.tasks, clients=args.clients, executors=args.executors, slots=args.slots,
        persist=modes, command=list(COMMAND),
        timeout_s=args.timeout if args.timeout else 60 + args.tasks / 100,
    )  # fmt: skip
    report = run_flood(cfg, work_dir=args.work_dir, keep=args.keep)
    if args.json:
        sys.stdout.write(format_json(report) + "\n")
    else:
        print(format_table(report))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mesh.bench flood …`, the same as `tidegate bench flood …`."""
    logging.basicConfig(
        level=os.environ.get("TIDEGATE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(prog="tidegate")
    add_bench_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
