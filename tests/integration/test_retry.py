"""The callback outbox and its retry job against a real PostgreSQL and a real HTTP receiver:
backoff, order per client, dead letters, several drivers at once, and a down client next to a
healthy one."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from harness import LOOPBACK
from nats.aio.client import Client as NATS
from receiver import Receiver, refused_url
from test_callbacks import Client, make_callbacks

from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.retry import RetryStats, retry_pass, schedule_retries
from tidegate.driver.callbacks.transport import CallbackFailed, Transports
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.wire import ClientRecord

FAST = RetryPolicy(base_s=0.05, factor=2, cap_s=0.2, jitter=0.2)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url)
    async with Store(database_url, max_size=8) as s:
        yield s


@pytest.fixture
async def transports() -> AsyncIterator[Transports]:
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    yield t
    await t.close()


async def drain(
    step: Callable[[], Awaitable[object]], outbox: Outbox, timeout: float = 20.0
) -> None:
    """Run retry passes (the scheduler's job, compressed) until the outbox is empty."""
    deadline = time.monotonic() + timeout
    while await outbox.count():
        assert time.monotonic() < deadline, f"outbox not drained: {await outbox.count()} left"
        await step()
        await asyncio.sleep(0.02)


def assert_in_order(received: list[Callback], sent: list[Callback]) -> None:
    """Everything arrived, in outbox order, and no task went back to an older state."""
    first_seen = list(dict.fromkeys(c.event_id for c in received))
    assert first_seen == [c.event_id for c in sent]
    rank = {"running": 0, "succeeded": 1}
    latest: dict[str, int] = {}
    for cb in received:
        assert rank[cb.state] >= latest.get(cb.task_id, -1), f"{cb.event_id} after a newer state"
        latest[cb.task_id] = rank[cb.state]


# --- RetryPolicy.delay (pure) ----------------------------------------------------------------


def test_retry_delay_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=1, factor=2, cap_s=30, jitter=0)
    rng = random.Random(1)
    assert [policy.delay(a, rng) for a in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(0, rng) == 1  # nothing failed yet: the base, not less
    assert policy.delay(100_000, rng) == 30  # no overflow


def test_retry_delay_jitter_stays_within_bounds_and_spreads() -> None:
    policy = RetryPolicy(base_s=1, factor=3, cap_s=300, jitter=0.2)
    rng = random.Random(7)
    for attempts, nominal in [(1, 1), (2, 3), (3, 9), (9, 300)]:
        samples = [policy.delay(attempts, rng) for _ in range(500)]
        assert all(nominal * 0.8 <= s <= nominal * 1.2 for s in samples)
        assert max(samples) - min(samples) > nominal * 0.3  # actually jittered
    a, b = random.Random(3), random.Random(3)
    assert policy.delay(4, a) == policy.delay(4, b)  # pure given the rng


def test_retry_policy_rejects_nonsense() -> None:
    for bad in (
        dict(base_s=0),
        dict(factor=0.5),
        dict(cap_s=0.5),
        dict(jitter=1.0),
        dict(max_attempts=0),
        dict(max_age_s=0),
    ):
        with pytest.raises(ValueError, match="retry policy"):
            RetryPolicy(**bad)


# --- the outbox ------------------------------------------------------------------------------


async def test_enqueue_is_one_ordered_idempotent_write(store: Store) -> None:
    outbox = Outbox(store, FAST)
    a, b = make_callbacks("a", 5), make_callbacks("b", 3)
    await outbox.enqueue(a, "HTTP 500 from x")
    await outbox.enqueue([*a[:2], *b], "HTTP 500 from y")  # a[:2] again: kept once
    assert await outbox.count() == 8
    assert (await outbox.count("a"), await outbox.count("b"), await outbox.count("z")) == (5, 3, 0)
    assert await outbox.pending_clients() == {"a", "b"}
    async with outbox.claim("a", 100) as claim:
        assert claim is not None
        assert [r.callback for r in claim.rows] == a
        assert all(r.attempts == 1 and r.last_error == "HTTP 500 from x" for r in claim.rows)
        # A second driver cannot take the same client while this one holds it.
        async with Outbox(store, FAST).claim("a", 100) as other:
            assert other is None


# --- retries ---------------------------------------------------------------------------------


async def test_outage_then_recovery_delivers_everything_in_order_with_backoff(
    store: Store, transports: Transports
) -> None:
    policy = RetryPolicy(base_s=0.2, factor=2, cap_s=1, jitter=0.2)
    outbox = Outbox(store, policy)
    down_until = time.monotonic() + 3.0
    async with Receiver(lambda path, body: 500 if time.monotonic() < down_until else 200) as rx:
        client = Client(name="c1", callback_url=rx.url(), callback_secret="s")
        sent = make_callbacks("c1", 50)
        # The notifier's own first attempt fails and hands the rest to the outbox.
        with pytest.raises(CallbackFailed) as info:
            await transports.send(client, sent)
        await outbox.enqueue(sent[info.value.delivered :], str(info.value))
        stats = RetryStats()

        async def step() -> None:
            s = await retry_pass(outbox, transports, {"c1": client}.get)
            stats.delivered += s.delivered
            stats.failed += s.failed
            stats.dead += s.dead

        await drain(step, outbox)

        assert await outbox.dead_letters() == []
        assert stats.delivered == 50 and stats.dead == 0
        assert_in_order(rx.delivered(), sent)
        # Only the head was tried while the endpoint was down; the gaps between its attempts
        # follow the backoff: 0.2, 0.4, 0.8, 1, 1 … seconds, each ± 20 %.
        head = [h.at for h in rx.hits if h.callbacks()[0].event_id == sent[0].event_id]
        assert {h.callbacks()[0].event_id for h in rx.hits if not h.ok} == {sent[0].event_id}
        gaps = [b - a for a, b in itertools.pairwise(head)]
        assert len(gaps) >= 4, gaps
        assert stats.failed == len(gaps) - 1  # every retry but the last one failed
        for i, gap in enumerate(gaps):
            nominal = min(1.0, 0.2 * 2**i)
            assert nominal * 0.8 - 0.01 <= gap <= nominal * 1.2 + 0.4, (i, gaps)
        assert gaps[0] < gaps[1] < gaps[2]


async def test_out_of_attempts_ends_in_dead_letters(store: Store, transports: Transports) -> None:
    outbox = Outbox(store, RetryPolicy(base_s=0.05, factor=2, cap_s=0.1, max_attempts=3))
    async with Receiver(lambda path, body: 500) as rx:
        client = Client(name="c1", callback_url=rx.url())
        sent = make_callbacks("c1", 4)
        await outbox.enqueue(sent, "HTTP 500 from the first try")
        await drain(lambda: retry_pass(outbox, transports, {"c1": client}.get), outbox)
        assert len(rx.hits) == 4 * 2  # attempts 2 and 3 of each; the first was the notifier's
    dead = await outbox.dead_letters("c1")
    assert sorted(d.event_id for d in dead) == sorted(c.event_id for c in sent)
    for d in dead:
        assert d.attempts == 3 and d.client == "c1"
        assert d.last_error is not None and "HTTP 500 from http://127.0.0.1" in d.last_error
        assert d.last_error.startswith("gave up after 3 attempts")
        assert d.payload["event_id"] == d.event_id and d.payload["task_id"] == d.task_id
        assert d.dead_at >= d.created_at
    assert await outbox.count() == 0


async def test_too_old_ends_in_dead_letters(store: Store, transports: Transports) -> None:
    outbox = Outbox(store, RetryPolicy(base_s=0.05, cap_s=0.1, max_age_s=0.5))
    async with Receiver(lambda path, body: 500) as rx:
        client = Client(name="c1", callback_url=rx.url())
        await outbox.enqueue(make_callbacks("c1", 20), "timeout after 5s from http://x/")
        started = time.monotonic()
        await drain(lambda: retry_pass(outbox, transports, {"c1": client}.get), outbox)
        assert time.monotonic() - started < 3
    dead = await outbox.dead_letters()
    assert len(dead) == 20 and await outbox.count() == 0
    assert all(d.last_error and d.last_error.startswith("gave up after") for d in dead)
    # Rows never tried again keep the error that put them in the outbox.
    assert any(
        d.last_error and d.last_error.endswith("timeout after 5s from http://x/") for d in dead
    )


async def test_unregistered_client_is_dead_lettered(store: Store, transports: Transports) -> None:
    outbox = Outbox(store, FAST)
    await outbox.enqueue(make_callbacks("gone", 3), "HTTP 404 from http://x/")
    await outbox.enqueue(make_callbacks("mute", 2), "HTTP 404 from http://x/")
    # "mute" is still registered but its callback URL was removed meanwhile.
    clients = {"mute": Client(name="mute")}
    await drain(lambda: retry_pass(outbox, transports, clients.get), outbox)
    dead = await outbox.dead_letters("gone")
    assert [d.last_error for d in dead] == ["client no longer registered"] * 3
    mute = await outbox.dead_letters("mute")
    assert len(mute) == 2 and all("no callback transport" in (d.last_error or "") for d in mute)


async def test_two_drivers_deliver_each_callback_once_and_in_order(database_url: str) -> None:
    await migrate(database_url)
    rng = random.Random(5)

    async def flaky(path: str, body: bytes) -> int:
        await asyncio.sleep(0.002)  # let the two drivers' passes overlap
        return 500 if rng.random() < 0.15 else 200

    async with (
        Store(database_url, max_size=6) as s1,
        Store(database_url, max_size=6) as s2,
        Receiver(flaky) as rx,
    ):
        clients = {
            f"c{i}": Client(
                name=f"c{i}", callback_url=rx.url(f"/c{i}"), callback_batch_max=1 if i % 2 else 4
            )
            for i in range(4)
        }
        drivers = [
            (Outbox(s, FAST), Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK))
            for s in (s1, s2)
        ]
        sent = {name: make_callbacks(name, 30) for name in clients}
        for cbs in sent.values():
            await drivers[0][0].enqueue(cbs, "HTTP 500 from the first try")
        totals = RetryStats()

        async def both() -> None:
            for s in await asyncio.gather(
                *(retry_pass(o, t, clients.get, batch_limit=7) for o, t in drivers)
            ):
                totals.delivered += s.delivered
                totals.failed += s.failed

        try:
            await drain(both, drivers[0][0], timeout=30)
        finally:
            for _, t in drivers:
                await t.close()
        assert totals.delivered == 120 and totals.failed > 0
        for name, cbs in sent.items():
            received = rx.delivered(f"/{name}")
            assert [c.event_id for c in received] == [c.event_id for c in cbs]  # once, in order
            assert_in_order(received, cbs)
        assert await drivers[0][0].dead_letters() == []


async def test_a_down_client_does_not_delay_a_healthy_one(store: Store) -> None:
    outbox = Outbox(store, FAST)
    transports = Transports(NATS(), timeout_s=3.0, allowed_nets=LOOPBACK)
    async with (
        Receiver(lambda path, body: None) as hanging,
        Receiver(lambda path, body: 200) as healthy,
    ):
        clients = {
            "ok": Client(name="ok", callback_url=healthy.url()),
            "refused": Client(name="refused", callback_url=refused_url()),
            **{f"hang{i}": Client(name=f"hang{i}", callback_url=hanging.url()) for i in range(3)},
        }
        for name in clients:
            await outbox.enqueue(make_callbacks(name, 10), "HTTP 502 from the first try")
        due = time.monotonic() + 0.3  # past the first backoff (0.05 s ± 20 %)
        while len(await outbox.due_clients()) < len(clients):
            assert time.monotonic() < due
            await asyncio.sleep(0.01)
        start = time.monotonic()
        pass_ = asyncio.create_task(retry_pass(outbox, transports, clients.get))
        deadline = start + 2.0
        while len(healthy.delivered()) < 10:
            assert time.monotonic() < deadline, "the healthy client waited for the down ones"
            await asyncio.sleep(0.01)
        healthy_done = time.monotonic() - start
        stats = await pass_
        elapsed = time.monotonic() - start
        await transports.close()
    assert healthy_done < 1.0, healthy_done
    assert 2.5 < elapsed < 5, elapsed  # the hanging ones took their whole timeout, once
    assert (stats.delivered, stats.failed, stats.dead) == (10, 4, 0)
    assert len(hanging.hits) == 3  # one request each: their later callbacks wait behind
    assert await outbox.count("ok") == 0 and await outbox.count() == 40


# --- scheduling ------------------------------------------------------------------------------


async def test_schedule_retries_awaits_the_pass_and_survives_errors() -> None:
    calls: list[float] = []
    both = asyncio.Event()

    async def run() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 3:
            both.set()
        if len(calls) == 1:
            raise RuntimeError("database is down")  # logged; the job keeps running

    scheduler = AsyncIOScheduler(timezone=UTC)
    schedule_retries(scheduler, run, every_s=0.1)
    scheduler.start()
    try:
        await asyncio.wait_for(both.wait(), timeout=5)
    finally:
        scheduler.shutdown(wait=False)
    assert len(calls) >= 3


async def test_lookup_sees_clients_as_records(store: Store, transports: Transports) -> None:
    # The lookup the driver passes is its KV mirror's `get`: a plain ClientRecord works too.
    outbox = Outbox(store, FAST)
    async with Receiver() as rx:
        record = ClientRecord(name="plain", callback_url=rx.url())
        await outbox.enqueue(make_callbacks("plain", 3), "HTTP 500 from x")
        await drain(lambda: retry_pass(outbox, transports, {"plain": record}.get), outbox)
        assert len(rx.hits) == 3  # no callback_batch_max yet: one object per request
