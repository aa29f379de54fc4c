"""Peak RSS and CPU seconds per component of one mode's run, sampled with psutil.

A component is a root process and its descendants, except the tasks it runs (processes of
the flood's command): the driver, each executor (with any worker processes of its own),
nats-server, PostgreSQL (the postmaster and its backends) and the benchmark process itself.

- Peak RSS: the highest sum of the component's processes' RSS over the samples. PostgreSQL's
  shared buffers are counted once per backend that touched them, so its figure is an upper bound.
- CPU seconds: user + system of the component's processes at the last sample, plus what the
  root has reaped (`children_*`): PostgreSQL's exited backends. For an executor the reaped
  children are its tasks, reported apart as `tasks_cpu_s`. The benchmark process counts alone
  (its children are the other components, and the spawn ceiling's processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

import msgspec
import psutil

SAMPLE_S: Final = 0.5


class Usage(msgspec.Struct, kw_only=True):
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0
    tasks_cpu_s: float | None = None  # executors: CPU of the task processes they reaped


class _Component:
    def __init__(
        self, name: str, pid: int, task_name: str | None, reaped_are_tasks: bool, alone: bool
    ) -> None:
        self.name = name
        self.alone = alone  # the root only: the benchmark's children are components of their own
        self.root = psutil.Process(pid)
        self.task_name = task_name
        self.reaped_are_tasks = reaped_are_tasks
        self.procs: dict[int, psutil.Process] = {}
        self.usage = Usage(tasks_cpu_s=0.0 if reaped_are_tasks else None)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            members = [self.root, *([] if self.alone else self.root.children(recursive=True))]
            rss = 0
            cpu = 0.0
            for p in members:
                proc = self.procs.setdefault(p.pid, p)  # the same object: CPU times stay its own
                with contextlib.suppress(psutil.Error):
                    if self.task_name and proc is not self.root and proc.name() == self.task_name:
                        continue
                    rss += proc.memory_info().rss
                    t = proc.cpu_times()
                    cpu += t.user + t.system
            t = self.root.cpu_times()
            reaped = t.children_user + t.children_system
            self.usage.peak_rss_mb = max(self.usage.peak_rss_mb, round(rss / 2**20, 1))
            if self.alone:
                self.usage.cpu_s = round(cpu, 2)
            elif self.reaped_are_tasks:
                self.usage.cpu_s = round(cpu, 2)
                self.usage.tasks_cpu_s = round(reaped, 2)
            else:
                self.usage.cpu_s = round(cpu + reaped, 2)


class UsageMeter:
    """Add components by pid, then run `sample()` as a task until the flood is over."""

    def __init__(self, task_command: str | None = None) -> None:
        self._task_name = os.path.basename(task_command) if task_command else None
        self._components: list[_Component] = []

    def add(
        self, name: str, pid: int | None, *, runs_tasks: bool = False, alone: bool = False
    ) -> None:
        if pid is None:
            return
        task_name = self._task_name if runs_tasks else None
        with contextlib.suppress(psutil.Error):
            self._components.append(_Component(name, pid, task_name, runs_tasks, alone))

    def sample_once(self) -> None:
        for c in self._components:
            c.sample()

    async def sample(self) -> None:
        while True:
            self.sample_once()
            await asyncio.sleep(SAMPLE_S)

    def figures(self) -> dict[str, Usage]:
        return {c.name: c.usage for c in self._components}
