"""Message dead letters on the bus: set aside once, listed newest first, shown, re-driven."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from harness import LOOPBACK, cli
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig
from test_callbacks import make_callbacks
from test_console_access import cli_env
from test_console_callbacks import bury

from tidegate import names
from tidegate.bus.deadletters import (
    header_value,
    list_dead,
    redrive,
    set_aside,
    set_aside_raw,
    show_dead,
)
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_streams
from tidegate.config import Limits
from tidegate.driver.callbacks.transport import Transports
from tidegate.errors import DeadLetterNotFound, RedriveRefused
from tidegate.store import callbacks as cb
from tidegate.store.store import Store


async def test_set_aside_list_show_redrive(nats_url: str) -> None:
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await ensure_streams(js, Limits())
        # A probe consumer on the events stream: interest retention keeps events for it.
        await js.add_consumer(
            names.EVENTS_STREAM,
            ConsumerConfig(
                durable_name="probe", ack_policy=AckPolicy.EXPLICIT, filter_subject="tg.event.x"
            ),
        )
        await js.publish(
            "tg.event.x", b'{"poison": "\\u0000"}', headers={"Nats-Msg-Id": "evt-1", "A": "b"}
        )
        sub = await js.pull_subscribe_bind("probe", stream=names.EVENTS_STREAM)
        (msg,) = await sub.fetch(1, timeout=5)
        counted: list[tuple[str, str | None]] = []
        assert await set_aside(
            js,
            msg,
            stage="event",
            reason="year 9999\nis out of range\x00",
            client="x",
            count=lambda stage, client: counted.append((stage, client)),
        )
        assert counted == [("event", "x")]
        # Twice (a redelivery): stored once, counted once.
        assert not await set_aside_raw(
            js,
            subject=msg.subject,
            data=msg.data,
            headers=msg.headers,
            stage="event",
            reason="again",
            client="x",
            origin_id=f"{names.EVENTS_STREAM}:{msg.metadata.sequence.stream}",
            count=lambda stage, client: counted.append((stage, client)),
        )
        assert counted == [("event", "x")]
        # A client that is no subject token, and one that could not be told.
        await set_aside_raw(
            js,
            subject="tg.submit.a.b",
            data=b"{}",
            headers=None,
            stage="submit",
            reason="no client",
            client="a.b",
            origin_id="TG_TASKS:99",
        )
        await set_aside_raw(
            js,
            subject="$KV.tg_executors.e1",
            data=b"{}",
            headers=None,
            stage="heartbeat",
            reason="bad",
            client=None,
            origin_id="tg_executors/e1@3",
        )
        everything = await list_dead(js)
        assert [d.stage for d in everything] == ["heartbeat", "submit", "event"]
        assert everything[1].client == "a.b"
        assert everything[0].client is None
        (event_dead,) = await list_dead(js, stage="event")
        assert event_dead.reason == "year 9999 is out of range"
        assert event_dead.payload == b'{"poison": "\\u0000"}'
        assert event_dead.headers == {"Nats-Msg-Id": "evt-1", "A": "b"}
        assert event_dead.subject == "tg.event.x"
        assert await list_dead(js, client="a.b") == [everything[1]]
        assert await list_dead(js, limit=1) == everything[:1]
        assert await list_dead(js, before=everything[1].seq) == everything[2:]
        assert await show_dead(js, event_dead.seq) == event_dead
        assert await show_dead(js, 10_000) is None

        # The original id is still in the events stream's dedup window: refused, kept.
        with pytest.raises(RedriveRefused, match="dedup window"):
            await redrive(js, event_dead.seq)
        assert await show_dead(js, event_dead.seq) == event_dead
        done = await redrive(js, event_dead.seq, new_id=True)
        assert done.subject == "tg.event.x" and done.stream == names.EVENTS_STREAM
        assert await show_dead(js, event_dead.seq) is None
        (again,) = await sub.fetch(1, timeout=5)
        assert again.data == msg.data and again.headers is not None
        assert again.headers["A"] == "b"
        with pytest.raises(DeadLetterNotFound):
            await redrive(js, event_dead.seq)
    finally:
        await nc.drain()


def test_header_value_is_safe_and_bounded() -> None:
    assert header_value("a\r\nb\x00c\x7f") == "a  b c"
    assert header_value("é") == "\\xe9"
    assert len(header_value("x" * 5000)) == 1000


async def test_cli_list_show_redrive_both_kinds(
    nats_url: str, engine_db: str, tmp_path: Any
) -> None:
    env = cli_env(nats_url, engine_db, tmp_path)
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    try:
        body = b'{"state": "succeeded", "at": "9999-12-31T23:59:59Z"}'
        ack = await js.publish(names.event_subject("alpha"), body, headers={"Nats-Msg-Id": "e-9"})
        await set_aside_raw(
            js,
            subject=names.event_subject("alpha"),
            data=body,
            headers={"Nats-Msg-Id": "e-9"},
            stage="event",
            reason="undecodable event: `at` is out of range",
            client="alpha",
            origin_id=f"{names.EVENTS_STREAM}:{ack.seq}",
        )
        (dead,) = await list_dead(js)
    finally:
        await nc.close()

    listed = cli(env, "dead-letters", "list", "--kind", "message", "--json")
    assert listed.returncode == 0, listed.stderr
    shape = json.loads(listed.stdout)
    assert shape["kind"] == "message" and len(shape["dead_letters"]) == 1
    row = shape["dead_letters"][0]
    assert row["seq"] == dead.seq and row["stage"] == "event" and row["client"] == "alpha"
    assert base64.b64decode(row["payload_base64"]) == body
    shown = cli(env, "dead-letters", "show", str(dead.seq), "--kind", "message", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["dead_letter"]["headers"] == {"Nats-Msg-Id": "e-9"}
    text = cli(env, "dead-letters", "list", "--kind", "message")
    assert "out of range" in text.stdout and "tg.event.alpha" in text.stdout

    refused = cli(env, "dead-letters", "redrive", str(dead.seq), "--kind", "message")
    assert refused.returncode == 1 and "dedup window" in refused.stderr
    done = cli(
        env, "dead-letters", "redrive", str(dead.seq), "--kind", "message", "--new-id", "--json"
    )
    assert done.returncode == 0, done.stderr
    redriven = json.loads(done.stdout)["redriven"]
    assert redriven["subject"] == "tg.event.alpha" and redriven["stream"] == names.EVENTS_STREAM
    again = cli(env, "dead-letters", "show", str(dead.seq), "--kind", "message")
    assert again.returncode == 2 and f"no message dead letter {dead.seq}" in again.stderr
    again = cli(env, "dead-letters", "redrive", str(dead.seq), "--kind", "message")
    assert again.returncode == 2 and "dead-letters list" in again.stderr
    assert cli(env, "dead-letters", "show", "x", "--kind", "message").returncode == 2

    # Callback dead letters: from the outbox, by id.
    async with Store(engine_db) as store:
        sent = make_callbacks("alpha", 1)
        transports = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
        try:
            await bury(store, transports, sent)
        finally:
            await transports.close()
        (entry,) = await cb.list_dead_letters(store)
    listed = cli(env, "dead-letters", "list", "--kind", "callback", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows["kind"] == "callback" and [d["id"] for d in rows["dead_letters"]] == [entry.id]
    shown = cli(env, "dead-letters", "show", str(entry.id), "--kind", "callback", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["dead_letter"]["payload"]["event_id"] == sent[0].event_id
    done = cli(env, "dead-letters", "redrive", str(entry.id), "--kind", "callback", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["redriven"]["moved"] == 1
    gone = cli(env, "dead-letters", "redrive", str(entry.id), "--kind", "callback")
    assert gone.returncode == 2 and f"#{entry.id}" in gone.stderr
    missing = cli(env, "dead-letters", "show", "424242", "--kind", "callback")
    assert missing.returncode == 2 and "no callback dead letter 424242" in missing.stderr
