"""executor.process against real processes: outcomes, logs, and that no task tree survives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tidegate.executor.process import ProcessLimits, ProcessResult, run_process
from tidegate.wire import TaskSpec

LIMITS = ProcessLimits(kill_grace_s=0.3)
ENV = dict(os.environ)


def spec(
    *argv: str,
    shell: str | None = None,
    timeout_s: float = 10,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> TaskSpec:
    return TaskSpec(
        key="k",
        argv=list(argv) if argv else None,
        shell=shell,
        timeout_s=timeout_s,
        cwd=cwd,
        env=env or {},
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Killed members linger as zombies until their reaper (here a slow PID 1) collects them;
    # a zombie is dead, so only members in any other state count.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


async def assert_group_gone(pgid: int, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while group_alive(pgid):
        assert time.monotonic() < deadline, f"process group {pgid} still alive"
        await asyncio.sleep(0.02)


async def wait_for_file(path: Path, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.01)


class Started:
    """`on_start` hook that lets a test await the pid."""

    def __init__(self) -> None:
        self.pid = 0
        self.event = asyncio.Event()

    def __call__(self, pid: int) -> None:
        self.pid = pid
        self.event.set()

    async def wait(self) -> int:
        await asyncio.wait_for(self.event.wait(), 2)
        return self.pid


async def run(
    task: TaskSpec,
    *,
    limits: ProcessLimits = LIMITS,
    base_env: Mapping[str, str] = ENV,
    log_path: Path | None = None,
    cancel: asyncio.Event | None = None,
    cancel_reason: Callable[[], str] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ProcessResult:
    return await run_process(
        task,
        limits=limits,
        base_env=base_env,
        log_path=log_path,
        cancel=cancel,
        cancel_reason=cancel_reason,
        on_start=on_start,
    )


async def test_success_has_log_tail_and_file(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "t.log"
    started = Started()
    result = await run(spec("sh", "-c", "echo out; echo err >&2"), log_path=log, on_start=started)
    assert result.outcome == "succeeded"
    assert result.exit_code == 0
    assert result.reason == "exit code 0"
    assert result.log_tail == "out\nerr\n"
    assert log.read_text() == "out\nerr\n"
    assert result.log_path == log
    assert started.pid > 0
    assert result.started_at.tzinfo is not None
    assert result.started_at <= result.finished_at


async def test_nonzero_exit_fails() -> None:
    result = await run(spec(shell="echo bad; exit 3"))
    assert result.outcome == "failed"
    assert result.exit_code == 3
    assert result.reason == "exit code 3"
    assert result.log_tail == "bad\n"


async def test_death_by_signal_names_it() -> None:
    result = await run(spec(shell="kill -SEGV $$"))
    assert result.outcome == "failed"
    assert result.exit_code == -signal.SIGSEGV
    assert result.reason == "killed by signal SIGSEGV"


async def test_timeout_kills_whole_group() -> None:
    started = Started()
    result = await run(
        spec("sh", "-c", "sleep 60 & sleep 60; wait", timeout_s=0.2), on_start=started
    )
    assert result.outcome == "timed_out"
    assert result.reason == "timed out after 0.2s; process group killed with SIGTERM"
    assert result.exit_code == -signal.SIGTERM
    await assert_group_gone(started.pid)


async def test_sigterm_ignored_gets_sigkill_after_grace(tmp_path: Path) -> None:
    cancel = asyncio.Event()
    started = Started()
    task = asyncio.create_task(
        run(
            spec(shell="trap '' TERM; touch ready; sleep 60 & sleep 60", cwd=str(tmp_path)),
            cancel=cancel,
            on_start=started,
        )
    )
    await wait_for_file(tmp_path / "ready")
    t0 = time.monotonic()
    cancel.set()
    result = await task
    assert time.monotonic() - t0 >= LIMITS.kill_grace_s
    assert result.outcome == "cancelled"
    assert result.exit_code == -signal.SIGKILL
    await assert_group_gone(started.pid)


async def test_timeout_reason_mentions_sigkill() -> None:
    # The trap runs within milliseconds of start; the 1 s timeout leaves ample margin.
    result = await run(spec(shell="trap '' TERM; sleep 60", timeout_s=1))
    assert result.outcome == "timed_out"
    assert result.reason == "timed out after 1s; process group killed with SIGKILL after 0.3s grace"


async def test_cancel_event_cancels_and_kills_group(tmp_path: Path) -> None:
    cancel = asyncio.Event()
    started = Started()
    task = asyncio.create_task(
        run(
            spec(shell="sleep 60 & sleep 60; wait"),
            cancel=cancel,
            cancel_reason=lambda: "operator said so",
            on_start=started,
        )
    )
    pid = await started.wait()
    cancel.set()
    result = await task
    assert result.outcome == "cancelled"
    assert result.reason == "cancelled: operator said so"
    await assert_group_gone(pid)


async def test_cancel_before_start_runs_nothing(tmp_path: Path) -> None:
    cancel = asyncio.Event()
    cancel.set()
    result = await run(spec(shell="touch ran", cwd=str(tmp_path)), cancel=cancel)
    assert result.outcome == "cancelled"
    assert result.exit_code is None
    assert not (tmp_path / "ran").exists()


async def test_cancelling_the_coroutine_kills_group() -> None:
    started = Started()
    task = asyncio.create_task(run(spec(shell="sleep 60 & sleep 60; wait"), on_start=started))
    pid = await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_group_gone(pid, within_s=0.5)


async def test_failing_on_start_still_kills_group() -> None:
    pids: list[int] = []

    def boom(pid: int) -> None:
        pids.append(pid)
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError):
        await run(spec("sleep", "60"), on_start=boom)
    await assert_group_gone(pids[0], within_s=0.5)


async def test_program_not_found() -> None:
    result = await run(spec("nope-tidegate-xyz", "arg"))
    assert result.outcome == "failed"
    assert result.exit_code is None
    assert result.reason.startswith("cannot start: ")
    assert "nope-tidegate-xyz" in result.reason


async def test_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    result = await run(spec(str(script)))
    assert result.outcome == "failed"
    assert result.exit_code is None
    assert "Permission denied" in result.reason


async def test_nul_byte_in_argv() -> None:
    result = await run(spec("echo", "a\x00b"))
    assert result.outcome == "failed"
    assert result.exit_code is None
    assert result.reason.startswith("cannot start: ")


async def test_no_command() -> None:
    result = await run(spec())
    assert result.outcome == "failed"
    assert result.exit_code is None
    assert result.reason.startswith("cannot start: ")


async def test_missing_cwd(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    result = await run(spec("true", cwd=missing))
    assert result.outcome == "failed"
    assert result.exit_code is None
    assert result.reason == f"cwd {missing} does not exist"


async def test_shell_mode_and_cwd(tmp_path: Path) -> None:
    result = await run(spec(shell="pwd; echo a | tr a b", cwd=str(tmp_path)))
    assert result.outcome == "succeeded"
    assert result.log_tail == f"{tmp_path}\nb\n"


async def test_env_overrides_base() -> None:
    result = await run(
        spec(shell='echo "$TG_A $TG_B"', env={"TG_B": "task"}),
        base_env={"PATH": os.environ["PATH"], "TG_A": "base", "TG_B": "base"},
    )
    assert result.log_tail == "base task\n"


async def test_log_truncation_keeps_tail(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    limits = ProcessLimits(kill_grace_s=0.3, log_max_bytes=100, log_tail_bytes=32)
    result = await run(
        spec(shell="head -c 100000 /dev/zero | tr '\\0' a; echo; echo THE-END"),
        limits=limits,
        log_path=log,
    )
    assert result.outcome == "succeeded"
    assert log.read_text() == "a" * 100 + "\n[tidegate: log truncated at 100 bytes]\n"
    assert result.log_tail.endswith("a\nTHE-END\n")
    assert len(result.log_tail.encode()) <= 32


async def test_tail_does_not_start_mid_character() -> None:
    limits = ProcessLimits(log_tail_bytes=3)
    result = await run(spec("printf", "xéé"), limits=limits)  # 78 c3 a9 c3 a9: cut after c3
    assert result.log_tail == "é"


async def test_unwritable_log_falls_back_to_tail(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = await run(spec("echo", "hi"), log_path=blocker / "sub" / "t.log")
    assert result.outcome == "succeeded"
    assert result.log_path is None
    assert result.log_tail.startswith("[tidegate: cannot write log:")
    assert result.log_tail.endswith("hi\n")


async def test_grandchild_in_group_is_killed_at_leader_exit() -> None:
    started = Started()
    t0 = time.monotonic()
    result = await run(spec(shell="sleep 60 & echo done"), on_start=started)
    assert time.monotonic() - t0 < 1.0
    assert result.outcome == "succeeded"
    assert result.log_tail == "done\n"
    await assert_group_gone(started.pid)


# Leaves the task's group (setsid) while keeping its stdout, i.e. the runner's pipe, open.
ESCAPEE = """
import os, sys, time
os.setsid()
open(sys.argv[2], "w").write(str(os.getpid()))
print("escaped", flush=True)
os.write(int(sys.argv[1]), b"x")
time.sleep(10)
"""
# Returns only once the escapee is out of the group, so the runner's group kill cannot reach it.
LEADER = """
import os, subprocess, sys
r, w = os.pipe()
subprocess.Popen([sys.executable, "-c", sys.argv[1], str(w), sys.argv[2]], pass_fds=(w,))
os.close(w)
os.read(r, 1)
"""


async def test_escaped_grandchild_holding_output_does_not_hang(tmp_path: Path) -> None:
    pid_file = tmp_path / "escapee.pid"
    try:
        t0 = time.monotonic()
        result = await run(spec(sys.executable, "-c", LEADER, ESCAPEE, str(pid_file)))
        assert time.monotonic() - t0 < 2.5
        assert result.outcome == "succeeded"
        assert result.log_tail.startswith("escaped\n")
        assert "rest unread" in result.log_tail
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
