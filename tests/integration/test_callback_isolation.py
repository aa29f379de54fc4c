"""One client holds back only itself (issue 8, points 1 and 2), provoked for real: an endpoint
answering 500 with a NUL byte in its body, a slow endpoint under 25,000 events, PostgreSQL
stopped for 90 s, and a paused client filling its quota. Real nats-server, PostgreSQL, drivers
and executors; real HTTP receivers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from harness import FAST_ENV, LOOPBACK, Cluster, cli, register, wait_for
from nats.aio.client import Client as NATS
from receiver import Receiver

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.publish import Outgoing, PubAck, Publisher
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Settings
from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.retry import retry_pass
from tidegate.driver.callbacks.transport import CallbackFailed, Transports
from tidegate.embedded.servers import EmbeddedPostgres, free_port
from tidegate.errors import BufferFull
from tidegate.store.migrate import migrate
from tidegate.store.store import Store
from tidegate.wire import STATE_RANK, ClientRecord, Succeeded, TaskSpec, encode

NUL_BODY = b"upstream \x00 exploded\x00"
# Callbacks retried quickly, so a recovered endpoint is drained within seconds.
RETRY_ENV = {
    "TIDEGATE_RETRY_EVERY_S": "1",
    "TIDEGATE_RETRY_BASE_S": "0.2",
    "TIDEGATE_RETRY_CAP_S": "1",
    "TIDEGATE_CALLBACK_TIMEOUT_S": "3",
}


def by_path(receiver: Receiver, path: str) -> list[Callback]:
    return receiver.delivered(path)


def assert_every_state_once_in_order(got: list[Callback], keys: list[str]) -> None:
    """Each event once; per task, no state after a newer one; every task reached its end."""
    ids = [cb.event_id for cb in got]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"delivered more than once: {sorted(dupes)[:5]}"
    last: dict[str, tuple[int, int]] = {}
    for cb in got:
        rank = (cb.attempt, STATE_RANK[cb.state])
        assert rank >= last.get(cb.task_id, (0, -1)), f"{cb.event_id} after a newer state"
        last[cb.task_id] = rank
    finished = {cb.key for cb in got if cb.state == "succeeded"}
    assert finished == set(keys), sorted(set(keys) - finished)[:5]


async def submit(nats_url: str, client: str, keys: list[str]) -> None:
    async with await TidegateClient.connect(nats_url, client) as tg:
        await tg.submit_many(TaskSpec(key=k, argv=["true"]) for k in keys)


# --- the outbox and the retry job with an error body holding NUL -----------------------------


def _callback(i: int) -> Callback:
    return Callback(
        event_id=f"e{i}",
        task_id=f"alpha:k{i}",
        client="alpha",
        key=f"k{i}",
        state="succeeded",
        attempt=1,
        at=datetime(2026, 12, 1, tzinfo=UTC),
        log_tail="tail with a NUL \x00 in it",
    )


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate(database_url)
    async with Store(database_url, max_size=4) as s:
        yield s


async def test_nul_error_is_stored_cleaned_and_deliveries_are_never_rolled_back(
    store: Store,
) -> None:
    down = True
    async with Receiver(
        respond=lambda _p, body: 500 if down and b'"k3"' in body else 200, error_body=NUL_BODY
    ) as rx:
        client = ClientRecord(name="alpha", callback_url=rx.url())
        outbox = Outbox(store, RetryPolicy(base_s=0.01, factor=1, cap_s=0.01, jitter=0))
        transports = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
        try:
            callbacks = [_callback(i) for i in range(6)]
            refused = await outbox.enqueue(callbacks, "HTTP 500: upstream \x00 exploded")
            assert refused == []
            for _ in range(3):  # k0..k2 delivered, k3 fails with a NUL body every pass
                await asyncio.sleep(0.05)  # past the backoff (10 ms)
                print(await retry_pass(outbox, transports, lambda _n: client))
            got = [cb.key for cb in rx.delivered()]
            assert got == ["k0", "k1", "k2"], got  # never sent again: no rollback
            rows = await store.fetch_all(
                "SELECT event_id, last_error FROM callback_outbox ORDER BY id"
            )
            assert [r["event_id"] for r in rows] == ["e3", "e4", "e5"]
            assert all("\x00" not in r["last_error"] for r in rows)
            assert "upstream exploded" in rows[0]["last_error"], rows[0]
            down = False
            await asyncio.sleep(0.05)
            await retry_pass(outbox, transports, lambda _n: client)
            assert [cb.key for cb in rx.delivered()] == [f"k{i}" for i in range(6)]
            assert rx.delivered()[0].log_tail == "tail with a NUL  in it"
            assert await outbox.count() == 0
        finally:
            await transports.close()


async def test_an_endless_error_body_is_read_up_to_a_small_limit() -> None:
    """An endpoint that announces 100 MB, sends 64 KB of them and then stalls: the answer is
    known after the first few KB, without waiting for (or holding) the rest."""
    stop = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers; the small body stays unread
        writer.write(b"HTTP/1.1 500 X\r\nContent-Length: 100000000\r\n\r\n")
        writer.write(b"\x00junk " * 8192)
        await writer.drain()
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports = Transports(NATS(), timeout_s=5.0, allowed_nets=LOOPBACK)
    try:
        client = ClientRecord(name="alpha", callback_url=f"http://127.0.0.1:{port}/hook")
        started = time.monotonic()
        with pytest.raises(CallbackFailed) as failed:
            await transports.send(client, [_callback(0)])
        took = time.monotonic() - started
    finally:
        stop.set()
        await transports.close()
        server.close()
    text = str(failed.value)
    assert text.startswith("HTTP 500 from ") and "junk" in text and "\x00" not in text, text
    assert len(text) < 400, len(text)
    assert took < 3, took  # not the 5 s timeout: the rest of the body was never awaited


# --- the whole system -----------------------------------------------------------------------


@pytest.mark.slow
async def test_nul_body_from_one_endpoint_holds_back_only_its_client(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    a_down = True

    def respond(path: str, _body: bytes) -> int:
        return 500 if path == "/a" and a_down else 200

    async with Receiver(respond=respond, error_body=NUL_BODY) as rx:
        await register(
            nats_url,
            engine_db,
            ClientRecord(name="ca", sensitive=True, callback_url=rx.url("/a")),
            ClientRecord(name="cb", callback_url=rx.url("/b")),
        )
        c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
        try:
            c.driver(**RETRY_ENV)
            c.executor(slots=8)
            a_keys = [f"a{i}" for i in range(40)]
            b_keys = [f"b{i}" for i in range(40)]
            await submit(nats_url, "ca", a_keys)

            async def a_failing() -> bool:
                return any(h.path == "/a" and not h.ok for h in rx.hits)

            await wait_for(a_failing, timeout=60, what="client A's endpoint failing")
            t0 = time.monotonic()
            await submit(nats_url, "cb", b_keys)

            async def b_all() -> bool:
                return {cb.key for cb in by_path(rx, "/b")} == set(b_keys)

            await wait_for(b_all, timeout=30, what="client B's callbacks beside A's NUL 500s")
            b_took = time.monotonic() - t0
            a_down = False

            async def a_all() -> bool:
                return {cb.key for cb in by_path(rx, "/a") if cb.state == "succeeded"} == set(
                    a_keys
                )

            await wait_for(a_all, timeout=90, what="client A's callbacks after recovery")
            await asyncio.sleep(2)  # a rolled-back retry pass would send some again by now
            assert_every_state_once_in_order(by_path(rx, "/a"), a_keys)
            assert b_took < 30
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()


async def _events(nats_url: str, client: str, n: int) -> None:
    """`n` terminal events of `client`, published as an executor would (the notifier is what
    is under test; 25,000 processes would only test the executor)."""
    nc = await connect(nats_url, "test-events")
    publisher = Publisher(nc, timeout=10)
    at = datetime.now(UTC)
    outs = []
    for i in range(n):
        event = Succeeded(
            task_id=f"{client}:flood{i}",
            client=client,
            key=f"flood{i}",
            attempt=1,
            at=at,
            submitted_at=at,
            executor="test",
            exit_code=0,
            finished_at=at,
        )
        outs.append(
            Outgoing(
                subject=names.event_subject(client),
                payload=encode(event),
                msg_id=event.event_id,
            )
        )
    try:
        results = await publisher.publish_many(outs)
        assert all(isinstance(r, PubAck) for r in results)
    finally:
        await publisher.close()
        await nc.drain()


@pytest.mark.slow
async def test_slow_endpoint_with_25000_callbacks_does_not_delay_another_client(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    async def slow(path: str, _body: bytes) -> int:
        if path == "/slow":
            await asyncio.sleep(0.2)
        return 200

    async with Receiver(respond=slow) as rx:
        await register(
            nats_url,
            engine_db,
            ClientRecord(name="slowpoke", callback_url=rx.url("/slow")),
            ClientRecord(name="brisk", callback_url=rx.url("/brisk")),
        )
        c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
        try:
            c.driver(**RETRY_ENV)
            c.executor(slots=4)
            await _events(nats_url, "slowpoke", 25_000)

            async def slow_started() -> bool:
                return len(by_path(rx, "/slow")) > 0

            await wait_for(slow_started, timeout=60, what="the slow endpoint being called")
            t0 = time.monotonic()
            await submit(nats_url, "brisk", ["only"])

            async def brisk_done() -> bool:
                return any(cb.state == "succeeded" for cb in by_path(rx, "/brisk"))

            await wait_for(brisk_done, timeout=10, what="B's callback behind A's 25,000")
            print(f"B called back after {time.monotonic() - t0:.1f}s")
            # The slow client's callbacks keep going out, each once (several at a time since
            # issue 9: in order per task, and each of these tasks has one callback).
            slow_keys = [cb.key for cb in by_path(rx, "/slow")]
            assert len(slow_keys) == len(set(slow_keys))
            assert set(slow_keys) <= {f"flood{i}" for i in range(25_000)}
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()


@pytest.mark.slow
async def test_postgres_down_90s_non_sensitive_callbacks_keep_flowing(
    nats_url: str, tmp_path: Path
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg", port=free_port(), options=("-c fsync=off",))
    url = server.start()
    await migrate(url)
    async with Receiver() as rx:
        await register(
            nats_url,
            url,
            ClientRecord(name="careful", sensitive=True, callback_url=rx.url("/s")),
            ClientRecord(name="relaxed", callback_url=rx.url("/n")),
        )
        c = Cluster(nats_url=nats_url, database_url=url, workdir=tmp_path / "run")
        s_keys: list[str] = []
        n_keys: list[str] = []
        try:
            c.driver(**RETRY_ENV)
            c.executor(slots=8)
            s_keys += [f"s{i}" for i in range(20)]
            n_keys += [f"n{i}" for i in range(20)]
            await submit(nats_url, "careful", s_keys)
            await submit(nats_url, "relaxed", n_keys)

            async def warm() -> bool:
                return len({cb.key for cb in by_path(rx, "/n")}) == 20 and (
                    len({cb.key for cb in by_path(rx, "/s") if cb.state == "succeeded"}) == 20
                )

            await wait_for(warm, timeout=60, what="callbacks before the outage")
            server.stop(mode="immediate")
            down_at = time.monotonic()
            wave = 0
            # Every ~20 s of the outage, a wave of both clients' tasks: the non-sensitive
            # client's callbacks arrive during the outage, wave after wave.
            while time.monotonic() - down_at < 90:
                wave += 1
                s_new = [f"s{wave}-{i}" for i in range(20)]
                n_new = [f"n{wave}-{i}" for i in range(20)]
                s_keys += s_new
                n_keys += n_new
                await submit(nats_url, "careful", s_new)
                await submit(nats_url, "relaxed", n_new)

                async def wave_called_back(keys: list[str] = n_new) -> bool:
                    return set(keys) <= {cb.key for cb in by_path(rx, "/n")}

                await wait_for(wave_called_back, timeout=30, what=f"non-sensitive wave {wave}")
                assert time.monotonic() - down_at < 120
                await asyncio.sleep(max(0.0, wave * 20 - (time.monotonic() - down_at)))
            # Nothing of the sensitive client's outage waves was called back: it waits.
            outage_s = [cb for cb in by_path(rx, "/s") if "-" in cb.key]
            assert outage_s == [], outage_s[:3]
            server.start()

            async def s_all() -> bool:
                done = {cb.key for cb in by_path(rx, "/s") if cb.state == "succeeded"}
                return done == set(s_keys)

            await wait_for(s_all, timeout=120, interval=1, what="sensitive callbacks afterwards")
            assert_every_state_once_in_order(by_path(rx, "/s"), s_keys)

            async def all_final() -> bool:
                async with await psycopg.AsyncConnection.connect(url) as conn:
                    cur = await conn.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
                    row = await cur.fetchone()
                    return row is not None and row[0] == len(s_keys) + len(n_keys)

            await wait_for(all_final, timeout=120, interval=1, what="every final state stored")
            # No redelivery storm: every non-sensitive callback once.
            n_ids = [cb.event_id for cb in by_path(rx, "/n")]
            assert len(n_ids) == len(set(n_ids)) == len(n_keys)
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()
            server.stop()


# --- per-client quotas of waiting tasks -----------------------------------------------------


async def ready_count(nats_url: str, client: str) -> int:
    nc = await connect(nats_url, "test-ready-count")
    try:
        subject = names.ready_subject(client, "default")
        info = await nc.jetstream().stream_info(names.READY_STREAM, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
    finally:
        await nc.drain()


@pytest.mark.slow
async def test_paused_client_fills_its_quota_others_still_submit_and_run(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    quota = 30
    quota_env = {"TIDEGATE_CLIENT_BUFFER_MAX": str(quota)}
    # The streams start with the configured quota (later starts keep what the server has:
    # an operator tunes it there, `nats stream edit --max-msgs-per-subject`).
    nc = await connect(nats_url, "test-setup")
    await ensure_all(nc.jetstream(), Settings.from_env({**FAST_ENV, **quota_env}).limits)
    await nc.drain()
    await migrate(database_url)
    await register(
        nats_url, database_url, ClientRecord(name="sleepy", paused=True), ClientRecord(name="busy")
    )
    engine_db = database_url
    c = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run")
    c.extra_env["TIDEGATE_CLIENT_BUFFER_MAX"] = str(quota)
    try:
        c.driver()
        c.executor(slots=4)
        accepted = 0
        refusal: BufferFull | None = None
        # The quota holds per buffer: `quota` routed and waiting for the resume (READY, per
        # client and pool), then `quota` submitted behind them (TASKS, per client); then the
        # client is refused. Submitted until refused with both full.
        async with await TidegateClient.connect(nats_url, "sleepy") as tg:
            deadline = time.monotonic() + 60
            while refusal is None and time.monotonic() < deadline:
                ready_full = await ready_count(nats_url, "sleepy") == quota
                try:
                    await tg.submit(TaskSpec(key=f"z{accepted}", argv=["true"]))
                    accepted += 1
                except BufferFull as exc:
                    if ready_full:
                        refusal = exc
                    else:  # the router has not moved the first ones yet
                        await asyncio.sleep(0.2)
                assert accepted <= 2 * quota, "no quota: a paused client filled shared room"
        assert accepted == 2 * quota, accepted
        assert refusal is not None, f"never refused after {accepted} tasks"
        assert "sleepy" in str(refusal) and "quota" in str(refusal), str(refusal)
        # Another client is untouched: accepted, routed, run.
        await submit(nats_url, "busy", ["ok"])

        async def busy_ran() -> bool:
            async with await psycopg.AsyncConnection.connect(engine_db) as conn:
                cur = await conn.execute("SELECT state FROM tasks WHERE task_id = 'busy:ok'")
                row = await cur.fetchone()
            return row is not None and row[0] == "succeeded"

        await wait_for(busy_ran, timeout=60, what="the other client's task to run")
        # Its submissions wait where they are: not fetched again and again while its ready
        # queue is full (each fetch would count towards max_deliver, then a dead letter).
        await asyncio.sleep(5)
        nc = await connect(nats_url, "test-route-check")
        try:
            js = nc.jetstream()
            consumer = await js.consumer_info(names.TASKS_STREAM, names.route_consumer("sleepy"))
            subject = names.submit_subject("sleepy")
            info = await js.stream_info(names.TASKS_STREAM, subjects_filter=subject)
        finally:
            await nc.drain()
        assert (info.state.subjects or {}).get(subject) == quota, info.state.subjects
        assert consumer.num_redelivered == 0, consumer
        # ... and the paused client is still refused.
        async with await TidegateClient.connect(nats_url, "sleepy") as tg:
            with pytest.raises(BufferFull):
                await tg.submit(TaskSpec(key="again", argv=["true"]))
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop_all()


async def test_callback_held_max_is_a_client_setting(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    env = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run").env()
    done = cli(env, "client", "add", "budgeted", "--callback-held-max", "7")
    assert done.returncode == 0, done.stderr
    done = cli(env, "client", "set", "budgeted", "--callback-held-max", "9")
    assert done.returncode == 0, done.stderr
    refused = cli(env, "client", "set", "budgeted", "--callback-held-max", "0")
    assert refused.returncode != 0 and "callback_held_max must be" in refused.stderr, refused.stderr
    async with Store(engine_db) as store:
        record = await store.get_client("budgeted")
    assert record is not None and record.callback_held_max == 9
    listed = cli(env, "client", "list", "--json")
    assert '"callback_held_max":9' in listed.stdout, listed.stdout


@pytest.mark.slow
async def test_a_holder_that_never_read_the_outbox_keeps_order_then_delivers(
    nats_url: str, tmp_path: Path
) -> None:
    """The driver starts leading while PostgreSQL is down: it cannot know which clients have
    callbacks waiting in the outbox, so every client waits behind a possible one (order before
    speed); once the database answers, everything is delivered, once and in order."""
    server = EmbeddedPostgres(tmp_path / "pg", port=free_port(), options=("-c fsync=off",))
    url = server.start()
    await migrate(url)
    async with Receiver() as rx:
        await register(nats_url, url, ClientRecord(name="relaxed", callback_url=rx.url()))
        server.stop(mode="immediate")
        c = Cluster(nats_url=nats_url, database_url=url, workdir=tmp_path / "run")
        keys = [f"k{i}" for i in range(10)]
        try:
            c.driver(**RETRY_ENV)
            c.executor(slots=4)
            await submit(nats_url, "relaxed", keys)

            async def ran() -> bool:
                return c.logs().count("attempt 1: succeeded") == len(keys)

            await wait_for(ran, timeout=60, what="the tasks run during the outage")
            await asyncio.sleep(3)
            assert rx.delivered() == [], "called back with the outbox unknown"
            server.start()

            async def all_called_back() -> bool:
                return {cb.key for cb in rx.delivered()} == set(keys)

            await wait_for(all_called_back, timeout=120, interval=1, what="callbacks after")
            ids = [cb.event_id for cb in rx.delivered()]
            assert len(ids) == len(set(ids)) == len(keys)
            assert "cannot read the callback outbox" in c.logs()
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop_all()
            server.stop()
