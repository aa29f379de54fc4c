"""Running the flood once per persist mode, each on a fresh stack that is always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import psutil

from tidegate.bench.ceilings import Ceilings, measure_ceilings
from tidegate.bench.figures import ratio
from tidegate.bench.flood import client_names, flood_specs, flood_stack
from tidegate.bench.model import MODES, FloodConfig, FloodReport, Machine, ModeResult
from tidegate.bench.stack import Stack
from tidegate.config import PersistMode

log = logging.getLogger("tidegate.bench")


@contextlib.contextmanager
def cleanup_guard() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while stopping: an interrupted cleanup would orphan PostgreSQL."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the bench like Ctrl-C: the run is cancelled, then everything stopped.

    KeyboardInterrupt, not a signal of our own: asyncio lets it out of the event loop (and
    then cancels the run's tasks), where another exception raised in a task would be lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Machine:
    return Machine(
        cpus=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
        python=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        load_before=[round(x, 2) for x in os.getloadavg()],
    )


def run_ceilings(root: Path, cfg: FloodConfig) -> Ceilings:
    """The raw spawn and publish ceilings at the flood's size; a failure is reported."""
    specs = [s for per_client in flood_specs(cfg.tasks, 1) for s in per_client]
    in_flight = cfg.executors * cfg.slots
    log.info(
        "ceilings: spawning %d x %s, %d at once; publishing %d",
        cfg.tasks,
        cfg.command[0],
        in_flight,
        cfg.tasks,
    )
    try:
        return asyncio.run(
            measure_ceilings(root, cfg.command, specs, client_names(1)[0], in_flight)
        )
    except Exception as exc:
        log.exception("ceilings: the measurement failed")
        return Ceilings(tasks=cfg.tasks, in_flight=in_flight, error=str(exc) or type(exc).__name__)


def add_ratios(result: ModeResult, ceilings: Ceilings) -> None:
    result.terminal_x_spawn = ratio(result.terminal_s, ceilings.spawn_s)
    result.submit_x_publish = ratio(result.submit_s, ceilings.publish_s)


def run_mode(
    root: Path, cfg: FloodConfig, mode: PersistMode, progress: TextIO | None = None
) -> ModeResult:
    result = ModeResult(persist=mode, tasks=cfg.tasks)
    stack = Stack(root)
    try:
        log.info("%s: starting nats-server and PostgreSQL in %s", mode, root)
        stack.start_servers()
        asyncio.run(flood_stack(stack, cfg, mode, result, progress))
    except Exception as exc:
        log.exception("%s: the run failed", mode)
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        with cleanup_guard():
            stack.close()
    return result


def run_flood(
    cfg: FloodConfig,
    *,
    work_dir: Path | None = None,
    keep: bool = False,
    progress: TextIO | None = None,
    ceilings: bool = True,
) -> FloodReport:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tidegate-bench-", dir=work_dir))
    results: dict[str, ModeResult] = {}
    host = machine()
    raw: Ceilings | None = None
    try:
        with term_as_interrupt():
            if ceilings:
                raw = run_ceilings(root, cfg)
            for mode in cfg.persist:
                assert mode in MODES
                results[mode] = run_mode(root / mode, cfg, mode, progress)
                if raw is not None:
                    add_ratios(results[mode], raw)
    finally:
        ok = bool(results) and all(r.completed and r.error is None for r in results.values())
        if keep or not ok:
            log.info("data and logs kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    batch, per_event = results.get("batch"), results.get("per-event")
    host.load_after = [round(x, 2) for x in os.getloadavg()]
    commit_ratio = ratio(per_event.commits, batch.commits) if batch and per_event else None
    return FloodReport(
        benchmark="flood",
        config=cfg,
        modes=results,
        commit_ratio=commit_ratio,
        ok=ok,
        ceilings=raw,
        machine=host,
    )
