"""The executor's rules for a work message: when it is still ours, and what an error costs."""

from __future__ import annotations

import asyncio
import os
import random
import resource
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tidegate.executor.process import LaunchFault, ProcessLimits, run_process
from tidegate.executor.workmsg import (
    PRESTART_RETRY,
    Slot,
    after_error,
    let_go,
    ownership_margin,
    still_ours,
)
from tidegate.wire import TaskSpec, WorkItem

ITEM = WorkItem(
    task_id="alpha:k1",
    client="alpha",
    spec=TaskSpec(key="k1", argv=["/bin/true"]),
    pool="default",
    task_class="short",
    submitted_at=datetime(2026, 1, 1, tzinfo=UTC),
)


def _slot(*, held_s: float = 0.0, attempt: int = 1, handbacks: int = 0) -> Slot:
    slot = Slot(item=ITEM, attempt=attempt, handbacks=handbacks)
    slot.touched = asyncio.get_running_loop().time() - held_s
    return slot


async def test_ours_only_until_the_ack_wait_less_a_margin() -> None:
    assert ownership_margin(3.0) == pytest.approx(0.3) and ownership_margin(30.0) == 1.0
    assert still_ours(_slot(held_s=2.5), 3.0)
    assert not still_ours(_slot(held_s=2.8), 3.0)  # the server may redeliver any moment now
    assert not still_ours(_slot(held_s=60.0), 3.0)  # a frozen executor, resumed


async def test_a_slot_let_go_stays_let_go_and_stops_its_runner() -> None:
    slot = _slot()
    let_go(slot)
    assert slot.let_go and slot.cancel.is_set() and "no longer" in slot.cancel_reason
    slot.touched = asyncio.get_running_loop().time()  # a late answer to an old progress
    assert not still_ours(slot, 3.0)


async def test_error_before_the_process_started_is_a_hand_back_with_a_growing_delay() -> None:
    random.seed(1)
    first = after_error(_slot(handbacks=0))
    assert first.handed_back
    assert PRESTART_RETRY.base_s * 0.8 <= first.delay_s <= PRESTART_RETRY.base_s * 1.2
    later = after_error(_slot(handbacks=4))
    assert later.handed_back and later.delay_s >= PRESTART_RETRY.base_s * 16 * 0.8
    capped = after_error(_slot(handbacks=40))
    assert capped.delay_s <= PRESTART_RETRY.cap_s * 1.2


async def test_error_after_the_process_started_spends_the_attempt() -> None:
    slot = _slot(attempt=2)
    slot.pgid = 12345  # started: its side effects may have happened
    then = after_error(slot)
    assert not then.handed_back
    assert then.delay_s >= PRESTART_RETRY.base_s * 2 * 0.8  # still never a tight loop


async def test_a_host_out_of_file_descriptors_is_a_launch_fault_not_a_task_failure(
    tmp_path: Path,
) -> None:
    spec = TaskSpec(key="k", argv=["/bin/true"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, hard))  # no pipe can be made now
    try:
        with pytest.raises(LaunchFault, match="cannot start a process on this host"):
            await run_process(spec, limits=ProcessLimits(), base_env={}, log_path=None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # A missing program is the task's own failure.
    missing = TaskSpec(key="k", argv=[str(tmp_path / "no-such-program")])
    result = await run_process(missing, limits=ProcessLimits(), base_env={}, log_path=None)
    assert result.outcome == "failed" and "cannot start" in result.reason
