"""Run one task as a local OS process group, bounded in time, output and lifetime.

The task gets its own session (so its own process group): every stop — timeout, cancel, the
runner itself being cancelled, or the leader simply exiting — ends with the whole group killed,
so no part of a task outlives it. A process that calls `setsid()` itself leaves the group and
cannot be reached this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO, Final, Literal

from tidegate.errors import TidegateError
from tidegate.executor import taskenv
from tidegate.executor.tasklogs import DIR_MODE, create_log
from tidegate.executor.taskwrap import NO_WRAPPER, RunAs, Wrapper
from tidegate.wire import TaskSpec

Outcome = Literal["succeeded", "failed", "timed_out", "cancelled"]

_HEAD_BYTES: Final = 512

# A descendant that keeps the output pipe open (one that escaped the group) must not hold the
# runner: after the leader exits, output is read only this long.
DRAIN_AFTER_EXIT_S: Final = 1.0


@dataclass(frozen=True, kw_only=True)
class ProcessLimits:
    kill_grace_s: float = 5.0
    log_max_bytes: int = 1024 * 1024
    log_tail_bytes: int = 4096


@dataclass(frozen=True, kw_only=True)
class ProcessResult:
    outcome: Outcome
    exit_code: int | None
    reason: str
    log_tail: str
    started_at: datetime
    finished_at: datetime
    log_path: Path | None


class _Output:
    """Merged stdout+stderr: a bounded log file plus an in-memory tail.

    With `opener`, the file is made only when the first output arrives: an attempt that prints
    nothing leaves no file (the log server then says it wrote no log). Creating a file costs
    about as much as starting a no-op process on a journaling file system."""

    def __init__(
        self,
        log: BinaryIO | None,
        limits: ProcessLimits,
        opener: Callable[[], BinaryIO] | None = None,
    ) -> None:
        self._log = log
        self._opener = opener
        self._max = limits.log_max_bytes
        self._tail_max = limits.log_tail_bytes
        self._tail = bytearray()
        self._logged = 0
        self._truncated = False
        self._last_logged = b"\n"
        self._head = b""  # the start of the output: a wrapper's own start error is there
        self.total = 0

    def note(self, text: str) -> None:
        """A line from the runner itself, visible in the tail (used when the log is unusable)."""
        self._keep_tail(f"[tidegate: {text}]\n".encode())

    def feed(self, data: bytes) -> None:
        if len(self._head) < _HEAD_BYTES:
            self._head += data[: _HEAD_BYTES - len(self._head)]
        self.total += len(data)
        if self._opener is not None and data:
            opener, self._opener = self._opener, None
            try:
                self._log = opener()
            except OSError as exc:
                self.note(f"cannot write log: {exc}")
        if self._log is not None and not self._truncated:
            part = data[: self._max - self._logged]
            try:
                if part:
                    self._log.write(part)
                    self._logged += len(part)
                    self._last_logged = part[-1:]
                if len(part) < len(data):
                    self._truncated = True
                    marker = f"[tidegate: log truncated at {self._max} bytes]\n".encode()
                    self._log.write(marker if self._last_logged == b"\n" else b"\n" + marker)
                # Out of the buffer at once: the console reads a running attempt's file
                # through the executor (logserver.py), and should see all of it so far.
                self._log.flush()
            except OSError as exc:
                self._drop_log(f"log write failed: {exc}")
        self._keep_tail(data)

    def _keep_tail(self, data: bytes) -> None:
        self._tail += data[-self._tail_max :]
        if len(self._tail) > self._tail_max:
            del self._tail[: len(self._tail) - self._tail_max]

    def _drop_log(self, why: str) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
        self.note(why)

    def close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError as exc:
                self.note(f"log close failed: {exc}")
            self._log = None

    def first_line(self) -> str:
        return self._head.split(b"\n", 1)[0].decode("utf-8", errors="replace")

    def tail(self) -> str:
        tail = bytes(self._tail)
        if self.total > len(tail):
            # The cut may fall inside a UTF-8 sequence; drop its orphaned continuation bytes.
            skip = 0
            while skip < min(3, len(tail)) and tail[skip] & 0xC0 == 0x80:
                skip += 1
            tail = tail[skip:]
        # PostgreSQL text cannot hold NUL: a task printing one must not jam the projection.
        return tail.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


class _Protocol(asyncio.SubprocessProtocol):
    """Exit and end-of-output are separate events: `Process.wait()` would also wait for every
    holder of the pipe to close it, which an escaped grandchild may never do."""

    def __init__(self, output: _Output) -> None:
        self.output = output
        self.exited = asyncio.Event()
        self.drained = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.drained.set()

    def process_exited(self) -> None:
        self.exited.set()


def _now() -> datetime:
    return datetime.now(UTC)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    # ESRCH: the group is already gone; EPERM: only leftovers that changed credentials remain.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop_group(pgid: int, exited: asyncio.Event, grace_s: float) -> str:
    """TERM the group, give the leader `grace_s` to go, then KILL; says how it ended."""
    _killpg(pgid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            await exited.wait()
        return "SIGTERM"
    except TimeoutError:
        _killpg(pgid, signal.SIGKILL)
        await exited.wait()
        return f"SIGKILL after {grace_s:g}s grace"


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return create_log(path)


# A start that fails for want of the host's resources says nothing about the task: the host is
# out of processes, memory or file descriptors. Any other failure to start is the task's own
# (no such program, no permission, no such cwd) and ends it as `failed`.
_HOST_ERRNOS: Final = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})


class LaunchFault(TidegateError):
    """The executor could not start any process just now (not the task's fault): the task
    goes back, to be tried again after a delay. If it persists, free the host's processes,
    memory or file descriptors (`ulimit -u`, `ulimit -n`)."""


def _launch_error(exc: OSError | ValueError, spec: TaskSpec) -> str:
    # subprocess reports a failed chdir as an OSError whose filename is the cwd.
    if isinstance(exc, OSError) and spec.cwd is not None and exc.filename == spec.cwd:
        if exc.errno == errno.ENOENT:
            return f"cwd {spec.cwd} does not exist"
        return f"cannot enter cwd {spec.cwd}: {exc.strerror}"
    return f"cannot start: {exc}"


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    if code == -signal.SIGXCPU:
        return "killed by signal SIGXCPU: over its CPU time limit"
    try:
        return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


_Spawn = asyncio.Future[tuple[asyncio.SubprocessTransport, _Protocol]]


def _reap_when_started(spawn: _Spawn) -> None:
    if spawn.cancelled() or spawn.exception() is not None:
        return
    transport, _ = spawn.result()
    _killpg(transport.get_pid(), signal.SIGKILL)
    transport.close()


async def run_process(
    spec: TaskSpec,
    *,
    limits: ProcessLimits,
    base_env: Mapping[str, str],
    log_path: Path | None,
    cancel: asyncio.Event | None = None,
    cancel_reason: Callable[[], str] | None = None,
    on_start: Callable[[int], None] | None = None,
    open_log: Callable[[Path], BinaryIO] | None = None,
    wrapper: Wrapper = NO_WRAPPER,
    run_as: RunAs | None = None,
) -> ProcessResult:
    """Run `spec` to its end; task-caused problems come back as a result, never as an error.

    `base_env` is what the task gets besides its own `env` (taskenv.TaskLaunch: built once);
    `run_as` the user it runs as (None: the executor's), `wrapper` how (taskwrap.Wrapper).
    `open_log` opens the log file on the loop (tasklogs.LogFiles), once the task prints
    something; without it the file and its directory are made in a worker thread first."""
    started_at = _now()

    def finish(outcome: Outcome, code: int | None, reason: str) -> ProcessResult:
        return ProcessResult(
            outcome=outcome,
            exit_code=code,
            reason=reason,
            log_tail=output.tail(),
            started_at=started_at,
            finished_at=_now(),
            log_path=log_path,
        )

    def cancelled_reason() -> str:
        return f"cancelled: {cancel_reason()}" if cancel_reason is not None else "cancelled"

    log: BinaryIO | None = None
    log_problem = ""
    opener: Callable[[], BinaryIO] | None = None
    if log_path is not None and open_log is not None:
        opener = partial(open_log, log_path)
    elif log_path is not None:
        try:
            log = await asyncio.to_thread(_open_log, log_path)
        except OSError as exc:
            log_path, log_problem = None, f"cannot write log: {exc}"
    output = _Output(log, limits, opener)
    if log_problem:
        output.note(log_problem)

    try:
        if cancel is not None and cancel.is_set():
            return finish("cancelled", None, cancelled_reason())
        argv = ["/bin/sh", "-c", spec.shell] if spec.shell is not None else spec.argv or []
        if not argv:
            return finish("failed", None, "cannot start: no argv or shell command given")
        refused = taskenv.refusal(spec.env)
        if refused is None and run_as is not None and spec.cwd is not None:
            refused = taskenv.cwd_refusal(spec.cwd, run_as)
        if refused is not None:
            return finish("failed", None, refused)
        if spec.env:
            env: Mapping[str, str] | None = {**base_env, **spec.env}
        else:
            # Shared by every task, not copied; the executor's own environment is inherited
            # as it is (only callers that pass os.environ itself, such as tests).
            env = None if base_env is os.environ else base_env
        in_front, user_args = wrapper.for_task(run_as, spec.env)
        loop = asyncio.get_running_loop()
        spawn = asyncio.ensure_future(
            loop.subprocess_exec(
                lambda: _Protocol(output),
                *in_front,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=spec.cwd,
                **user_args,
            )
        )
        try:
            transport, protocol = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            # The child may exist already, with nobody left to stop it.
            spawn.add_done_callback(_reap_when_started)
            raise
        except OSError as exc:
            if exc.errno in _HOST_ERRNOS:
                raise LaunchFault(f"cannot start a process on this host: {exc}") from exc
            return finish("failed", None, _launch_error(exc, spec))
        except ValueError as exc:
            return finish("failed", None, _launch_error(exc, spec))

        pgid = transport.get_pid()  # start_new_session: the leader's pid is the group's id
        try:
            if on_start is not None:
                on_start(pgid)
            stopped_by = await _wait_end(protocol.exited, cancel, spec.timeout_s)
            killed_with = ""
            if stopped_by != "exited":
                killed_with = await _stop_group(pgid, protocol.exited, limits.kill_grace_s)
            # Whatever of the tree is still around dies with the task.
            _killpg(pgid, signal.SIGKILL)
            try:
                async with asyncio.timeout(DRAIN_AFTER_EXIT_S):
                    await protocol.drained.wait()
            except TimeoutError:
                output.note(f"output still open {DRAIN_AFTER_EXIT_S:g}s after exit; rest unread")
        except BaseException:
            # Cancelled (executor draining or shutting down) or a failing `on_start`: the task
            # still gets its grace period, and a second cancel still leaves no orphans.
            try:
                if not protocol.exited.is_set():
                    await _stop_group(pgid, protocol.exited, limits.kill_grace_s)
            finally:
                _killpg(pgid, signal.SIGKILL)
            raise
        finally:
            transport.close()

        code = transport.get_returncode()
        if stopped_by == "timeout":
            return finish(
                "timed_out",
                code,
                f"timed out after {spec.timeout_s:g}s; process group killed with {killed_with}",
            )
        if stopped_by == "cancel":
            return finish("cancelled", code, cancelled_reason())
        if code == 0:
            return finish("succeeded", 0, "exit code 0")
        launch_error = wrapper.launch_error(code, output.first_line())
        if launch_error is not None:
            return finish("failed", code, launch_error)
        return finish("failed", code, _exit_reason(code) if code is not None else "exit unknown")
    finally:
        output.close()


async def _wait_end(
    exited: asyncio.Event, cancel: asyncio.Event | None, timeout_s: float
) -> Literal["exited", "timeout", "cancel"]:
    waiters = [asyncio.ensure_future(exited.wait())]
    if cancel is not None:
        waiters.append(asyncio.ensure_future(cancel.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    # A leader that exited on its own wins over a timeout or cancel landing at the same moment.
    if exited.is_set():
        return "exited"
    return "cancel" if cancel is not None and cancel.is_set() else "timeout"
