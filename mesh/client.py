"""The client SDK: submit tasks to Tidegate over JetStream.

    async with await TidegateClient.connect("nats://127.0.0.1:4222", "billing") as tg:
        receipt = await tg.submit(TaskSpec(key="wf-1.node-3", argv=["/usr/bin/env", "true"]))

The PubAck *is* the durable acceptance: once `submit` returns, the task will run. Tasks are
validated here with the same schema the driver uses, so most bad input fails fast, locally.
`submit_many` and `submit_each` pipeline a batch: many publishes in flight (a bounded window),
PubAcks matched as they come, one outcome per task.

The rest of a client system's loop, always as itself (the subjects name its client): `get`,
`list` / `iter_tasks` and `cancel` are requests on `tg.api.<client>.<op>` that a driver answers
from the database (wire/api.py); `callbacks()` receives the client's NATS callbacks
(`tg.callback.<client>`) and answers each only once the code that handled it has returned.
"""

from __future__ import annotations

import builtins
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from tidegate import names
from tidegate.bus.natsconn import connect, url_user
from tidegate.bus.publish import DEFAULT_WINDOW, Outgoing, PubAck, Publisher
from tidegate.bus.quota import Grant, QuotaGate
from tidegate.bus.submit import id_secret as id_secret_of
from tidegate.bus.submit import task_message, task_messages, url_id_secret
from tidegate.embedded.natsauth import CLIENT_USER_PREFIX
from tidegate.errors import (
    ApiRefused,
    ApiUnavailable,
    BufferFull,
    ClientApiError,
    InvalidTask,
    SubmitError,
)
from tidegate.wire import (
    NAME_RE,
    ApiReply,
    ApiRequest,
    Callback,
    CancelReply,
    CancelTask,
    ErrorReply,
    GetTask,
    ListTasks,
    PageReply,
    State,
    TaskReply,
    TaskSpec,
    TaskState,
    decode_callbacks,
    decode_reply,
    encode,
    task_id,
)

log = logging.getLogger(__name__)
R = TypeVar("R", TaskReply, PageReply, CancelReply)

DEFAULT_MAX_TASK_BYTES = 64 * 1024
# Error replies that say the engine could not serve the request now (retry), not that the
# request is wrong (fix it).
_UNAVAILABLE_CODES = frozenset({"database_unavailable", "nats_unavailable", "internal"})


@dataclass(frozen=True, slots=True)
class Receipt:
    task_id: str
    seq: int
    duplicate: bool  # JetStream already held this key: it runs once, not twice


class PartlySubmitted(SubmitError):
    """Some tasks of a batch were not accepted; `outcomes` says, per task and in order, which
    (a `Receipt`, or the `SubmitError` / `BufferFull` for that task alone)."""

    def __init__(self, message: str, outcomes: list[Receipt | SubmitError]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


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
        check_quota: bool = True,
        id_secret: str | bytes | None = None,
    ) -> None:
        """`id_secret`: the NATS password `nc` connected with (`connect` passes it). It keys
        this client's submission ids (`Nats-Msg-Id: <client>:<key>#id-<tag>`), which nobody
        without it can forge to have a task of this client dropped as a duplicate; give it
        whenever the server has users. Without it the ids are the plain `<client>:<key>`."""
        if not re.match(NAME_RE, client):
            raise InvalidTask(f"client name {client!r} must match {NAME_RE}")
        self.client = client
        self._id_secret = id_secret_of(id_secret)
        self._nc = nc
        self._owns = owns_connection
        self._max_bytes = max_task_bytes
        self._timeout = timeout
        self._publisher = Publisher(nc, timeout=timeout, retries=retries)
        self._streams: set[CallbackStream] = set()
        # The client's own quota (`buffer_max`), which JetStream cannot hold: checked here,
        # when this connection may read the registry (a client's own credentials may not: the
        # router holds the quota then, and the stream-wide ceiling still refuses).
        self._quota = QuotaGate(nc.jetstream()) if check_quota else None

    @classmethod
    async def connect(
        cls,
        url: str,
        client: str,
        *,
        user: str | None = None,
        password: str | None = None,
        inbox_prefix: str | None = None,
        tls: ssl.SSLContext | None = None,
        **options: float,
    ) -> TidegateClient:
        """Connect as `client`. Where the server has users (`tidegate client add NAME --json`
        printed them), give its `user`, `password` and `inbox_prefix`, or put the user and
        password in the URL (`nats://user:password@host:4222`: the inbox prefix is then
        derived from the user). That password also keys this client's submission ids (see
        `__init__`).

        TLS: a `tls://` URL verifies the server against the system's CAs; `tls` is your own
        context (a private CA, a client certificate for mutual TLS), given to nats-py as is.
        Without it, TIDEGATE_NATS_TLS_CA/_CERT/_KEY apply when set."""
        creds: dict[str, str] = {}
        if user is not None:
            creds["user"] = user
        if password is not None:
            creds["password"] = password
        who = user or url_user(url)
        if inbox_prefix is None and who is not None:
            inbox_prefix = names.inbox_prefix(who)
        if inbox_prefix is not None:
            creds["inbox_prefix"] = inbox_prefix
        nc = await connect(url, f"tidegate-client-{client}", tls=tls, **creds)
        # A client system's own credentials allow no registry read (natsauth.py).
        as_client = who is not None and who.startswith(CLIENT_USER_PREFIX)
        return cls(
            nc,
            client,
            owns_connection=True,
            check_quota=not as_client,
            # The password given, else the URL's: what nats-py connects with.
            id_secret=id_secret_of(password) or url_id_secret(url),
            **options,  # type: ignore[arg-type]
        )

    def prepare(self, spec: TaskSpec) -> Outgoing:
        """Validate and encode one task; raises `InvalidTask` with the reason."""
        return task_message(
            self.client, spec, max_task_bytes=self._max_bytes, secret=self._id_secret
        )

    def _receipt(self, spec: TaskSpec, ack: PubAck) -> Receipt:
        return Receipt(task_id=task_id(self.client, spec.key), seq=ack.seq, duplicate=ack.duplicate)

    async def submit(self, spec: TaskSpec) -> Receipt:
        """Submit one task; raises `BufferFull` when this client is at its quota of waiting
        tasks (its own `buffer_max`, or the stream-wide one), `SubmitError` without a PubAck."""
        out = self.prepare(spec)
        grant = await self._take(1)
        if not grant.allowed:
            raise BufferFull(grant.reason)
        try:
            ack = await self._publisher.publish(out)
        except Exception:
            self._give_back(grant, 1)
            raise
        if ack.duplicate:
            self._give_back(grant, 1)
        return self._receipt(spec, ack)

    async def submit_many(
        self, specs: Iterable[TaskSpec], *, max_in_flight: int = DEFAULT_WINDOW
    ) -> list[Receipt]:
        """Submit many with PubAcks pipelined; one receipt per task, in order.

        Every task is validated before the first is published, so one bad task does not
        leave the batch half-submitted. If any task was not accepted (refused: its client's
        quota is full; or no PubAck after the retries), raises `PartlySubmitted` after all
        were tried; its `outcomes` tell which (`submit_each` returns them instead).
        """
        outcomes = await self.submit_each(specs, max_in_flight=max_in_flight)
        failed = [o for o in outcomes if isinstance(o, SubmitError)]
        if failed:
            raise PartlySubmitted(
                f"{len(failed)} of {len(outcomes)} tasks were not accepted (first: "
                f"{failed[0]}); resubmitting the same keys is safe",
                outcomes,
            ) from failed[0]
        return [o for o in outcomes if isinstance(o, Receipt)]

    async def submit_each(
        self, specs: Iterable[TaskSpec], *, max_in_flight: int = DEFAULT_WINDOW
    ) -> list[Receipt | SubmitError]:
        """Submit many, pipelined (at most `max_in_flight` PubAcks awaited at once); the
        outcome of each task, in order: its `Receipt` (accepted, or a duplicate of one
        accepted before), or the `SubmitError` that says why it was not accepted (for that
        task alone: the others are still submitted). Raises `InvalidTask` before publishing
        anything if a task is invalid."""
        batch: Sequence[TaskSpec] = list(specs)
        outgoing = task_messages(
            self.client, batch, max_task_bytes=self._max_bytes, secret=self._id_secret
        )
        # Beyond the client's own quota the last tasks are refused, as JetStream refuses
        # those beyond the stream-wide one.
        grant = await self._take(len(outgoing))
        published = await self._publisher.publish_many(
            outgoing[: grant.allowed], max_in_flight=max_in_flight
        )
        self._give_back(
            grant,
            sum(1 for r in published if not isinstance(r, PubAck) or r.duplicate),
        )
        refused = [BufferFull(grant.reason) for _ in outgoing[grant.allowed :]]
        results: list[PubAck | Exception] = [*published, *refused]
        return [
            self._receipt(s, r)
            if isinstance(r, PubAck)
            else r
            if isinstance(r, SubmitError)
            else SubmitError(f"{s.key}: {r}")
            for s, r in zip(batch, results, strict=True)
        ]

    async def _take(self, wanted: int) -> Grant:
        if self._quota is None:
            return Grant(allowed=wanted)
        return await self._quota.take(self.client, wanted)

    def _give_back(self, grant: Grant, count: int) -> None:
        if self._quota is not None:
            self._quota.give_back(self.client, grant, count)

    # --- reading and cancelling its own tasks (tg.api.<client>.<op>) ---------------------------

    async def get(self, key: str) -> TaskState | None:
        """The latest run of this client's task `key` (state, attempt, exit code, reason,
        times), None if the database has no such task yet (it lags the executors by a few
        seconds; a sensitive client's, never behind a callback). Raises `ApiUnavailable`
        (retry later) or `ApiRefused` (fix the call)."""
        reply = await self._call("get", GetTask(key=key))
        return self._expect(reply, TaskReply).task

    async def list(
        self,
        *,
        state: State | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        key_prefix: str | None = None,
        pool: str | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> PageReply:
        """One page of this client's tasks, newest first (`limit` at most 500); pass the
        page's `next` as `after` for the next page (None: this was the last)."""
        request = ListTasks(
            state=state,
            since=since,
            until=until,
            key_prefix=key_prefix,
            pool=pool,
            after=after,
            limit=limit,
        )
        return self._expect(await self._call("list", request), PageReply)

    async def iter_tasks(
        self,
        *,
        state: State | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        key_prefix: str | None = None,
        pool: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[TaskState]:
        """Every task of this client that matches, newest first, a page at a time."""
        after: str | None = None
        while True:
            page = await self.list(
                state=state,
                since=since,
                until=until,
                key_prefix=key_prefix,
                pool=pool,
                after=after,
                limit=page_size,
            )
            for task in page.tasks:
                yield task
            if page.next is None:
                return
            after = page.next

    async def cancel(self, key: str, *, run: int | None = None) -> CancelReply:
        """Cancel this client's task `key`: its latest run (or the `run` named). A running
        process group is killed, a queued task is cancelled when an executor takes it;
        cancelling a finished task does nothing. Sending it again is safe."""
        return self._expect(await self._call("cancel", CancelTask(key=key, run=run)), CancelReply)

    async def _call(self, op: str, request: ApiRequest) -> ApiReply:
        subject = names.api_subject(self.client, op)
        try:
            msg = await self._nc.request(subject, encode(request), timeout=self._timeout)
        except nats.errors.NoRespondersError:
            raise ApiUnavailable(
                f"no driver serves {subject}: start one (`tidegate driver`, or `tidegate up`), "
                "then retry",
                code="no_driver",
            ) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise ApiUnavailable(
                f"no answer on {subject} within {self._timeout:g}s: the drivers are busy or "
                "away; retry",
                code="timeout",
            ) from None
        except nats.errors.Error as exc:  # the connection is closed or cannot send
            raise ApiUnavailable(
                f"the request on {subject} failed ({exc!r}): check this client's NATS "
                "connection, then retry",
                code="nats",
            ) from None
        try:
            reply = decode_reply(msg.data)
        except ValueError as exc:
            raise ApiUnavailable(
                f"the answer on {subject} is not the client API's ({exc}): upgrade the drivers "
                "or this SDK so that they match",
                code="bad_reply",
            ) from None
        if isinstance(reply, ErrorReply):
            error = ApiUnavailable if reply.code in _UNAVAILABLE_CODES else ApiRefused
            raise error(reply.message, code=reply.code)
        return reply

    @staticmethod
    def _expect(reply: ApiReply, kind: builtins.type[R]) -> R:
        if not isinstance(reply, kind):
            raise ClientApiError(
                f"a driver answered with {type(reply).__name__}, not {kind.__name__}: "
                "upgrade the drivers or this SDK so that they match",
                code="bad_reply",
            )
        return reply

    # --- callbacks (tg.callback.<client>) -------------------------------------------------------

    def callbacks(self, *, queue: str = names.CALLBACK_QUEUE) -> CallbackStream:
        """This client's NATS callbacks, in the order the driver sends them (for a client
        registered with `--callback-nats`). Every process of the client in the same `queue`
        shares them: each callback goes to one. See `CallbackStream`."""
        stream = CallbackStream(self._nc, self.client, queue=queue, on_close=self._streams.discard)
        self._streams.add(stream)
        return stream

    async def close(self) -> None:
        for stream in builtins.list(self._streams):
            await stream.close()
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


class CallbackStream:
    """A client's NATS callbacks as an async iterator, each answered once it was handled:

        async with tg.callbacks() as callbacks:
            async for cb in callbacks:
                await handle(cb)

    A callback is answered (acknowledged to the driver) when the loop asks for the next one,
    or when the `async with` block ends without an exception: only after the loop's body
    returned. If the body raises (out of the `async with`: an exception caught inside it
    ends the block normally, which answers), the callback is not answered, and the driver
    delivers it again later (from its outbox). So delivery is at least once: drop duplicates by
    `event_id`, and answer within the driver's callback timeout (`TIDEGATE_CALLBACK_TIMEOUT_S`,
    5 s by default), or the driver takes the callback as failed and sends it again later. A
    batch (a client with `--callback-batch-max` above 1) is answered once all its callbacks
    were handled. A request that is not a callback is logged and left unanswered.
    """

    def __init__(
        self,
        nc: NATS,
        client: str,
        *,
        queue: str = names.CALLBACK_QUEUE,
        on_close: Callable[[CallbackStream], None] | None = None,
    ) -> None:
        self.subject = names.callback_subject(client)
        self._nc = nc
        self._queue = queue
        self._on_close = on_close
        self._sub: Subscription | None = None
        self._handling: Msg | None = None  # the request whose callbacks are being handled
        self._left: deque[Callback] = deque()  # its callbacks not yet handed out
        self._closed = False

    async def start(self) -> CallbackStream:
        """Subscribe (the first `async for` step does it too); callbacks sent before this
        wait in the driver's outbox and come later."""
        if self._closed:
            raise ClientApiError(f"the callbacks on {self.subject} were closed", code="closed")
        if self._sub is None:
            self._sub = await self._nc.subscribe(self.subject, queue=self._queue)
            await self._nc.flush()  # the server has the interest before we say we listen
        return self

    async def __aenter__(self) -> CallbackStream:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._left:
            await self._answer()
        await self.close()

    def __aiter__(self) -> CallbackStream:
        return self

    async def __anext__(self) -> Callback:
        if self._left:
            return self._left.popleft()
        await self._answer()  # every callback of the previous request has been handled
        await self.start()
        assert self._sub is not None
        while True:
            # Ends (StopAsyncIteration) when the stream is closed meanwhile.
            msg = await self._sub.messages.__anext__()
            try:
                callbacks = decode_callbacks(msg.data)
            except ValueError as exc:
                log.warning("not a callback on %s, left unanswered: %s", self.subject, exc)
                continue
            if not callbacks:  # an empty batch: nothing to handle
                await self._respond(msg)
                continue
            self._handling = msg
            self._left.extend(callbacks[1:])
            return callbacks[0]

    async def _answer(self) -> None:
        msg, self._handling = self._handling, None
        if msg is not None:
            await self._respond(msg)

    async def _respond(self, msg: Msg) -> None:
        if msg.reply:
            await msg.respond(b"")

    async def close(self) -> None:
        """Stop receiving. A callback being handled is not answered (the driver sends it
        again), nor are those received and not yet handed out."""
        if self._closed:
            return
        self._closed = True
        self._handling = None
        self._left.clear()
        sub, self._sub = self._sub, None
        if self._on_close is not None:
            self._on_close(self)
        if sub is not None and not self._nc.is_closed:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:  # the connection is going away as well
                log.debug("unsubscribing from %s failed: %r", self.subject, exc)
