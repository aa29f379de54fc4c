"""Running the flood once per persist mode, each on a fresh stack that is always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tidegate.bench.flood import flood_stack
from tidegate.bench.model import MODES, FloodConfig, FloodReport, ModeResult
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def run_mode(root: Path, cfg: FloodConfig, mode: PersistMode) -> ModeResult:
    result = ModeResult(persist=mode, tasks=cfg.tasks)
    stack = Stack(root)
    try:
        log.info("%s: starting nats-server and PostgreSQL in %s", mode, root)
        stack.start_servers()
        asyncio.run(flood_stack(stack, cfg, mode, result))
    except Exception as exc:
        log.exception("%s: the run failed", mode)
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        with cleanup_guard():
            stack.close()
    return result


def run_flood(cfg: FloodConfig, *, work_dir: Path | None = None, keep: bool = False) -> FloodReport:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tidegate-bench-", dir=work_dir))
    results: dict[str, ModeResult] = {}
    try:
        with term_as_interrupt():
            for mode in cfg.persist:
                assert mode in MODES
                results[mode] = run_mode(root / mode, cfg, mode)
    finally:
        ok = bool(results) and all(r.completed and r.error is None for r in results.values())
        if keep or not ok:
            log.info("data and logs kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    batch, per_event = results.get("batch"), results.get("per-event")
    ratio = _ratio(per_event.commits, batch.commits) if batch and per_event else None
    return FloodReport(benchmark="flood", config=cfg, modes=results, commit_ratio=ratio, ok=ok)
