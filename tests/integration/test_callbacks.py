"""Callback payloads and transports against real endpoints: an HTTP server on 127.0.0.1 run by
the test itself, and a real nats-server for request/reply."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import pytest
from harness import LOOPBACK
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from receiver import Receiver, refused_url
from standardwebhooks import Webhook

from tidegate import names
from tidegate.driver.callbacks.payload import Callback, callback_from_event, encode_batch
from tidegate.driver.callbacks.transport import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    CallbackFailed,
    Transports,
    sign,
    verify,
)
from tidegate.errors import TidegateError
from tidegate.wire import ClientRecord, Dispatched, Failed, Queued, Running, Succeeded, TaskSpec

T0 = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)
CONTRACT = {"event_id", "task_id", "client", "key", "state", "attempt", "at"}


Client = ClientRecord


# --- callbacks from real wire events ---------------------------------------------------------


def make_callbacks(client: str, n: int, start: int = 0) -> list[Callback]:
    """`n` callbacks: tasks in turn running then succeeded (so order per task is checkable)."""
    out: list[Callback] = []
    for i in range(start, start + n):
        task, running = divmod(i, 2)
        key = f"k{task}"
        common: dict[str, Any] = dict(
            task_id=f"{client}:{key}",
            client=client,
            key=key,
            attempt=1,
            at=T0 + timedelta(seconds=i),
            submitted_at=T0,
        )
        if running == 0:
            event: Any = Running(**common, executor="e1", started_at=T0)
        else:
            event = Succeeded(
                **common,
                executor="e1",
                exit_code=0,
                log_tail="hi\n",
                started_at=T0,
                finished_at=T0 + timedelta(seconds=i),
            )
        out.append(callback_from_event(event))
    return out


@pytest.fixture
async def transports() -> AsyncIterator[Transports]:
    # HTTP only: the NATS connection is never touched.
    t = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
    yield t
    await t.close()


# --- payload ---------------------------------------------------------------------------------


def test_terminal_callback_has_the_contract_fields() -> None:
    event = Failed(
        task_id="c1:k",
        client="c1",
        key="k",
        attempt=2,
        at=T0,
        submitted_at=T0,
        executor="e1",
        exit_code=3,
        reason="exit status 3",
        log_tail="oops\n",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=5),
        run=7,
    )
    cb = callback_from_event(event)
    data = json.loads(encode_batch([cb], batch=False))
    assert CONTRACT | {"exit_code", "reason", "log_tail"} <= data.keys()
    assert data["event_id"] == event.event_id == "c1:k@7/2/failed"
    assert data["run"] == 7
    assert (data["task_id"], data["client"], data["key"]) == ("c1:k", "c1", "k")
    assert (data["state"], data["attempt"], data["exit_code"]) == ("failed", 2, 3)
    assert (data["reason"], data["log_tail"]) == ("exit status 3", "oops\n")
    assert datetime.fromisoformat(data["at"]) == T0


def test_running_and_earlier_callbacks_have_the_contract_fields() -> None:
    common: dict[str, Any] = dict(
        task_id="c1:k", client="c1", key="k", attempt=1, at=T0, submitted_at=T0, run=12
    )
    spec = TaskSpec(key="k", argv=["/bin/true"])
    events: list[Any] = [
        Queued(**common, spec=spec, pool="default", task_class="short"),
        Dispatched(**common, pool="default", executor="e1"),
        Running(**common, executor="e1", started_at=T0),
    ]
    for event in events:
        data = json.loads(encode_batch([callback_from_event(event)], batch=False))
        assert data.keys() >= CONTRACT
        assert data["state"] == event.state
        assert data["event_id"] == f"c1:k@12/1/{event.state}"
        # Every field is always present, null when the state does not carry it.
        assert data["exit_code"] is None and data["log_tail"] is None
    running = callback_from_event(events[2])
    assert (running.executor, running.started_at) == ("e1", T0)


def test_encode_batch_shapes() -> None:
    cbs = make_callbacks("c1", 3)
    assert isinstance(json.loads(encode_batch(cbs, batch=True)), list)
    assert isinstance(json.loads(encode_batch(cbs[:1], batch=False)), dict)
    with pytest.raises(ValueError, match="one callback per request"):
        encode_batch(cbs, batch=False)


# --- signatures ------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"event_id":"x"}'
    sig = sign("s3cret", body)
    assert sig.startswith("sha256=") and len(sig) == len("sha256=") + 64
    assert verify("s3cret", body, sig)
    assert not verify("s3cret", body + b" ", sig)
    assert not verify("other", body, sig)
    assert not verify("s3cret", body, "sha256=ünïcode")  # answers, does not raise


# --- HTTP ------------------------------------------------------------------------------------


async def test_http_delivery_is_signed_and_verifies_on_the_receiver(
    transports: Transports,
) -> None:
    async with Receiver() as rx:
        client = Client(name="c1", callback_url=rx.url(), callback_secret="s3cret")
        cbs = make_callbacks("c1", 2)
        await transports.send(client, cbs)
        assert len(rx.hits) == 2
        for hit, cb in zip(rx.hits, cbs, strict=True):
            assert hit.headers["content-type"] == "application/json"
            assert hit.headers[EVENT_ID_HEADER.lower()] == cb.event_id
            signature = hit.headers[SIGNATURE_HEADER.lower()]
            assert verify("s3cret", hit.body, signature)
            # Standard Webhooks, as the scheme's own library checks it (a free-form secret
            # signs with its bytes).
            Webhook(b"s3cret").verify(hit.body, dict(hit.headers), json_parse=False)
            assert hit.headers["webhook-id"] == cb.event_id
            tampered = hit.body.replace(b'"attempt":1', b'"attempt":2', 1)
            assert tampered != hit.body
            assert not verify("s3cret", tampered, signature)
            assert hit.callbacks() == [cb]


async def test_http_without_secret_is_not_signed(transports: Transports) -> None:
    async with Receiver() as rx:
        await transports.send(Client(name="c1", callback_url=rx.url()), make_callbacks("c1", 1))
        assert SIGNATURE_HEADER.lower() not in rx.hits[0].headers
        assert rx.hits[0].ok


async def test_batch_mode_posts_arrays_of_at_most_batch_max(transports: Transports) -> None:
    async with Receiver() as rx:
        client = Client(name="c1", callback_url=rx.url(), callback_batch_max=4, callback_secret="s")
        cbs = make_callbacks("c1", 10)
        await transports.send(client, cbs)
        sizes = [len(json.loads(h.body)) for h in rx.hits]
        assert sizes == [4, 4, 2]
        assert all(isinstance(json.loads(h.body), list) for h in rx.hits)
        assert all(verify("s", h.body, h.headers[SIGNATURE_HEADER.lower()]) for h in rx.hits)
        assert [h.headers[EVENT_ID_HEADER.lower()] for h in rx.hits] == [
            cbs[0].event_id,
            cbs[4].event_id,
            cbs[8].event_id,
        ]
        assert rx.delivered() == cbs


async def test_single_mode_posts_one_object_per_request(transports: Transports) -> None:
    async with Receiver() as rx:
        cbs = make_callbacks("c1", 3)
        await transports.send(Client(name="c1", callback_url=rx.url()), cbs)
        assert [json.loads(h.body)["event_id"] for h in rx.hits] == [c.event_id for c in cbs]


async def test_http_500_fails_with_status_and_url(transports: Transports) -> None:
    async with Receiver(lambda path, body: 500) as rx:
        client = Client(name="c1", callback_url=rx.url() + "?token=hidden")
        with pytest.raises(CallbackFailed) as info:
            await transports.send(client, make_callbacks("c1", 3))
        msg = str(info.value)
        assert msg.startswith(f"HTTP 500 from {rx.url()}"), msg
        assert "receiver says no" in msg and "hidden" not in msg
        assert info.value.delivered == 0 and isinstance(info.value, TidegateError)
        assert len(rx.hits) == 1  # stopped at the first failure


async def test_failure_mid_send_says_how_many_were_delivered(transports: Transports) -> None:
    async with Receiver(lambda path, body: 200 if b"k1" not in body else 503) as rx:
        with pytest.raises(CallbackFailed) as info:
            await transports.send(Client(name="c1", callback_url=rx.url()), make_callbacks("c1", 6))
        # k0 running and succeeded went through; k1 running failed; nothing after it was sent.
        assert info.value.delivered == 2
        assert len(rx.hits) == 3 and str(info.value).startswith("HTTP 503")


async def test_http_timeout_fails_in_time() -> None:
    t = Transports(NATS(), timeout_s=0.5, allowed_nets=LOOPBACK)
    try:
        async with Receiver(lambda path, body: None) as rx:
            start = time.monotonic()
            with pytest.raises(CallbackFailed) as info:
                await t.send(Client(name="c1", callback_url=rx.url()), make_callbacks("c1", 1))
            assert time.monotonic() - start < 2
            assert str(info.value) == f"timeout after 0.5s from {rx.url()}"
    finally:
        await t.close()


async def test_connection_refused_fails(transports: Transports) -> None:
    url = refused_url()
    with pytest.raises(CallbackFailed, match=r"^cannot reach http://127\.0\.0\.1:\d+/hook"):
        await transports.send(Client(name="c1", callback_url=url), make_callbacks("c1", 1))


async def test_client_without_transport_gets_nothing(transports: Transports) -> None:
    await transports.send(Client(name="c1"), make_callbacks("c1", 2))  # no error, no request


# --- NATS ------------------------------------------------------------------------------------


async def test_nats_request_reply_delivers(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    got: list[Msg] = []

    async def answer(msg: Msg) -> None:
        got.append(msg)
        await msg.respond(b"ok")

    await nc.subscribe(names.callback_subject("c1"), cb=answer)
    t = Transports(nc, timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        cbs = make_callbacks("c1", 4)
        await t.send(Client(name="c1", callback_nats=True), cbs)
        assert [msgspec.json.decode(m.data, type=Callback) for m in got] == cbs
        assert [(m.headers or {}).get(EVENT_ID_HEADER) for m in got] == [c.event_id for c in cbs]
        got.clear()
        await t.send(Client(name="c1", callback_nats=True, callback_batch_max=3), cbs)
        assert [len(json.loads(m.data)) for m in got] == [3, 1]
    finally:
        await t.close()
        await nc.close()


async def test_nats_without_responders_fails(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    t = Transports(nc, timeout_s=2.0, allowed_nets=LOOPBACK)
    try:
        start = time.monotonic()
        with pytest.raises(CallbackFailed) as info:
            await t.send(Client(name="c1", callback_nats=True), make_callbacks("c1", 2))
        assert str(info.value) == "no responders on tg.callback.c1"
        assert info.value.delivered == 0
        assert time.monotonic() - start < 1  # no responders is known at once, not a timeout
    finally:
        await t.close()
        await nc.close()


async def test_nats_silent_responder_times_out(nats_url: str) -> None:
    nc = await nats.connect(nats_url)

    async def ignore(msg: Msg) -> None:
        pass

    await nc.subscribe(names.callback_subject("c1"), cb=ignore)
    t = Transports(nc, timeout_s=0.3, allowed_nets=LOOPBACK)
    try:
        with pytest.raises(CallbackFailed, match=r"^timeout after 0\.3s on tg\.callback\.c1$"):
            await t.send(Client(name="c1", callback_nats=True), make_callbacks("c1", 1))
    finally:
        await t.close()
        await nc.close()


class _Stop(TidegateError):
    pass


async def test_a_check_that_fails_at_the_socket_write_stops_the_request_unsent(
    transports: Transports,
) -> None:
    """The notifier's lease check runs again at the last moment, at the socket write: a
    driver frozen between its first check and the write sends nothing once it thaws."""
    calls = 0

    def lease_check() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # passed before the request, gone by the time of the write
            raise _Stop("lease lost")

    async with Receiver() as rx:
        client = Client(name="c1", callback_url=rx.url(), callback_secret="s")
        with pytest.raises(_Stop):
            await transports.send(client, make_callbacks("c1", 2), before_each=lease_check)
        assert calls >= 2
        assert rx.hits == []
