"""Login sessions that outlive a PostgreSQL outage, and a NATS one, for whoever is logged in.

An outage is when an operator most needs the console, so sessions live neither in PostgreSQL
nor only in NATS: `SessionStore` (a Litestar store) keeps them in this process's memory and
writes them through to the NATS KV bucket `tg_console_sessions`. Reads look at memory first
and at KV on a miss, so a restarted console finds its sessions again, and a session keeps
working while NATS is down, on the memory copy.

- While NATS answers, a memory copy is trusted for `TRUST_S`, then read again from KV: a
  logout on another console (a key gone from KV) ends the session here within that time.
- An unchanged session is written again at most every `KV_REFRESH_S` (Litestar saves the
  session with every response; one KV write per page view would be waste). Each write
  restarts the key's age in the bucket, whose TTL is the session's maximum age.
- KV keys are SHA-256 digests of the session ids: someone who can read the bucket learns no
  cookie to log in with.

The session id in the cookie is only ever one this console generated (`SessionBackend`), and
login hands out a new one (`start_session`): a cookie planted before login is worth nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.middleware.session.server_side import (
    ServerSideSessionBackend,
    ServerSideSessionConfig,
)
from litestar.stores.base import Store
from litestar.types import Empty, Message, ScopeSession
from litestar.utils.scope.state import ScopeState
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from tidegate.bus.buckets import ensure_sessions_bucket
from tidegate.console.link import BusLink

log = logging.getLogger(__name__)

STORE_NAME: Final = "sessions"  # the key in Litestar's `stores`
SESSION_ID_BYTES: Final = 32
SESSION_ID = re.compile(r"[0-9a-f]{64}")  # token_hex(SESSION_ID_BYTES)
KV_TIMEOUT_S: Final = 1.0  # a page waits no longer than this for NATS
TRUST_S: Final = 30.0
KV_REFRESH_S: Final = 60.0
BUCKET_RETRY_S: Final = 5.0
CACHE_MAX: Final = 10_000
EMPTY: Final = b"{}"  # an anonymous visitor's session: never stored


class _Stored(msgspec.Struct, frozen=True):
    """A session as kept in KV."""

    expires_at: float  # seconds since the epoch
    data: bytes


_decode = msgspec.msgpack.Decoder(_Stored).decode


@dataclass(slots=True)
class _Entry:
    data: bytes
    expires_at: float
    checked_at: float  # when KV last agreed with this copy (or we wrote it)
    put_at: float | None  # when it was last written to KV; None: not yet (NATS was down)


_MISSING: Final = object()  # KV answered: no such session
_UNAVAILABLE: Final = object()  # KV did not answer: fall back on memory


def kv_key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _seconds(value: int | timedelta | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class SessionStore(Store):
    """Litestar's `Store` for sessions: memory in front of a NATS KV bucket."""

    def __init__(
        self,
        link: BusLink,
        *,
        max_age_s: int,
        replicas: int = 1,
        cache_max: int = CACHE_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._link = link
        self._max_age_s = max_age_s
        self._replicas = replicas  # of the sessions bucket, when this console creates it
        self._cache_max = cache_max
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._bucket: KeyValue | None = None
        self._bucket_retry_at = 0.0
        self._pending_deletes: set[str] = set()  # KV keys to delete once NATS is back
        self._kv_failing = False

    # --- the bucket ------------------------------------------------------------------------------

    async def _kv(self) -> KeyValue | None:
        """The bucket while NATS is connected, else None (at once: pages must not wait)."""
        js = self._link.js
        if js is None:
            return None
        if self._bucket is None:
            if self._clock() < self._bucket_retry_at:
                return None
            try:
                self._bucket = await asyncio.wait_for(
                    ensure_sessions_bucket(js, float(self._max_age_s), self._replicas),
                    KV_TIMEOUT_S * 5,
                )
            except Exception as exc:
                self._bucket_retry_at = self._clock() + BUCKET_RETRY_S
                self._failed("create the sessions bucket", exc)
                return None
        if self._pending_deletes:
            await self._flush_deletes(self._bucket)
        return self._bucket

    async def _flush_deletes(self, kv: KeyValue) -> None:
        for key in list(self._pending_deletes):
            try:
                await asyncio.wait_for(kv.purge(key), KV_TIMEOUT_S)
            except Exception as exc:
                self._failed("delete a session", exc)
                return
            self._pending_deletes.discard(key)

    def _failed(self, what: str, exc: BaseException) -> None:
        # One warning per outage, not one per page view.
        if not self._kv_failing:
            log.warning("sessions: cannot %s in NATS (%s); using memory", what, exc or type(exc))
        self._kv_failing = True

    def _ok(self) -> None:
        if self._kv_failing:
            log.info("sessions: NATS KV answers again")
        self._kv_failing = False

    async def _kv_get(self, session_id: str) -> _Stored | object:
        kv = await self._kv()
        if kv is None:
            return _UNAVAILABLE
        try:
            entry = await asyncio.wait_for(kv.get(kv_key(session_id)), KV_TIMEOUT_S)
        except KeyNotFoundError:
            self._ok()
            return _MISSING
        except Exception as exc:
            self._failed("read a session", exc)
            return _UNAVAILABLE
        self._ok()
        if not entry.value:  # an aged-out key reads as an empty value (nats-py 2.16)
            return _MISSING
        try:
            return _decode(entry.value)
        except msgspec.DecodeError:
            log.warning("sessions: dropping an undecodable session entry")
            return _MISSING

    async def _kv_put(self, session_id: str, entry: _Entry) -> None:
        kv = await self._kv()
        if kv is None:
            return
        value = msgspec.msgpack.encode(_Stored(expires_at=entry.expires_at, data=entry.data))
        try:
            await asyncio.wait_for(kv.put(kv_key(session_id), value), KV_TIMEOUT_S)
        except Exception as exc:
            self._failed("save a session", exc)
            return
        self._ok()
        entry.put_at = entry.checked_at = self._clock()

    # --- memory ----------------------------------------------------------------------------------

    def _remember(self, session_id: str, entry: _Entry) -> None:
        self._cache[session_id] = entry
        self._cache.move_to_end(session_id)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)

    async def _entry(self, session_id: str) -> _Entry | None:
        now = self._clock()
        entry = self._cache.get(session_id)
        if entry is not None and entry.expires_at <= now:
            del self._cache[session_id]
            entry = None
        # Not in KV yet (saved while NATS was down): memory is the only copy, trust it.
        if entry is not None and (entry.put_at is None or now - entry.checked_at < TRUST_S):
            self._cache.move_to_end(session_id)
            return entry
        found = await self._kv_get(session_id)
        if found is _UNAVAILABLE:
            return entry  # NATS is down: the memory copy, if any, stands
        if not isinstance(found, _Stored) or found.expires_at <= now:
            self._cache.pop(session_id, None)  # logged out elsewhere, or aged out
            return None
        # put_at in the past: the next save writes it again, restarting its age in the bucket.
        fresh = _Entry(found.data, found.expires_at, checked_at=now, put_at=now - KV_REFRESH_S)
        self._remember(session_id, fresh)
        return fresh

    # --- litestar.stores.base.Store --------------------------------------------------------------

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        if not SESSION_ID.fullmatch(key):
            return None  # not an id we hand out: never a KV lookup for it
        entry = await self._entry(key)
        if entry is None:
            return None
        renew = _seconds(renew_for)
        if renew:
            entry.expires_at = self._clock() + renew
        return entry.data

    async def set(
        self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
    ) -> None:
        data = value.encode() if isinstance(value, str) else value
        if not SESSION_ID.fullmatch(key):
            return
        if data == EMPTY:
            # Litestar saves even an empty session; an anonymous page view costs nothing here.
            if key in self._cache:
                await self.delete(key)
            return
        now = self._clock()
        expires_at = now + (_seconds(expires_in) or self._max_age_s)
        entry = self._cache.get(key)
        if (
            entry is not None
            and entry.data == data
            and entry.put_at is not None
            and now - entry.put_at < KV_REFRESH_S
        ):
            entry.expires_at = expires_at
            self._cache.move_to_end(key)
            return
        entry = _Entry(data, expires_at, checked_at=now, put_at=None)
        self._remember(key, entry)
        await self._kv_put(key, entry)

    async def delete(self, key: str) -> None:
        # Only a session this console knows (a load puts it in memory first) can be deleted:
        # a request with an unknown cookie costs no KV write.
        if self._cache.pop(key, None) is None:
            return
        self._pending_deletes.add(kv_key(key))
        await self._kv()  # flushes the deletes when NATS answers; else they wait for it

    async def delete_all(self) -> None:
        self._cache.clear()
        kv = await self._kv()
        if kv is None:
            log.warning("sessions: NATS is down; sessions in KV were not deleted")
            return
        try:
            keys = await asyncio.wait_for(kv.keys(), KV_TIMEOUT_S * 5)
        except Exception:  # NoKeysError for an empty bucket, or NATS failing again
            return
        self._pending_deletes.update(keys)
        await self._flush_deletes(kv)

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def expires_in(self, key: str) -> int | None:
        if not SESSION_ID.fullmatch(key):
            return None
        entry = await self._entry(key)
        return None if entry is None else int(entry.expires_at - self._clock())


class SessionBackend(ServerSideSessionBackend):
    """Server-side sessions whose ids are only ever ours: a cookie that is not a well-formed
    id is ignored (a new id is made), and `start_session` swaps the id at login."""

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        chosen = connection.get_session_id()  # decided at the start of the request, or at login
        if chosen:
            return chosen
        cookie = connection.cookies.get(self.config.key)
        if cookie and SESSION_ID.fullmatch(cookie):
            return cookie
        return self.generate_session_id()

    async def store_in_message(
        self,
        scope_session: ScopeSession,
        message: Message,
        connection: ASGIConnection[Any, Any, Any, Any],
    ) -> None:
        # A visitor who is not logged in and has no cookie gets none: nothing to keep for them.
        anonymous = scope_session is Empty or not scope_session
        if anonymous and not connection.cookies.get(self.config.key):
            return
        await super().store_in_message(scope_session, message, connection)


@dataclass
class SessionConfig(ServerSideSessionConfig):
    _backend_class = SessionBackend


def session_config(max_age_s: int) -> SessionConfig:
    # Lax, not Strict: a link to the console from a chat or a ticket opens it logged in;
    # cross-site POSTs still carry no cookie. Secure is added per request over TLS
    # (security.security_headers).
    return SessionConfig(
        key="tg_session",
        max_age=max_age_s,
        session_id_bytes=SESSION_ID_BYTES,
        httponly=True,
        samesite="lax",
        store=STORE_NAME,
        # No session work for what needs none.
        exclude=["^/static/", "^/health$"],
    )


async def start_session(request: Request[Any, Any, Any], data: dict[str, Any]) -> None:
    """Log in: the old session (if any) is deleted and a new id carries `data`, so an id
    someone planted in the browser before login never becomes a logged-in one."""
    old = request.get_session_id()
    if old:
        await request.app.stores.get(STORE_NAME).delete(old)
    ScopeState.from_scope(request.scope).session_id = secrets.token_hex(SESSION_ID_BYTES)
    request.set_session(data)
