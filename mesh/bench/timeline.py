"""The flood over time: what each stage holds every half second, for the plot and the progress
line. Read from JetStream's stream and consumer info (cheap requests to nats-server) and from
counts the benchmark keeps anyway (terminal tasks polled, callbacks received)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Final, TextIO

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tidegate import names

SAMPLE_S: Final = 0.5


class Point(msgspec.Struct, array_like=True, kw_only=True):
    """One sample; array-like in the JSON (a long run has hundreds)."""

    t: float  # seconds since the flood began
    accepted: int  # submissions stored in TASKS so far (PubAcks sent)
    submitted: int  # … waiting to be routed
    ready: int  # routed, waiting for their client's turn (READY)
    work: int  # dispatched, not yet done and acked by an executor (WORK)
    events: int  # state events the projector has not acked
    db_terminal: int  # tasks terminal in the database (the poller's last count)
    callbacks: int  # callbacks received by the sink


async def _messages(js: JetStreamContext, stream: str) -> tuple[int, int]:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return 0, 0
    return int(info.state.messages or 0), int(info.state.last_seq or 0)


async def _pending(js: JetStreamContext, stream: str, consumer: str) -> int:
    try:
        info = await js.consumer_info(stream, consumer)
    except NotFoundError:
        return 0
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


class Timeline:
    """`run()` as a task samples until cancelled; with `out` it also keeps a progress line."""

    def __init__(
        self,
        js: JetStreamContext,
        label: str,
        tasks: int,
        callbacks_expected: int,
        db_terminal: Callable[[], int],
        callbacks: Callable[[], int],
        out: TextIO | None = None,
    ) -> None:
        self.js = js
        self.label = label
        self.tasks = tasks
        self.callbacks_expected = callbacks_expected
        self.db_terminal = db_terminal
        self.callbacks = callbacks
        self.out = out
        self.points: list[Point] = []
        self._base_seq = 0

    async def start(self) -> None:
        """Before the flood: submissions already in TASKS (none on a fresh stack) not counted."""
        _, self._base_seq = await _messages(self.js, names.TASKS_STREAM)

    async def sample(self, t: float) -> Point:
        submitted, last_seq = await _messages(self.js, names.TASKS_STREAM)
        ready, _ = await _messages(self.js, names.READY_STREAM)
        work, _ = await _messages(self.js, names.WORK_STREAM)
        events = await _pending(self.js, names.EVENTS_STREAM, names.PROJECTOR_CONSUMER)
        point = Point(
            t=round(t, 2),
            accepted=last_seq - self._base_seq,
            submitted=submitted,
            ready=ready,
            work=work,
            events=events,
            db_terminal=self.db_terminal(),
            callbacks=self.callbacks(),
        )
        self.points.append(point)
        return point

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            point = await self.sample(loop.time() - started)
            if self.out is not None:
                self.out.write("\r" + progress_line(self.label, point, self))
                self.out.flush()
            await asyncio.sleep(SAMPLE_S)

    def finish(self) -> None:
        if self.out is not None and self.points:
            self.out.write("\n")
            self.out.flush()


def all_routed_at(points: list[Point], tasks: int) -> float | None:
    """The first sample at which every submission was accepted and none waited to be routed:
    how long the flood took to reach the ready queues (to the sampling's half second)."""
    return next((p.t for p in points if p.accepted >= tasks and p.submitted == 0), None)


def route_waits(points: list[Point], tasks: int) -> list[float]:
    """Seconds from each submission's PubAck until it was routed, read off the samples.

    The k-th submission counts as accepted at the first sample with `accepted >= k`, and as
    routed at the first with `accepted - submitted >= k`: the route step takes each client's
    submissions in order and the clients in turns, so the k-th routed is about the k-th
    accepted. Each wait is known to one sampling interval (`SAMPLE_S`) either way. Tasks not
    routed by the last sample have none."""
    waits: list[float] = []
    a = r = 0
    for k in range(1, tasks + 1):
        while a < len(points) and points[a].accepted < k:
            a += 1
        while r < len(points) and points[r].accepted - points[r].submitted < k:
            r += 1
        if r == len(points):
            break
        # Never negative: a sample's routed count is at most its accepted count, so a <= r.
        waits.append(points[r].t - points[a].t)
    return waits


def progress_line(label: str, p: Point, tl: Timeline) -> str:
    return (
        f"{label}: {p.t:6.1f}s  accepted {p.accepted:,}/{tl.tasks:,}  "
        f"terminal {p.db_terminal:,}/{tl.tasks:,}  callbacks {p.callbacks:,}/"
        f"{tl.callbacks_expected:,}  backlog: route {p.submitted:,} ready {p.ready:,} "
        f"work {p.work:,} project {p.events:,}   "
    )


def progress_stream(wanted: bool | None) -> TextIO | None:
    """stderr when asked for (`--progress`), or by default when stderr is a terminal."""
    if wanted is False:
        return None
    if wanted or sys.stderr.isatty():
        return sys.stderr
    return None
