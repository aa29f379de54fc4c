"""Message dead letters in the console (real app, real login, real NATS and PostgreSQL): the
section of the Callbacks page, one dead letter's page, re-drive with its CSRF check, the
viewer's refusal and the audit line; and the same under the JSON API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient
from test_console_access import FAST, add_operator, audit_rows, cli_env, csrf, login

from tidegate import names
from tidegate.bus.deadletters import set_aside_raw, show_dead
from tidegate.bus.natsconn import connect
from tidegate.config import Connection, Settings
from tidegate.console.app import create_app

Conn = psycopg.AsyncConnection[Any]
Client = AsyncTestClient[Any]


@pytest.fixture
async def dead(nats_url: str, engine_db: str) -> AsyncIterator[list[int]]:
    """Two message dead letters: an event (its message id still in the events stream's dedup
    window) and a submission from a subject no client can own."""
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    try:
        body = b'{"state": "succeeded", "at": "9999-12-31T23:59:59Z", "note": "<b>x</b>"}'
        ack = await js.publish(names.event_subject("alpha"), body, headers={"Nats-Msg-Id": "e-1"})
        await set_aside_raw(
            js,
            subject=names.event_subject("alpha"),
            data=body,
            headers={"Nats-Msg-Id": "e-1"},
            stage="event",
            reason="undecodable event: `at` is out of range",
            client="alpha",
            origin_id=f"{names.EVENTS_STREAM}:{ack.seq}",
        )
        await set_aside_raw(
            js,
            subject="tg.submit.a.b",
            data=b"{}",
            headers=None,
            stage="submit",
            reason="no client can own tg.submit.a.b",
            client="a.b",
            origin_id="TG_TASKS:1",
        )
        info = await js.stream_info(names.DEAD_STREAM)
        yield [info.state.first_seq, info.state.last_seq]
    finally:
        await nc.close()


@pytest.fixture
async def client(nats_url: str, engine_db: str, tmp_path: Any) -> AsyncIterator[Client]:
    settings = Settings(
        connection=Connection(nats_url=nats_url, database_url=engine_db, data_dir=tmp_path)
    )
    env = cli_env(nats_url, engine_db, tmp_path)
    add_operator(env, "alice", "operator")
    add_operator(env, "victor", "viewer")
    async with AsyncTestClient(app=create_app(settings, FAST)) as c:
        yield c


async def test_list_show_and_redrive_message_dead_letters(
    client: Client, dead: list[int], nats_url: str, db: Conn
) -> None:
    event_seq, submit_seq = dead
    assert (await login(client, "alice")).status_code == 303
    page = await client.get("/callbacks")
    assert page.status_code == 200 and 'id="message-dead-letters-section"' in page.text

    section = await client.get("/callbacks/messages")
    assert section.status_code == 200
    html = section.text
    assert re.findall(r'id="message-dead-(\d+)"', html) == [str(submit_seq), str(event_seq)]
    assert "no client can own tg.submit.a.b" in html and "a.b" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html  # the payload preview, escaped
    only = await client.get("/callbacks/messages", params={"stage": "event"})
    assert re.findall(r'id="message-dead-(\d+)"', only.text) == [str(event_seq)]
    bad = await client.get("/callbacks/messages", params={"stage": "nope"})
    assert bad.status_code == 422 and "stage:" in bad.text

    one = await client.get(f"/callbacks/messages/{event_seq}")
    assert one.status_code == 200 and "out of range" in one.text and "e-1" in one.text
    assert (await client.get("/callbacks/messages/99999")).status_code == 404

    # A change without the CSRF token is refused, and changes nothing.
    forged = await client.post(f"/callbacks/messages/{event_seq}/redrive", data={})
    assert forged.status_code == 403
    # The original id is still in the events stream's dedup window: refused in words, kept.
    kept = await client.post(
        f"/callbacks/messages/{event_seq}/redrive", data={}, headers=csrf(client)
    )
    assert kept.status_code == 409 and "dedup window" in kept.text
    done = await client.post(
        f"/callbacks/messages/{event_seq}/redrive", data={"new_id": "1"}, headers=csrf(client)
    )
    assert done.status_code == 200 and "tg.event.alpha" in done.text, done.text
    assert done.headers["HX-Trigger"] == "callbacks-changed"
    gone = await client.post(
        f"/callbacks/messages/{event_seq}/redrive", data={}, headers=csrf(client)
    )
    assert gone.status_code == 404

    nc = await connect(nats_url, "test")
    try:
        assert await show_dead(nc.jetstream(), event_seq) is None
        assert await show_dead(nc.jetstream(), submit_seq) is not None
    finally:
        await nc.close()
    lines = [r for r in await audit_rows(db) if r[1] == "message.redrive"]
    assert len(lines) == 1 and lines[0][0] == "alice" and lines[0][2] == "alpha"
    assert lines[0][3]["seq"] == event_seq and lines[0][3]["new_id"] is True

    api = await client.get("/api/v1/dead-letters/messages")
    assert api.status_code == 200
    body = api.json()
    assert [d["seq"] for d in body["dead_letters"]] == [submit_seq]
    assert body["dead_letters"][0]["client"] == "a.b" and body["next_before"] is None
    assert (await client.get(f"/api/v1/dead-letters/messages/{event_seq}")).status_code == 404
    shown = await client.get(f"/api/v1/dead-letters/messages/{submit_seq}")
    assert shown.status_code == 200 and shown.json()["payload"] == "{}"


async def test_a_viewer_may_look_but_not_redrive(client: Client, dead: list[int]) -> None:
    event_seq, _ = dead
    assert (await login(client, "victor")).status_code == 303
    assert (await client.get("/callbacks/messages")).status_code == 200
    refused = await client.post(
        f"/callbacks/messages/{event_seq}/redrive", data={"new_id": "1"}, headers=csrf(client)
    )
    assert refused.status_code == 403 and "viewer" in refused.text
    api = await client.post(
        f"/api/v1/dead-letters/messages/{event_seq}/redrive",
        json={"new_id": True},
        headers=csrf(client),
    )
    assert api.status_code == 403
    assert (await client.get(f"/callbacks/messages/{event_seq}")).status_code == 200
