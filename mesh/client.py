"""The client SDK: submit tasks to Tidegate over JetStream.

    async with await TidegateClient.connect("nats://127.0.0.1:4222", "billing") as tg:
        receipt = await tg.submit(TaskSpec(key="wf-1.node-3", argv=["/usr/bin/env", "true"]))

The PubAck *is* the durable acceptance: once `submit` returns, the task will run. Tasks are
validated here with the same schema the driver uses, so most bad input fails fast, locally.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from nats.aio.client import Client as NATS

from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.bus.submit import task_message
from tidegate.errors import InvalidTask, SubmitError
from tidegate.wire import NAME_RE, TaskSpec, task_id

DEFAULT_MAX_TASK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Receipt:
    task_id: str
    seq: int
    duplicate: bool  # JetStream already held this key: it runs once, not twice


class TidegateClient:
    def __init__(
        self,
        nc: NATS,
        client: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        max_task_bytes: int = DEFAULT_MAX_TASK_BYTES,
        owns_connection: bool = False,
    ) -> None:
        if not re.match(NAME_RE, client):
            raise InvalidTask(f"client name {client!r} must match {NAME_RE}")
        self.client = client
        self._nc = nc
        self._owns = owns_connection
        self._max_bytes = max_task_bytes
        self._publisher = Publisher(nc, timeout=timeout, retries=retries)

    @classmethod
    async def connect(cls, url: str, client: str, **options: float) -> TidegateClient:
        nc = await connect(url, f"tidegate-client-{client}")
        return cls(nc, client, owns_connection=True, **options)  # type: ignore[arg-type]

    def prepare(self, spec: TaskSpec) -> Outgoing:
        """Validate and encode one task; raises `InvalidTask` with the reason."""
        return task_message(self.client, spec, max_task_bytes=self._max_bytes)

    def _receipt(self, spec: TaskSpec, ack: PubAck) -> Receipt:
        return Receipt(task_id=task_id(self.client, spec.key), seq=ack.seq, duplicate=ack.duplicate)

    async def submit(self, spec: TaskSpec) -> Receipt:
        return self._receipt(spec, await self._publisher.publish(self.prepare(spec)))

    async def submit_many(
        self, specs: Iterable[TaskSpec], *, max_in_flight: int = 4000
    ) -> list[Receipt]:
        """Submit many with PubAcks pipelined; raises after all were tried if any failed.

        Every task is validated before the first is published, so one bad task does not
        leave the batch half-submitted.
        """
        batch: Sequence[TaskSpec] = list(specs)
        outgoing = [self.prepare(s) for s in batch]
        results = await self._publisher.publish_many(outgoing, max_in_flight=max_in_flight)
        failed = [
            (s.key, r) for s, r in zip(batch, results, strict=True) if isinstance(r, Exception)
        ]
        if failed:
            key, first = failed[0]
            raise SubmitError(
                f"{len(failed)} of {len(batch)} tasks were not acknowledged (first: {key}: "
                f"{first}); resubmitting the same keys is safe"
            ) from first
        return [
            self._receipt(s, r)
            for s, r in zip(batch, results, strict=True)
            if isinstance(r, PubAck)
        ]

    async def close(self) -> None:
        await self._publisher.close()
        if self._owns:
            await self._nc.drain()

    async def __aenter__(self) -> TidegateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
