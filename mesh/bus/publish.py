"""Pipelined JetStream publishing: many PubAcks in flight, timeouts retried with the same id.

nats-py's `js.publish` waits for one PubAck at a time (~8k msgs/s here); this publishes on
core NATS with a reply subject under one inbox and matches PubAcks as they come back
(>100k msgs/s). A timed-out publish is *unknown*, not failed: it is resent with the same
`Nats-Msg-Id`, and the stream's dedup window makes the resend harmless.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tidegate.backoff import Backoff
from tidegate.errors import BufferFull, SubmitError

MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True, slots=True)
class PubAck:
    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    payload: bytes
    msg_id: str


class Publisher:
    """One per connection; safe to share between tasks of one event loop."""

    def __init__(self, nc: NATS, *, timeout: float = 5.0, retries: int = 3) -> None:
        self._nc = nc
        self._timeout = timeout
        self._retries = retries
        # Between tries of one publish: short, as a resend with the same id is harmless.
        self._backoff = Backoff(base_s=min(0.2, timeout), cap_s=timeout)
        self._prefix = ""
        self._sub: Subscription | None = None
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._ids = itertools.count()

    async def _ensure_inbox(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        fut = self._pending.pop(token, None)
        if fut is None or fut.done():
            return  # a late PubAck of a publish we already resent
        status = (msg.headers or {}).get("Status")
        if status == "503":
            fut.set_exception(
                SubmitError(f"no stream accepts {msg.subject!r}: is the driver's topology created?")
            )
            return
        try:
            body = json.loads(msg.data)
        except ValueError:
            fut.set_exception(SubmitError(f"unreadable PubAck: {msg.data[:200]!r}"))
            return
        error = body.get("error")
        if error:
            text = f"{error.get('description', error)} (code {error.get('err_code', '?')})"
            if "maximum" in text and ("bytes" in text or "messages" in text):
                fut.set_exception(BufferFull(f"buffer full: {text}"))
            else:
                fut.set_exception(SubmitError(text))
            return
        fut.set_result(
            PubAck(
                stream=body["stream"], seq=int(body["seq"]), duplicate=bool(body.get("duplicate"))
            )
        )

    async def _send_once(self, out: Outgoing) -> asyncio.Future[PubAck]:
        await self._ensure_inbox()
        token = str(next(self._ids))
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        # A future given up on (timed out, cancelled) must not wait in the map forever.
        fut.add_done_callback(lambda _f: self._pending.pop(token, None))
        # A fresh headers dict per publish: nats-py writes into the one it is given.
        try:
            await self._nc.publish(
                out.subject,
                out.payload,
                reply=f"{self._prefix}.{token}",
                headers={MSG_ID_HEADER: out.msg_id},
            )
        except BaseException:
            fut.cancel()  # never sent: its done-callback forgets it
            raise
        return fut

    async def publish(self, out: Outgoing) -> PubAck:
        last: Exception | None = None
        for attempt in range(self._retries + 1):
            try:
                fut = await self._send_once(out)
            except nats.errors.Error as exc:  # disconnected and the reconnect buffer is full
                last = exc
                await asyncio.sleep(self._backoff.delay(attempt + 1))
                continue
            try:
                return await asyncio.wait_for(fut, self._timeout)
            except TimeoutError as exc:
                last = exc  # unknown outcome: resend with the same id
        raise SubmitError(
            f"no PubAck for {out.msg_id} after {self._retries + 1} tries of {self._timeout}s; "
            "it may be stored: resubmit the same key"
        ) from last

    async def publish_many(
        self, batch: Sequence[Outgoing], *, max_in_flight: int = 4000
    ) -> list[PubAck | Exception]:
        """Publish all, pipelined; one result per message, in order (errors as values).

        Sends a window of messages, then waits once for the window's PubAcks (one timer, not
        one per message); what timed out is resent with the same ids.
        """
        results: list[PubAck | Exception | None] = [None] * len(batch)
        for start in range(0, len(batch), max_in_flight):
            window = range(start, min(start + max_in_flight, len(batch)))
            await self._publish_window(batch, window, results)
        return [r if r is not None else SubmitError("not published") for r in results]

    async def _publish_window(
        self,
        batch: Sequence[Outgoing],
        window: range,
        results: list[PubAck | Exception | None],
    ) -> None:
        todo = list(window)
        last: dict[int, Exception] = {}
        for attempt in range(self._retries + 1):
            futures: dict[int, asyncio.Future[PubAck]] = {}
            for i in todo:
                try:
                    futures[i] = await self._send_once(batch[i])
                except nats.errors.Error as exc:  # disconnected, reconnect buffer full
                    last[i] = exc
            if futures:
                try:
                    await asyncio.wait(futures.values(), timeout=self._timeout)
                except asyncio.CancelledError:
                    for fut in futures.values():
                        fut.cancel()  # forgotten by their done-callbacks
                    raise
            retry = [i for i in todo if i not in futures]
            for i, fut in futures.items():
                if not fut.done():
                    fut.cancel()  # unknown outcome: resend with the same id
                    last[i] = TimeoutError(f"no PubAck within {self._timeout}s")
                    retry.append(i)
                elif fut.exception() is not None:
                    results[i] = fut.exception()  # type: ignore[assignment]
                else:
                    results[i] = fut.result()
            if not retry:
                return
            todo = sorted(retry)
            await asyncio.sleep(self._backoff.delay(attempt + 1))
        for i in todo:
            results[i] = SubmitError(
                f"no PubAck for {batch[i].msg_id} after {self._retries + 1} tries "
                f"({last.get(i)}); it may be stored: resubmit the same key"
            )

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
