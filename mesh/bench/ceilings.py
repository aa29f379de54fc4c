"""The raw ceilings a flood is compared with, measured in the same run on the same machine:

- spawn: one asyncio process spawning and reaping the flood's command N times, as many at once
  as the fleet has slots (executors x slots). No executor can run tasks faster than this.
- publish: N submissions of the same size published to a JetStream stream, pipelined by hand
  (core publishes with a reply inbox, PubAcks collected as they come, a bounded window in
  flight). No SDK can have them accepted faster than this.

Each runs alone (before any mode's components start), so the ceiling is what the machine gives
one process with nothing else of ours running; other load on the machine shows in both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from tidegate import names
from tidegate.bench.figures import per_second
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Outgoing
from tidegate.bus.submit import task_message
from tidegate.embedded.servers import EmbeddedNats
from tidegate.wire import TaskSpec

PUBLISH_WINDOW: Final = 20_000  # PubAcks outstanding at most
WARM_UP: Final = 1_000
PUBLISH_TIMEOUT_S: Final = 120.0
MAX_BYTES: Final = 1 << 20  # the flood's tasks are tiny: no limit of interest here


class Ceilings(msgspec.Struct, kw_only=True):
    tasks: int
    in_flight: int  # processes at once in the spawn ceiling: executors x slots
    spawn_s: float | None = None
    spawn_per_s: float | None = None
    publish_s: float | None = None
    publish_per_s: float | None = None
    error: str | None = None


async def spawn_ceiling(argv: Sequence[str], count: int, in_flight: int) -> float:
    """Seconds to spawn and reap `count` processes of `argv`, `in_flight` at a time."""
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(in_flight, count)))))
    return time.perf_counter() - started


async def publish_ceiling(nats_url: str, specs: Sequence[TaskSpec], client: str) -> float:
    """Seconds until every spec, encoded as `client`'s submission, is stored and acked."""
    nc = await connect(nats_url, "tidegate-bench-ceiling")
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=names.BENCH_CEILING_STREAM,
                subjects=[names.BENCH_CEILING_SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                discard=DiscardPolicy.NEW,
                storage=StorageType.FILE,  # as the real streams: the same server work per message
            )
        )
        outs = [task_message(client, spec, max_task_bytes=MAX_BYTES) for spec in specs]
        # A warm-up round first (other message ids): the first publishes to a fresh stream
        # pay for its files and the connection's buffers, which is not the steady rate.
        warm = [
            task_message(f"{client}-warm", spec, max_task_bytes=MAX_BYTES)
            for spec in specs[:WARM_UP]
        ]
        await _publish_all(nc, warm)
        return await _publish_all(nc, outs)
    finally:
        await nc.close()


async def _publish_all(nc: NATS, outs: Sequence[Outgoing]) -> float:
    """Seconds to publish `outs` pipelined and collect every PubAck."""
    acked = 0
    errors = 0
    room = asyncio.Event()
    done = asyncio.Event()
    inbox = nc.new_inbox()

    async def on_ack(msg: object) -> None:
        nonlocal acked, errors
        acked += 1
        if b'"error"' in getattr(msg, "data", b""):
            errors += 1
        room.set()
        if acked == len(outs):
            done.set()

    sub = await nc.subscribe(inbox + ".*", cb=on_ack)
    started = time.perf_counter()
    for i, out in enumerate(outs):
        while i - acked >= PUBLISH_WINDOW:
            room.clear()
            await room.wait()
        await nc.publish(
            names.BENCH_CEILING_SUBJECT,
            out.payload,
            reply=f"{inbox}.{i}",
            headers={"Nats-Msg-Id": out.msg_id},
        )
    if outs:
        await asyncio.wait_for(done.wait(), PUBLISH_TIMEOUT_S)
    took = time.perf_counter() - started
    await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"{errors} of {len(outs)} ceiling publishes were refused")
    return took


async def measure_ceilings(
    root: Path, argv: Sequence[str], specs: Sequence[TaskSpec], client: str, in_flight: int
) -> Ceilings:
    """Both ceilings; publishing to a nats-server of its own under `root`, stopped after."""
    result = Ceilings(tasks=len(specs), in_flight=in_flight)
    spawn_s = await spawn_ceiling(argv, len(specs), in_flight)
    result.spawn_s = round(spawn_s, 3)
    result.spawn_per_s = per_second(len(specs), spawn_s)
    server = EmbeddedNats(root / "ceiling-nats")
    try:
        url = server.start()
        publish_s = await publish_ceiling(url, specs, client)
        result.publish_s = round(publish_s, 3)
        result.publish_per_s = per_second(len(specs), publish_s)
    finally:
        server.stop()
    return result
