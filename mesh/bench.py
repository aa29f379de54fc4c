"""`tidegate bench flood`: the midnight flood against a private stack, once per persist mode.

For each mode it starts its own nats-server and PostgreSQL (fresh data directories), one driver
and E executors as real processes, publishes N `/bin/true` tasks from C clients at once, and
measures what the design is about: how fast the flood is accepted (PubAcks), how long until
every task is terminal in the database, and how many transactions the database committed.

How far the figures can be trusted:

- Tidegate's tables live in a database of their own (`tidegate`). The commit sampler reads
  `pg_stat_database` over a connection to the `postgres` database, so sampling costs the
  measured database nothing. The completion poller has to query `tasks` itself: its statements
  are counted exactly, subtracted from `commits`, and reported as `poller_commits`.
- PostgreSQL publishes a backend's counters at most once a second (an idle backend's up to
  10 s late), but always when the backend exits. Totals are therefore read after the driver
  and executors have exited, against a baseline read before they started: `commits` covers the
  driver's whole life, start-up included (a few dozen), and autovacuum's few transactions.
- For the same reason one 0.5 s sample can hold a whole second of a backend's commits, so the
  peak rate is taken over 1 s windows (two samples), never over a single sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import psycopg
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from mesh import names
from mesh.client import TidegateClient
from mesh.clients import publish_client
from mesh.config import PersistMode, Settings
from mesh.embedded import EmbeddedNats, EmbeddedPostgres, die_with_parent
from mesh.errors import TidegateError
from mesh.natsconn import connect
from mesh.store.migrate import migrate
from mesh.store.rows import ClientRecord
from mesh.store.store import Store
from mesh.topology import ensure_all
from mesh.wire import TERMINAL_STATES, TaskSpec

log = logging.getLogger("tidegate.bench")

MODES: Final[tuple[PersistMode, ...]] = ("batch", "per-event")
DB_NAME: Final = "tidegate"
POOL: Final = "default"
COMMAND: Final = ("/bin/true",)
TASK_TIMEOUT_S: Final = 60.0  # inside the default short-class bound: one work consumer is fed
SAMPLE_S: Final = 0.5
PEAK_WINDOW_S: Final = 1.0
POLL_S: Final = 0.25
READY_TIMEOUT_S: Final = 90.0
IDLE_TIMEOUT_S: Final = 15.0
STOP_TIMEOUT_S: Final = 45.0  # executors drain (nothing runs by then) and drivers flush
SETTLE_TIMEOUT_S: Final = 5.0
PROGRESS_S: Final = 5.0

Conn = psycopg.AsyncConnection[TupleRow]


class BenchError(TidegateError):
    """The benchmark could not run a mode; the message names the log to read."""


class FloodConfig(msgspec.Struct, frozen=True, kw_only=True):
    tasks: int
    clients: int
    executors: int
    slots: int
    persist: list[str]
    command: list[str]
    timeout_s: float  # deadline for every task to be terminal, per mode


class ModeResult(msgspec.Struct, kw_only=True):
    """One mode's figures; filled in as the run goes, so a failed run still shows how far."""

    persist: str
    tasks: int
    submitted: int = 0  # PubAcks received
    duplicates: int = 0
    submit_s: float | None = None
    submit_per_s: float | None = None  # PubAcks per second
    terminal_s: float | None = None  # flood start until every task is terminal; None: deadline
    tasks_per_s: float | None = None  # tasks / terminal_s: the end-to-end rate
    terminal: int = 0
    succeeded: int = 0
    completed: bool = False
    commits: int | None = None  # the database's commits, the poller's own subtracted
    poller_commits: int = 0
    commits_per_task: float | None = None
    peak_commits_per_s: float | None = None
    rows_written: int | None = None  # n_tup_ins + n_tup_upd over the tasks partitions
    rows_per_task: float | None = None
    error: str | None = None


class FloodReport(msgspec.Struct, kw_only=True):
    benchmark: str
    config: FloodConfig
    modes: dict[str, ModeResult]
    commit_ratio: float | None  # per-event commits / batch commits, when both ran
    ok: bool


# --- pure helpers --------------------------------------------------------------------------------


def peak_rate(samples: Sequence[tuple[float, int]], window_s: float = PEAK_WINDOW_S) -> float:
    """Highest counter rate over any span of at least `window_s` between two samples.

    With fewer samples than one window the whole span is used, so a short run still gets a rate.
    """
    if len(samples) < 2:
        return 0.0
    best = 0.0
    spanned = False
    j = 0
    for i, (t0, c0) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t0 < window_s:
            j += 1
        if j == len(samples):
            break
        t1, c1 = samples[j]
        best = max(best, (c1 - c0) / (t1 - t0))
        spanned = True
    if not spanned:
        (t0, c0), (t1, c1) = samples[0], samples[-1]
        best = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
    return best


def client_names(count: int) -> list[str]:
    return [f"bench{i:03d}" for i in range(count)]


def flood_specs(tasks: int, clients: int) -> list[list[TaskSpec]]:
    """Tasks dealt round-robin over the clients, so every client floods at once."""
    per_client: list[list[TaskSpec]] = [[] for _ in range(clients)]
    for i in range(tasks):
        per_client[i % clients].append(
            TaskSpec(key=f"flood-{i:07d}", argv=list(COMMAND), timeout_s=TASK_TIMEOUT_S)
        )
    return per_client


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def format_table(report: FloodReport) -> str:
    cfg = report.config
    modes = list(report.modes.values())

    def num(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    rows: list[tuple[str, list[str]]] = [
        ("submit wall time (s)", [num(m.submit_s, 2) for m in modes]),
        ("submit rate (PubAcks/s)", [num(m.submit_per_s) for m in modes]),
        ("all terminal after (s)", [num(m.terminal_s, 2) for m in modes]),
        ("end to end (tasks/s)", [num(m.tasks_per_s) for m in modes]),
        ("terminal / succeeded", [f"{m.terminal:,} / {m.succeeded:,}" for m in modes]),
        ("DB commits", [num(m.commits) for m in modes]),
        ("commits per task", [num(m.commits_per_task, 3) for m in modes]),
        ("peak commits/s (1 s window)", [num(m.peak_commits_per_s) for m in modes]),
        ("rows written (ins+upd)", [num(m.rows_written) for m in modes]),
        ("rows written per task", [num(m.rows_per_task, 2) for m in modes]),
        ("poller's own commits (excl.)", [num(m.poller_commits) for m in modes]),
    ]
    width = max(12, *(len(v) for _, vals in rows for v in vals), *(len(m.persist) for m in modes))
    label = max(len(name) for name, _ in rows)
    lines = [
        f"tidegate bench flood: {cfg.tasks:,} tasks ({' '.join(cfg.command)}) from "
        f"{cfg.clients} clients, {cfg.executors} executors x {cfg.slots} slots",
        "",
        " " * label + "".join(f"  {m.persist:>{width}}" for m in modes),
    ]
    lines += [f"{name:<{label}}" + "".join(f"  {v:>{width}}" for v in vals) for name, vals in rows]
    for m in modes:
        if m.error:
            lines.append(f"{m.persist}: FAILED: {m.error}")
        elif not m.completed:
            lines.append(f"{m.persist}: only {m.terminal:,} of {m.tasks:,} tasks terminal")
    if report.commit_ratio is not None:
        lines.append(
            f"\nper-event mode committed {report.commit_ratio:,.1f}x as often as batch mode"
        )
    return "\n".join(lines)


# --- the private stack ---------------------------------------------------------------------------


class _Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """One mode's servers and component processes under `root`; `close` stops all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nats = EmbeddedNats(root / "nats")
        self.pg = EmbeddedPostgres(root)
        self.children: list[_Child] = []
        self.nats_url = ""
        self.admin_url = ""  # the `postgres` database: where the commit sampler connects
        self.database_url = ""

    def start_servers(self) -> None:
        self.nats_url = self.nats.start()
        self.admin_url = self.pg.start()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
        params = conninfo_to_dict(self.admin_url)
        params["dbname"] = DB_NAME
        self.database_url = make_conninfo("", **params)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TIDEGATE_NATS_URL=self.nats_url,
            TIDEGATE_DATABASE_URL=self.database_url,
            TIDEGATE_DATA_DIR=str(self.root / "data"),
        )
        # Executors log every task at INFO: 20k lines of I/O would be measured too.
        env.setdefault("TIDEGATE_LOG_LEVEL", "WARNING")
        return env

    def spawn(self, name: str, *argv: str) -> None:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            # Own session: a Ctrl-C in the terminal reaches only the bench, which then stops
            # the children in order; die_with_parent covers a bench killed outright.
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", *argv], env=self.env(), cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent, start_new_session=True,
            )  # fmt: skip
        self.children.append(_Child(name, proc, log_path))

    def check_children(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise BenchError(f"{c.name} exited with code {code}; see {c.log_path}:\n{c.tail()}")

    def stop_children(self, timeout: float = STOP_TIMEOUT_S) -> None:
        alive = [c for c in self.children if c.proc.poll() is None]
        for c in alive:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in alive:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killing it", c.name, timeout)
                c.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(5)

    def check_stopped(self) -> None:
        """After `stop_children`: say which child did not exit cleanly (its log tells why)."""
        for c in self.children:
            if c.proc.returncode not in (0, None):
                log.warning("%s exited with code %s; see %s", c.name, c.proc.returncode,
                            c.log_path)  # fmt: skip

    def close(self) -> None:
        """Stop everything; each step runs even if an earlier one failed."""
        for step in (self.stop_children, self.pg.stop, self.nats.stop):
            try:
                step()
            except Exception as exc:
                log.warning("cleanup: %s failed: %s", getattr(step, "__qualname__", step), exc)


# --- measuring -----------------------------------------------------------------------------------


class CommitMeter:
    """The `tidegate` database's commit counter, read from the `postgres` database."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def read(self) -> int:
        # Autocommit: each read is its own transaction, hence a fresh statistics snapshot.
        cur = await self._conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB_NAME,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def settled(self) -> int:
        """The counter once exited backends have published theirs (two equal reads)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last = await self.read()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            current = await self.read()
            if current == last:
                break
            last = current
        return last

    async def sample(self, into: list[tuple[float, int]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            into.append((loop.time(), await self.read()))
            await asyncio.sleep(SAMPLE_S)


class Poller:
    """Counts terminal tasks; every statement it runs is a commit in the measured database."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self.statements = 0

    async def terminal(self) -> int:
        self.statements += 1
        cur = await self._conn.execute("SELECT count(*) FROM tasks WHERE state_rank = 3")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _register(stack: Stack, js: JetStreamContext, settings: Settings, n: int) -> None:
    buckets = await ensure_all(js, settings.limits)
    await migrate(stack.database_url)
    async with Store(stack.database_url, max_size=1, name="tidegate-bench") as store:
        for name in client_names(n):
            await store.add_client(ClientRecord(name=name))
            stored = await store.get_client(name)
            assert stored is not None
            await publish_client(buckets.clients, stored)


async def _wait_ready(stack: Stack, js: JetStreamContext, executors: int) -> None:
    """Until the driver pulls submissions and events and every executor pulls work."""
    kv = await js.key_value(names.EXECUTORS_BUCKET)
    deadline = time.monotonic() + READY_TIMEOUT_S

    async def waiting(stream: str, consumer: str) -> int:
        try:
            info = await js.consumer_info(stream, consumer)
        except NotFoundError:
            return 0  # executors create their work consumers when they start
        return info.num_waiting or 0

    while True:
        stack.check_children()
        try:
            beating = len(await kv.keys())
        except NoKeysError:
            beating = 0
        if (
            beating >= executors
            and await waiting(names.TASKS_STREAM, names.ROUTE_CONSUMER)
            and await waiting(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
            and await waiting(names.WORK_STREAM, names.work_consumer(POOL, "short"))
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"driver and executors not ready after {READY_TIMEOUT_S:.0f}s "
                f"({beating}/{executors} executors beating); see {stack.root / 'logs'}"
            )
        await asyncio.sleep(0.1)


async def _wait_projected(js: JetStreamContext) -> None:
    """Let the projector finish what is in flight, so its commits belong to this run."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await js.consumer_info(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        if not info.num_pending and not info.num_ack_pending:
            return
        await asyncio.sleep(0.2)
    log.warning("the projector still had events after %.0fs; stopping anyway", IDLE_TIMEOUT_S)


async def _wait_terminal(
    stack: Stack, poller: Poller, want: int, started: float, timeout: float, mode: str
) -> float | None:
    """Seconds from `started` until `want` tasks are terminal; None at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = started + timeout
    next_note = loop.time() + PROGRESS_S
    while True:
        done = await poller.terminal()
        if done >= want:
            return round(loop.time() - started, 3)
        stack.check_children()
        if loop.time() > deadline:
            log.warning("%s: deadline: %d of %d tasks terminal after %.0fs", mode, done, want,
                        timeout)  # fmt: skip
            return None
        if loop.time() >= next_note:
            log.info("%s: %d/%d tasks terminal", mode, done, want)
            next_note += PROGRESS_S
        await asyncio.sleep(POLL_S)


async def _flood(stack: Stack, cfg: FloodConfig, mode: PersistMode, result: ModeResult) -> None:
    settings = Settings.from_env(stack.env())
    nc = await connect(stack.nats_url, "tidegate-bench")
    try:
        js = nc.jetstream()
        await _register(stack, js, settings, cfg.clients)
        async with await psycopg.AsyncConnection.connect(stack.admin_url, autocommit=True) as mc:
            meter = CommitMeter(mc)
            baseline = await meter.settled()
            stack.spawn("driver", "driver", "--persist", mode)
            for i in range(cfg.executors):
                stack.spawn(
                    f"executor{i}", "executor", "--pool", POOL, "--slots", str(cfg.slots),
                    "--executor-id", f"bench-exec-{i}",
                )  # fmt: skip
            await _wait_ready(stack, js, cfg.executors)
            log.info("%s: driver and %d executors ready; flooding", mode, cfg.executors)
            await _run_flood(stack, js, cfg, mode, meter, result)
            stack.stop_children()
            stack.check_stopped()
            result.commits = await meter.settled() - baseline - result.poller_commits
        await _table_stats(stack.database_url, result)
    finally:
        await nc.close()


async def _run_flood(
    stack: Stack, js: JetStreamContext, cfg: FloodConfig, mode: str, meter: CommitMeter,
    result: ModeResult,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    specs = flood_specs(cfg.tasks, cfg.clients)
    clients = [await TidegateClient.connect(stack.nats_url, n) for n in client_names(cfg.clients)]
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(meter.sample(samples))
    try:
        async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as pc:
            poller = Poller(pc)
            try:
                started = loop.time()
                batches = await asyncio.wait_for(
                    asyncio.gather(
                        *(c.submit_many(s) for c, s in zip(clients, specs, strict=True))
                    ),
                    timeout=60 + cfg.tasks / 1000,
                )
                result.submit_s = round(loop.time() - started, 3)
                receipts = [r for batch in batches for r in batch]
                result.submitted = len(receipts)
                result.duplicates = sum(r.duplicate for r in receipts)
                result.submit_per_s = round(result.submitted / result.submit_s, 1)
                log.info("%s: %d PubAcks in %.2fs", mode, result.submitted, result.submit_s)
                result.terminal_s = await _wait_terminal(
                    stack, poller, cfg.tasks, started, cfg.timeout_s, mode
                )
                if result.terminal_s is not None:
                    result.tasks_per_s = round(cfg.tasks / result.terminal_s, 1)
                    await _wait_projected(js)
            finally:
                result.poller_commits = poller.statements
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    result.peak_commits_per_s = round(peak_rate(samples), 1)


async def _table_stats(database_url: str, result: ModeResult) -> None:
    """Rows written and final states, read after the components have exited."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables"
            " WHERE relid IN (SELECT inhrelid FROM pg_inherits"
            "                 WHERE inhparent = 'tasks'::regclass)"
        )
        row = await cur.fetchone()
        result.rows_written = int(row[0]) if row else 0
        cur = await conn.execute("SELECT state, count(*) FROM tasks GROUP BY state")
        states = {str(s): int(n) for s, n in await cur.fetchall()}
    result.succeeded = states.get("succeeded", 0)
    result.terminal = sum(n for s, n in states.items() if s in TERMINAL_STATES)
    result.completed = result.terminal == result.tasks
    if result.tasks:
        result.rows_per_task = round(result.rows_written / result.tasks, 3)
        if result.commits is not None:
            result.commits_per_task = round(result.commits / result.tasks, 4)


# --- running modes -------------------------------------------------------------------------------


@contextlib.contextmanager
def _cleanup_guard() -> Iterator[None]:
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
def _term_as_interrupt() -> Iterator[None]:
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


def run_mode(root: Path, cfg: FloodConfig, mode: PersistMode) -> ModeResult:
    result = ModeResult(persist=mode, tasks=cfg.tasks)
    stack = Stack(root)
    try:
        log.info("%s: starting nats-server and PostgreSQL in %s", mode, root)
        stack.start_servers()
        asyncio.run(_flood(stack, cfg, mode, result))
    except Exception as exc:
        log.exception("%s: the run failed", mode)
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        with _cleanup_guard():
            stack.close()
    return result


def run_flood(cfg: FloodConfig, *, work_dir: Path | None = None, keep: bool = False) -> FloodReport:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tidegate-bench-", dir=work_dir))
    results: dict[str, ModeResult] = {}
    try:
        with _term_as_interrupt():
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


# --- command line --------------------------------------------------------------------------------


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
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
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


if __name__ == "__main__":
    sys.exit(main())
