"""Sending callbacks: an HTTP webhook (POST JSON, HMAC-signed) or a NATS request.

A send either delivers or raises `CallbackFailed` saying what the endpoint did; the message is
what an operator reads in the outbox's `last_error` and in the dead letters, so it names the
status, the timeout or the subject, never a Python exception class alone.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

import httpx
import nats.errors
from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.driver.callbacks.payload import Callback, encode_batch
from tidegate.errors import TidegateError
from tidegate.signing import (
    LEGACY_SIGNATURE_HEADER,
    legacy_signature,
    signed_headers,
    verify_legacy,
)
from tidegate.urlpolicy import BEFORE_WRITE, CheckedBackend, Net
from tidegate.wire import ClientRecord
from tidegate.wire.clients import ClientSecrets

SIGNATURE_HEADER: Final = LEGACY_SIGNATURE_HEADER
EVENT_ID_HEADER: Final = "X-Tidegate-Event-Id"
_SNIPPET = 200  # enough of an error body to say why, short enough for a table cell
# The most of a response body ever read: a callback answer is a status, and an endpoint that
# streams megabytes (or forever) must cost neither memory nor a sender's time.
MAX_BODY_BYTES: Final = 4096
MAX_ERROR_CHARS: Final = 1000  # an error as stored (outbox, dead letters) and shown
_KEEPALIVE_S: Final = 5.0  # an idle connection is closed after this (httpx's default)


def clean_error(text: str) -> str:
    """An error text fit to store and show: no NUL or other control characters (PostgreSQL
    text refuses NUL outright), whitespace runs folded, bounded in length. Every error that
    leaves this package (`CallbackFailed`, the outbox's `last_error`) passes through here."""
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    folded = " ".join(printable.split())
    if len(folded) > MAX_ERROR_CHARS:
        folded = folded[: MAX_ERROR_CHARS - 1] + "…"
    return folded


class CallbackFailed(TidegateError):
    """The client's endpoint did not take a callback; it goes to (or stays in) the outbox.

    `delivered` counts the callbacks of the same `send` that went through before this failure,
    so the caller outboxes only the rest, in order.
    """

    def __init__(self, message: str, *, delivered: int = 0) -> None:
        super().__init__(clean_error(message))
        self.delivered = delivered


sign = legacy_signature  # the names callers and tests know
verify = verify_legacy


def batch_max(client: ClientRecord) -> int:
    # `callback_batch_max` arrives with migration 0002; records decoded before it default to 1.
    return max(1, int(getattr(client, "callback_batch_max", 1)))


def _shown(url: str) -> str:
    """The URL for messages, without credentials or query (where tokens tend to live)."""
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid callback URL>"
    return str(u.copy_with(username=None, password=None, query=None, fragment=None))


async def _read_capped(resp: httpx.Response) -> bytes:
    """At most `MAX_BODY_BYTES` of the body; the rest is never read (the connection is closed
    rather than drained when the stream ends early)."""
    got = bytearray()
    async for chunk in resp.aiter_bytes():
        got += chunk
        if len(got) >= MAX_BODY_BYTES:
            break
    return bytes(got[:MAX_BODY_BYTES])


def _recording(
    check: Callable[[], None] | None, stopped: list[BaseException]
) -> Callable[[], None] | None:
    """`check`, noting what it raised: the HTTP stack reports it as a failed request, and the
    sender must raise it as it is instead."""
    if check is None:
        return None
    inner = check

    def checked() -> None:
        try:
            inner()
        except BaseException as exc:
            stopped.append(exc)
            raise

    return checked


async def _close_all(pools: Iterable[httpx.AsyncClient]) -> None:
    for http in pools:
        await http.aclose()


class _Idle:
    """A client's HTTP connections not in use, each in a pool of its own (most recent last)."""

    __slots__ = ("pools", "since")

    def __init__(self) -> None:
        self.pools: list[httpx.AsyncClient] = []
        self.since: list[float] = []  # loop time each was put back


class Transports:
    """One per driver: HTTP connections per client, and the driver's NATS connection.

    Each request in flight has a connection of its own, taken from its client's idle ones (or
    opened) and put back after its response, in an httpx pool of one connection. Not one pool
    for all: httpcore's pool (1.0.x) scans all its connections and queued requests on every
    request and response, hands one idle connection to every request queued at that moment
    (all but one then fail, requeue and scan again), and closes an idle connection whenever the
    pool holds more connections in all than its keep-alive cap. With 20 clients x 16 requests
    in flight a callback cost 2-12 ms of CPU and most requests reconnected (resolved and
    policy-checked anew); connections closed under queued requests hung them to the timeout.
    A pool that only ever holds one request has none of that to do. Nothing caps connections
    overall: a client has at most its requests in flight (`callback_concurrency`, plus the
    retry job's), and a hanging endpoint holds only its own client's. An idle connection is
    closed after `_KEEPALIVE_S`.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        timeout_s: float = 5.0,
        allowed_nets: Sequence[Net] = (),
        secrets: Callable[[str], ClientSecrets | None] = lambda _client: None,
    ) -> None:
        self._nc = nc
        # The driver's mirror of the secrets bucket (`tg_client_secrets`); a record that still
        # carries its secret (published by an older version) signs with that one.
        self._secrets = secrets
        self.timeout_s = timeout_s
        self._backend = CheckedBackend(allowed_nets)
        # Made once: loading the CA bundle costs ~30 ms, and every pool would do it again.
        self._ssl = httpx.create_ssl_context()
        self._idle: dict[str, _Idle] = {}
        self._busy: set[httpx.AsyncClient] = set()  # taken by requests in flight
        self._next_sweep = 0.0

    def _new_pool(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            verify=self._ssl,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=_KEEPALIVE_S
            ),
        )
        # Every connection goes through the address policy (it resolves names itself). httpx
        # has no public way to hand httpcore a network backend: this attribute is the way.
        transport._pool._network_backend = self._backend
        return httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(self.timeout_s),
            follow_redirects=False,
            headers={"User-Agent": "tidegate"},
            trust_env=False,  # no proxy from the environment: it would bypass the policy
        )

    async def _take(self, client: str) -> httpx.AsyncClient:
        now = asyncio.get_running_loop().time()
        if now >= self._next_sweep:
            self._next_sweep = now + _KEEPALIVE_S
            await self._sweep(now)
        idle = self._idle.get(client)
        if idle is not None and idle.pools:
            idle.since.pop()
            http = idle.pools.pop()
        else:
            http = self._new_pool()
        self._busy.add(http)
        return http

    def _put_back(self, client: str, http: httpx.AsyncClient) -> None:
        self._busy.discard(http)
        if http.is_closed:  # `close` came meanwhile
            return
        idle = self._idle.setdefault(client, _Idle())
        idle.pools.append(http)
        idle.since.append(asyncio.get_running_loop().time())

    async def _sweep(self, now: float) -> None:
        """Close the connections idle for longer than `_KEEPALIVE_S` (the oldest come first):
        httpx closes an expired one only when its pool is used again, and a quiet client's
        might never be."""
        stale: list[httpx.AsyncClient] = []
        for client, idle in list(self._idle.items()):
            n = bisect.bisect_left(idle.since, now - _KEEPALIVE_S)
            stale += idle.pools[:n]
            del idle.pools[:n], idle.since[:n]
            if not idle.pools:
                del self._idle[client]
        if stale:  # closing plain or TLS sockets does not wait on the peer: quick
            await asyncio.shield(_close_all(stale))  # a cancelled request closes them all too

    async def close(self) -> None:
        """Closes every connection, also those of requests in flight (which then fail)."""
        pools = [http for idle in self._idle.values() for http in idle.pools]
        pools += self._busy
        self._idle, self._busy = {}, set()
        await _close_all(pools)

    async def send(
        self,
        client: ClientRecord,
        callbacks: Sequence[Callback],
        *,
        before_each: Callable[[], None] | None = None,
    ) -> None:
        """Deliver in order, stopping at the first failure (later ones must not overtake it).

        `before_each` runs before every request and may raise to stop the send (the notifier
        checks that its lease is still its own); what it raises propagates as it is."""
        if not callbacks or (client.callback_url is None and not client.callback_nats):
            return
        size = batch_max(client)
        step = size if size > 1 else 1
        delivered = 0
        for i in range(0, len(callbacks), step):
            chunk = callbacks[i : i + step]
            body = encode_batch(chunk, batch=size > 1)
            if before_each is not None:
                before_each()
            stopped: list[BaseException] = []
            guard = BEFORE_WRITE.set(_recording(before_each, stopped))
            try:
                if client.callback_url is not None:
                    await self._post(client, client.callback_url, chunk[0].event_id, body)
                else:
                    await self._request(client.name, chunk[0].event_id, body)
            except CallbackFailed as exc:
                if stopped:  # not the endpoint: `before_each` stopped it at a socket write
                    raise stopped[0] from None
                exc.delivered = delivered
                raise
            finally:
                BEFORE_WRITE.reset(guard)
            delivered += len(chunk)

    async def _post(self, client: ClientRecord, url: str, event_id: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event_id}
        at = datetime.now(UTC)
        keys = (self._secrets(client.name) or ClientSecrets.of(client)).signing(at)
        if keys:
            # Signed as it is sent (a retry gets a fresh timestamp): the receiver's replay
            # window counts from the request, not from the event.
            headers |= signed_headers(keys, event_id, body, at)
        http = await self._take(client.name)
        try:
            # httpx's timeout is per phase (connect, each read); this one bounds the whole
            # exchange, so an endpoint trickling bytes cannot hold a sender for longer.
            async with (
                asyncio.timeout(self.timeout_s),
                http.stream("POST", url, content=body, headers=headers) as resp,
            ):
                head = await _read_capped(resp)
        except (TimeoutError, httpx.TimeoutException):
            raise CallbackFailed(f"timeout after {self.timeout_s:g}s from {_shown(url)}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CallbackFailed(
                f"cannot reach {_shown(url)}: {exc or type(exc).__name__}"
            ) from None
        except Exception as exc:  # anything else httpx raises for a URL it cannot use
            raise CallbackFailed(f"cannot call {_shown(url)}: {exc!r}") from None
        finally:
            self._put_back(client.name, http)
        if not resp.is_success:
            snippet = clean_error(head.decode("utf-8", "replace"))[:_SNIPPET]
            raise CallbackFailed(
                f"HTTP {resp.status_code} from {_shown(url)}" + (f": {snippet}" if snippet else "")
            )

    async def _request(self, client: str, event_id: str, body: bytes) -> None:
        subject = names.callback_subject(client)
        try:
            await self._nc.request(
                subject, body, timeout=self.timeout_s, headers={EVENT_ID_HEADER: event_id}
            )
        except nats.errors.NoRespondersError:
            raise CallbackFailed(f"no responders on {subject}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise CallbackFailed(f"timeout after {self.timeout_s:g}s on {subject}") from None
        except nats.errors.Error as exc:
            raise CallbackFailed(f"NATS request on {subject} failed: {exc!r}") from None
