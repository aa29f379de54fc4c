"""`tidegate bench flood` and `tidegate bench console` (the `embedded` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tidegate.bench import timing
from tidegate.bench.console import WARMUP, deep_page_for, run_console_bench
from tidegate.bench.model import COMMAND, MODES, FloodConfig, FloodReport
from tidegate.bench.plot import write_png
from tidegate.bench.report import format_json, format_markdown, format_table
from tidegate.bench.run import run_flood
from tidegate.bench.timeline import progress_stream
from tidegate.cli.commands import Command


def flood(args: argparse.Namespace, command: Command) -> int:
    modes: list[str] = list(MODES) if args.persist == "both" else [args.persist]
    cfg = FloodConfig(
        tasks=args.tasks,
        clients=args.clients,
        executors=args.executors,
        slots=args.slots,
        drivers=args.drivers,
        persist=modes,
        command=list(COMMAND),
        timeout_s=args.timeout if args.timeout else 60 + args.tasks / 100,
        sensitive_share=args.sensitive_share,
        callback_latency_ms=args.callback_latency_ms,
    )
    report = run_flood(
        cfg, work_dir=args.work_dir, keep=args.keep, progress=progress_stream(args.progress)
    )
    write_results(report, args.out)
    if args.json:
        sys.stdout.write(format_json(report) + "\n")
    else:
        print(format_table(report))
    return 0 if report.ok else 1


def write_results(report: FloodReport, out: Path) -> None:
    """flood.json, flood.md and (with the `bench` extra's matplotlib) flood.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "flood.json").write_text(format_json(report) + "\n")
    (out / "flood.md").write_text(format_markdown(report))
    if write_png(report, out / "flood.png"):
        print(f"wrote {out}/flood.json, flood.md, flood.png", file=sys.stderr)
    else:
        print(
            f"wrote {out}/flood.json, flood.md; no plot: install the `bench` extra (matplotlib)",
            file=sys.stderr,
        )


def console(args: argparse.Namespace, command: Command) -> int:
    """0 when every page answered as it should; whether p95 met the target is in the report."""
    cfg = timing.ConsoleConfig(
        rows=args.rows,
        clients=args.clients,
        days=args.days,
        requests=args.requests,
        warmup=WARMUP,
        deep_page=deep_page_for(args.rows),
        target_ms=timing.TARGET_MS,
    )
    report = run_console_bench(cfg, work_dir=args.work_dir, keep=args.keep)
    if args.json:
        sys.stdout.write(timing.format_json(report) + "\n")
    else:
        print(timing.format_table(report))
    return 0 if report.ok else 1
