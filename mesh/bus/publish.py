"""Pipelined JetStream publishing: many PubAcks in flight, timeouts retried with the same id.

nats-py's `js.publish` waits for one PubAck at a time (~8k msgs/s here); this publishes on
core NATS with a reply subject under one inbox and matches PubAcks as they come back. A batch
keeps a sliding window of publishes in flight (a new one goes out as PubAcks come back, not a
window at a time), and each publish has its own deadline counted from when it was sent. A
timed-out publish is *unknown*, not failed: it is resent with the same `Nats-Msg-Id`, and the
stream's dedup window makes the resend harmless; a late PubAck of an earlier send still counts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tidegate.backoff import Backoff
from tidegate.errors import BufferFull, SubmitError, Unsendable

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_PER_SUBJECT_FULL = 10077  # JetStream: "maximum messages per subject exceeded"
# In flight per batch by default: enough to keep a loopback connection busy, and small enough
# that a loaded server answers the last of them well within the timeout (20 clients x 1,000
# in flight at 10k PubAcks/s is 2 s of queue; 20 x 4,000 was 8 s, and every publish timed out).
DEFAULT_WINDOW = 1000


def _quota_full(subject: str, text: str) -> str:
    """A per-subject limit is a per-client quota (TASKS: `tg.submit.<client>`, READY:
    `tg.ready.<client>.<pool>`): say whose, and what to do."""
    parts = subject.split(".")
    client = parts[2] if len(parts) >= 3 else "?"
    return (
        f"buffer full: client {client!r} has reached its quota of waiting tasks on {subject} "
        f"(TIDEGATE_CLIENT_BUFFER_MAX; JetStream: {text}). Other clients are not affected; "
        "resume or serve this client's backlog, then resubmit the same keys"
    )


def unsendable(exc: BaseException) -> bool:
    """The give-up rule of every retried publish: only a message that can never be sent."""
    return isinstance(exc, Unsendable)


# A flood holds one of each per message at once: `gc=False` keeps the collector from
# scanning them again and again (they hold only strings and numbers, so no cycle).
class PubAck(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    stream: str
    seq: int
    duplicate: bool


class Outgoing(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    subject: str
    payload: bytes
    msg_id: str


class _AckBody(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """JetStream's answer to a publish: a PubAck, or an API error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_AckBody).decode


def _answer(data: bytes, status: str | None, subject: str) -> PubAck | Exception:
    """What one reply says about its publish."""
    if status == "503":
        return SubmitError(f"no stream accepts {subject!r}: is the driver's topology created?")
    try:
        body = _decode_ack(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return SubmitError(f"unreadable PubAck: {data[:200]!r}")
    error = body.error
    if error:
        text = f"{error.get('description', error)} (code {error.get('err_code', '?')})"
        if error.get("err_code") == _PER_SUBJECT_FULL or "per subject" in text:
            return BufferFull(_quota_full(subject, text))
        if "maximum" in text and ("bytes" in text or "messages" in text):
            return BufferFull(f"buffer full: {text}")
        return SubmitError(text)
    return PubAck(stream=body.stream, seq=body.seq, duplicate=body.duplicate)


class _Run:
    """One `publish_many` call: its results and what it has in flight.

    `flights` maps each in-flight token to (index, sent at), oldest first: every publish has
    the same timeout, so the overdue ones are always a prefix."""

    __slots__ = ("batch", "flights", "left", "low", "results", "spent", "tries", "waiter")

    def __init__(self, batch: Sequence[Outgoing], window: int) -> None:
        self.batch = batch
        self.results: list[PubAck | Exception | None] = [None] * len(batch)
        self.left = len(batch)
        self.flights: dict[str, tuple[int, float]] = {}
        self.tries = [0] * len(batch)
        self.spent: list[str] = []  # tokens given up on whose late PubAck still counts
        self.waiter: asyncio.Future[None] | None = None
        # Wake the sender when this much room is free, not on every PubAck: sending in
        # chunks costs one wake-up per chunk instead of one per message.
        self.low = max(0, window - max(1, window // 4))

    def settle(self, index: int, result: PubAck | Exception) -> None:
        if self.results[index] is None:
            self.results[index] = result
            self.left -= 1
        waiter = self.waiter
        if (
            waiter is not None
            and not waiter.done()
            and (self.left == 0 or len(self.flights) <= self.low)
        ):
            waiter.set_result(None)


class Publisher:
    """One per connection; safe to share between tasks of one event loop."""

    def __init__(self, nc: NATS, *, timeout: float = 5.0, retries: int = 3) -> None:
        self._nc = nc
        self._timeout = timeout
        self._retries = retries
        # Between tries of a send the connection refused: short, as a resend is harmless.
        self._backoff = Backoff(base_s=min(0.2, timeout), cap_s=timeout)
        self._prefix = ""
        self._sub: Subscription | None = None
        self._pending: dict[str, tuple[_Run, int]] = {}  # token → (its run, index in it)
        self._ids = itertools.count()
        self._raw = _RawSender(nc)

    async def _ensure_inbox(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
            _ReplySink.attach(self._sub, self._take_reply)

    async def _on_reply(self, msg: Msg) -> None:
        self._take_reply(msg)

    def _take_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) + 1 :]
        found = self._pending.pop(token, None)
        if found is None:
            return  # its run ended (done, given up on, or cancelled)
        run, index = found
        run.flights.pop(token, None)
        if run.results[index] is not None:
            return  # a late PubAck of a publish already answered
        headers = msg.headers
        status = headers.get("Status") if headers else None
        run.settle(index, _answer(msg.data, status, run.batch[index].subject))

    async def publish(self, out: Outgoing) -> PubAck:
        (result,) = await self.publish_many((out,), max_in_flight=1)
        if isinstance(result, Exception):
            raise result
        return result

    async def publish_many(
        self, batch: Sequence[Outgoing], *, max_in_flight: int = DEFAULT_WINDOW
    ) -> list[PubAck | Exception]:
        """Publish all, pipelined; one result per message, in order (errors as values).

        At most `max_in_flight` unanswered at once. A publish without a PubAck within the
        timeout is resent (same id) up to `retries` times, then reported for that message only;
        a refusal (buffer full, no stream) is reported at once and not retried.
        """
        if not batch:
            return []
        await self._ensure_inbox()
        loop = asyncio.get_running_loop()
        window = max(1, max_in_flight)
        run = _Run(batch, window)
        queue = list(range(len(batch)))  # what is to be sent, in order; resends go first
        queue.reverse()
        refused = 0  # sends in a row the connection refused (disconnected, buffer full)
        resume_at = 0.0
        try:
            while run.left:
                now = loop.time()
                self._expire(run, queue, now)
                if queue and now >= resume_at and len(run.flights) < window:
                    error = self._send_some(run, queue, window, now)
                    if error is None:
                        refused = 0
                        await self._raw.flush()
                    else:
                        refused += 1
                        resume_at = now + self._backoff.delay(refused)
                if not run.left:
                    break
                await self._wait(run, loop, queue, resume_at, window)
        finally:
            for token in itertools.chain(run.flights, run.spent):
                self._pending.pop(token, None)
        return [r if r is not None else SubmitError("not published") for r in run.results]

    def _send_some(self, run: _Run, queue: list[int], window: int, now: float) -> Exception | None:
        """Send from `queue` until the window is full; the error that stopped it, if any."""
        flights = run.flights
        pending = self._pending
        prefix = self._prefix
        while queue and len(flights) < window:
            index = queue[-1]
            out = run.batch[index]
            token = str(next(self._ids))
            run.tries[index] += 1
            try:
                self._raw.send(out, f"{prefix}.{token}")
            except (Unsendable, nats.errors.MaxPayloadError) as exc:  # never sendable
                queue.pop()
                run.settle(
                    index,
                    exc
                    if isinstance(exc, Unsendable)
                    else Unsendable(f"{out.msg_id} is larger than the server's max payload"),
                )
                continue
            except nats.errors.Error as exc:  # disconnected and the reconnect buffer is full
                if run.tries[index] > self._retries:
                    queue.pop()
                    run.settle(index, self._gave_up(out, exc))
                return exc
            queue.pop()
            flights[token] = (index, now)
            pending[token] = (run, index)
        return None

    def _expire(self, run: _Run, queue: list[int], now: float) -> None:
        """Overdue publishes: resent (queued first) while tries remain, else reported."""
        oldest = now - self._timeout
        flights = run.flights
        while flights:
            token, (index, sent) = next(iter(flights.items()))
            if sent > oldest:
                return
            del flights[token]
            run.spent.append(token)  # a late PubAck of this send still answers it
            if run.results[index] is not None:
                continue
            if run.tries[index] > self._retries:
                run.settle(index, self._gave_up(run.batch[index], None))
            else:
                queue.append(index)

    def _gave_up(self, out: Outgoing, last: Exception | None) -> SubmitError:
        why = f"{last}" if last is not None else f"no PubAck within {self._timeout}s"
        return SubmitError(
            f"no PubAck for {out.msg_id} after {self._retries + 1} tries ({why}); "
            "it may be stored: resubmit the same key"
        )

    async def _wait(
        self,
        run: _Run,
        loop: asyncio.AbstractEventLoop,
        queue: list[int],
        resume_at: float,
        window: int,
    ) -> None:
        """Until there is room to send, a publish is overdue, or the run is done."""
        now = loop.time()
        if queue and len(run.flights) < window:
            # Room, but sending is paused after a refused send.
            timeout = max(0.0, resume_at - now)
        else:
            timeout = self._timeout
        if run.flights:
            _, sent = next(iter(run.flights.values()))
            timeout = min(timeout, max(0.0, sent + self._timeout - now))
        if timeout <= 0:
            await asyncio.sleep(0)  # let PubAcks in before looking again
            return
        waiter = run.waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            run.waiter = None

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        self._pending.clear()


class _ReplySink:
    """Hands each PubAck to the publisher as nats-py reads it, instead of through the
    subscription's queue and task: at flood rates that queue hop costs about as much as the
    rest of a PubAck's handling (a third of the client's CPU per task).

    It takes the place of nats-py's "old style request" future of the subscription (a
    private attribute of nats-py 2.x, whose reader resolves it directly); where that attribute
    does not exist the subscription's callback gets every reply, as usual."""

    def __init__(self, take: Callable[[Msg], None]) -> None:
        self._take = take

    @staticmethod
    def attach(sub: Subscription, take: Callable[[Msg], None]) -> None:
        if hasattr(sub, "_future") and sub._future is None:
            sub._future = _ReplySink(take)  # type: ignore[assignment]

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        try:
            self._take(msg)
        except Exception:  # one bad reply must not stop nats-py's reader
            log.exception("cannot handle a PubAck on %s", msg.subject)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def ack_buffered(msgs: Iterable[Msg]) -> None:
    """Ack each message, one buffered write each, and kick the flusher once at the end.

    `msg.ack()` goes through `nc.publish`, whose checks cost several times the write, and
    every routed task and projected event is acked (a flood acks twice per task)."""
    senders: dict[int, _RawSender] = {}
    try:
        for msg in msgs:
            nc = msg._client
            sender = senders.get(id(nc))
            if sender is None:
                sender = senders[id(nc)] = _RawSender(nc)
            sender.ack(msg)
    finally:  # the acks before one that raised still go out now, as `msg.ack()` sent them
        for sender in senders.values():
            await sender.flush()


class _RawSender:
    """Writes PUB and HPUB commands straight into nats-py's outgoing buffer.

    `nc.publish` validates the subject, reply and header names on every call, which costs
    about 4 times the write itself (18 µs against 4 µs here); our subjects come from
    `tidegate.names` and our ids hold no whitespace, so the header is built by hand. The checks
    that matter at run time (closed, draining, reconnect buffer full, payload size) are kept.
    It relies on nats-py 2.x internals (`_pending`, `_pending_data_size`, `_flush_pending`,
    `_flush_queue`, `_max_pending_size`); `tests/unit/test_submit_window.py` checks they exist.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    def send(self, out: Outgoing, reply: str) -> None:
        nc = self._nc
        self._check_open()
        msg_id = out.msg_id
        if "\n" in msg_id or "\r" in msg_id:
            raise Unsendable(f"a message id cannot hold a line break: {msg_id!r}")
        payload = out.payload
        size = len(payload)
        if size > nc.max_payload:
            raise nats.errors.MaxPayloadError
        hdr = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + b"\r\n\r\n"
        cmd = (
            f"HPUB {out.subject} {reply} {len(hdr)} {len(hdr) + size}\r\n".encode()
            + hdr
            + payload
            + b"\r\n"
        )
        self._append(cmd, size)

    def ack(self, msg: Msg) -> None:
        """`msg.ack()` without the subject check (the reply is the server's own), and with
        its errors: not a JetStream delivery, acked already."""
        msg._check_reply()
        self._check_open()
        self._append(f"PUB {msg.reply} 0\r\n\r\n".encode(), 0)
        msg._ackd = True

    def _check_open(self) -> None:
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError

    def _append(self, cmd: bytes, size: int) -> None:
        nc = self._nc
        if not nc.is_connected:
            limit = nc._max_pending_size
            if limit <= 0 or len(cmd) + nc._pending_data_size > limit:
                raise nats.errors.OutboundBufferLimitError
        # The buffer is written by nats-py's flusher when `flush` kicks it (or at its size
        # limit): appending here never waits.
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += size

    async def flush(self) -> None:
        nc = self._nc
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            await nc._flush_pending(force_flush=True)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
