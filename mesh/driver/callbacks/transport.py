"""Sending callbacks: an HTTP webhook (POST JSON, HMAC-signed) or a NATS request.

A send either delivers or raises `CallbackFailed` saying what the endpoint did; the message is
what an operator reads in the outbox's `last_error` and in the dead letters, so it names the
status, the timeout or the subject, never a Python exception class alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

import httpx
import nats.errors
from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.driver.callbacks.payload import Callback, encode_batch
from tidegate.errors import TidegateError
from tidegate.wire import ClientRecord

SIGNATURE_HEADER: Final = "X-Tidegate-Signature"
EVENT_ID_HEADER: Final = "X-Tidegate-Event-Id"
_SNIPPET = 200  # enough of an error body to say why, short enough for a table cell


class CallbackFailed(TidegateError):
    """The client's endpoint did not take a callback; it goes to (or stays in) the outbox.

    `delivered` counts the callbacks of the same `send` that went through before this failure,
    so the caller outboxes only the rest, in order.
    """

    def __init__(self, message: str, *, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    # compare_digest on bytes: a str holding non-ASCII would raise instead of answering False.
    return hmac.compare_digest(sign(secret, body).encode(), signature.encode())


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


class Transports:
    """One per driver: a shared HTTP connection pool and the driver's NATS connection."""

    def __init__(self, nc: NATS, *, timeout_s: float = 5.0) -> None:
        self._nc = nc
        self.timeout_s = timeout_s
        # No global connection cap: with httpx's default (100 for all hosts) a hanging endpoint
        # holding every connection would make every other client's callbacks wait for a slot.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            headers={"User-Agent": "tidegate"},
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, client: ClientRecord, callbacks: Sequence[Callback]) -> None:
        """Deliver in order, stopping at the first failure (later ones must not overtake it)."""
        if not callbacks or (client.callback_url is None and not client.callback_nats):
            return
        size = batch_max(client)
        step = size if size > 1 else 1
        delivered = 0
        for i in range(0, len(callbacks), step):
            chunk = callbacks[i : i + step]
            body = encode_batch(chunk, batch=size > 1)
            try:
                if client.callback_url is not None:
                    await self._post(client, client.callback_url, chunk[0].event_id, body)
                else:
                    await self._request(client.name, chunk[0].event_id, body)
            except CallbackFailed as exc:
                exc.delivered = delivered
                raise
            delivered += len(chunk)

    async def _post(self, client: ClientRecord, url: str, event_id: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event_id}
        if client.callback_secret:
            headers[SIGNATURE_HEADER] = sign(client.callback_secret, body)
        try:
            # httpx's timeout is per phase (connect, each read); this one bounds the whole
            # exchange, so an endpoint trickling bytes cannot hold a sender for longer.
            async with asyncio.timeout(self.timeout_s):
                resp = await self._http.post(url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise CallbackFailed(f"timeout after {self.timeout_s:g}s from {_shown(url)}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CallbackFailed(
                f"cannot reach {_shown(url)}: {exc or type(exc).__name__}"
            ) from None
        except Exception as exc:  # anything else httpx raises for a URL it cannot use
            raise CallbackFailed(f"cannot call {_shown(url)}: {exc!r}") from None
        if not resp.is_success:
            snippet = " ".join(resp.text[:_SNIPPET].split())
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
