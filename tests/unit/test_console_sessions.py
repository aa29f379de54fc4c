"""Console sessions without servers: the memory side of the session store, and the roster's
rules for which sessions stand."""

from __future__ import annotations

import secrets
import time

from tidegate.console.auth import Operator, Roster
from tidegate.console.link import BusLink
from tidegate.console.sessions import SessionStore, kv_key
from tidegate.store.operators import RosterEntry


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **kwargs: int) -> SessionStore:
    # A link that never connects: NATS is down, memory is all there is.
    return SessionStore(BusLink("nats://127.0.0.1:1"), max_age_s=60, clock=clock, **kwargs)


def _id() -> str:
    return secrets.token_hex(32)


async def test_a_session_lives_in_memory_while_nats_is_down() -> None:
    clock = Clock()
    store = _store(clock)
    sid = _id()
    await store.set(sid, b'{"username":"alice"}', expires_in=60)
    assert await store.get(sid) == b'{"username":"alice"}'
    assert await store.exists(sid)
    assert await store.expires_in(sid) == 60
    clock.now += 59
    assert await store.get(sid) is not None
    await store.set(sid, b'{"username":"alice"}', expires_in=60)  # each response slides it
    clock.now += 59
    assert await store.get(sid) is not None
    clock.now += 2
    assert await store.get(sid) is None


async def test_delete_and_renew() -> None:
    clock = Clock()
    store = _store(clock)
    sid = _id()
    await store.set(sid, "data", expires_in=10)
    assert await store.get(sid, renew_for=100) == b"data"
    clock.now += 50
    assert await store.get(sid) == b"data"
    await store.delete(sid)
    assert await store.get(sid) is None
    await store.delete(_id())  # unknown: a no-op


async def test_anonymous_sessions_and_foreign_ids_are_never_stored() -> None:
    store = _store(Clock())
    sid = _id()
    await store.set(sid, b"{}")
    assert await store.get(sid) is None and not store._cache
    for bad in ("../etc", "A" * 64, "abc", "tg.>", _id() + "x"):
        await store.set(bad, b'{"username":"mallory"}')
        assert await store.get(bad) is None
    assert not store._cache


async def test_memory_is_bounded_oldest_first() -> None:
    store = _store(Clock(), cache_max=3)
    ids = [_id() for _ in range(4)]
    for sid in ids:
        await store.set(sid, b'{"n":1}')
    assert await store.get(ids[0]) is None
    assert [await store.get(sid) for sid in ids[1:]] == [b'{"n":1}'] * 3


def test_kv_keys_do_not_reveal_session_ids() -> None:
    sid = _id()
    assert kv_key(sid) != sid and len(kv_key(sid)) == 64


def _session(role: str = "operator", tag: str = "t1", at: float = 100.0) -> dict[str, object]:
    return {"username": "alice", "role": role, "tag": tag, "at": at}


def test_roster_before_any_read_trusts_the_session() -> None:
    roster = Roster()
    assert roster.admit(_session()) == Operator(username="alice", role="operator")
    assert roster.admit({"username": "alice"}) is None  # not one of ours
    assert roster.admit(_session(role="root")) is None


def test_roster_ends_removed_operators_and_changed_passwords() -> None:
    roster = Roster()
    roster.entries = {"alice": RosterEntry(username="alice", role="viewer", tag="t1")}
    roster.loaded_at = 200.0
    # The role now in the table wins over the one at login.
    assert roster.admit(_session()) == Operator(username="alice", role="viewer")
    assert roster.admit(_session(tag="old")) is None  # password changed since this login
    roster.entries = {}
    assert roster.admit(_session()) is None  # removed
    # A login newer than the last read is trusted until the next read.
    assert roster.admit(_session(at=time.time() + 10)) is not None
