"""The console's Callbacks and Audit pages against a real PostgreSQL: the store functions
(list, retry now, re-drive, confirmation counts), the driver's real retry job delivering what
they changed, and the pages themselves through Litestar's test client (a stand-in login: the
session machinery is not what these tests are about)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from harness import LOOPBACK
from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware import ASGIMiddleware
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.testing import AsyncTestClient
from litestar.types import ASGIApp, Receive, Scope, Send
from nats.aio.client import Client as NATS
from receiver import Receiver
from test_callbacks import Client, make_callbacks
from test_retry import assert_in_order, drain

from tidegate.console import audit, callbacks
from tidegate.console.app import htmx_dir, templates_dir
from tidegate.console.auth import Operator
from tidegate.driver.callbacks.outbox import Outbox, RetryPolicy
from tidegate.driver.callbacks.payload import Callback
from tidegate.driver.callbacks.retry import retry_pass
from tidegate.driver.callbacks.transport import Transports
from tidegate.errors import StoreError, UsageError
from tidegate.store import callbacks as cb
from tidegate.store.migrate import migrate
from tidegate.store.operators import record_action
from tidegate.store.store import Store

FAST = RetryPolicy(base_s=0.05, factor=2, cap_s=0.2, jitter=0.2)
SLOW = RetryPolicy(base_s=600, cap_s=600)  # outboxed rows stay put unless made due


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


async def outbox_rows(store: Store, client: str) -> list[dict[str, Any]]:
    return await store.fetch_all(
        "SELECT id, event_id, attempts, next_attempt_at <= now() AS due, payload, created_at "
        "FROM callback_outbox WHERE client = %(client)s ORDER BY id",
        {"client": client},
    )


async def bury(store: Store, transports: Transports, sent: list[Callback]) -> None:
    """Dead-letter callbacks the way the retry job does: out of attempts at once."""
    spent = Outbox(store, RetryPolicy(base_s=0.05, cap_s=0.05, max_attempts=1))
    await spent.enqueue(sent, "HTTP 500 from http://x/")
    client = Client(name=sent[0].client, callback_url="http://127.0.0.1:9/hook")
    await drain(lambda: retry_pass(spent, transports, {client.name: client}.get), spent)


# --- reading ---------------------------------------------------------------------------------


async def test_outbox_lists_in_delivery_order_paged_and_filtered(store: Store) -> None:
    outbox = Outbox(store, SLOW)
    await outbox.enqueue(make_callbacks("a", 5), "HTTP 500 from http://a/")
    await outbox.enqueue(make_callbacks("b", 3), "timeout after 5s from http://b/")

    first = await cb.list_outbox(store, limit=3)
    rest = await cb.list_outbox(store, after_id=first[-1].id, limit=10)
    rows = first + rest
    assert [r.id for r in rows] == sorted(r.id for r in rows) and len(rows) == 8
    assert [r.client for r in rows] == ["a"] * 5 + ["b"] * 3
    a_rows = await cb.list_outbox(store, client="a")
    assert [r.task_id for r in a_rows] == [c.task_id for c in make_callbacks("a", 5)]
    head = a_rows[0]
    assert not head.behind and all(r.behind and r.head_id == head.id for r in a_rows[1:])
    assert all(r.wait_s > 400 and r.attempts == 1 for r in a_rows)  # backing off ~10 min
    assert a_rows[0].last_error == "HTTP 500 from http://a/" and a_rows[0].age_s >= 0
    assert await cb.list_outbox(store, client="nobody") == []

    summary = {s.client: (s.outbox, s.due, s.dead) for s in await cb.summary(store)}
    assert summary == {"a": (5, 0, 0), "b": (3, 0, 0)}
    scope = await cb.outbox_scope(store, client="a")
    assert scope == cb.Scope(count=5, upto=a_rows[-1].id)
    assert (await cb.outbox_scope(store)).count == 8
    assert await cb.outbox_scope(store, client="nobody") == cb.Scope(count=0, upto=None)
    with pytest.raises(UsageError, match="limit"):
        await cb.list_outbox(store, limit=0)


async def test_dead_letters_list_newest_first_and_count(
    store: Store, transports: Transports
) -> None:
    await bury(store, transports, make_callbacks("a", 4))
    await bury(store, transports, make_callbacks("b", 2))
    dead = await cb.list_dead_letters(store)
    assert [d.id for d in dead] == sorted((d.id for d in dead), reverse=True) and len(dead) == 6
    page1 = await cb.list_dead_letters(store, client="a", limit=3)
    page2 = await cb.list_dead_letters(store, client="a", before_id=page1[-1].id, limit=3)
    assert len(page1) == 3 and len(page2) == 1 and page2[0].id < page1[-1].id
    assert all(d.last_error and d.last_error.startswith("gave up after 1") for d in dead)
    assert await cb.dead_letter_scope(store, client="a") == cb.Scope(count=4, upto=page1[0].id)
    assert {s.client: s.dead for s in await cb.summary(store)} == {"a": 4, "b": 2}


# --- retry now -------------------------------------------------------------------------------


async def test_retry_now_makes_a_row_due_with_the_earlier_rows_of_its_client(
    store: Store,
) -> None:
    outbox = Outbox(store, SLOW)
    await outbox.enqueue(make_callbacks("a", 5), "HTTP 500")
    await outbox.enqueue(make_callbacks("b", 2), "HTTP 500")
    assert await outbox.due_clients() == []
    rows = await outbox_rows(store, "a")

    done = await cb.retry_now(store, rows[2]["id"])
    assert (done.client, done.made_due) == ("a", 3)
    assert done.event_id == rows[2]["event_id"]
    assert [r["due"] for r in await outbox_rows(store, "a")] == [True] * 3 + [False] * 2
    assert [r["due"] for r in await outbox_rows(store, "b")] == [False, False]
    assert await outbox.due_clients() == ["a"]  # the retry job picks the client up
    again = await cb.retry_now(store, rows[2]["id"])
    assert again.made_due == 0  # already due: nothing moved

    with pytest.raises(cb.CallbackGone, match="no longer in the outbox"):
        await cb.retry_now(store, 999_999)


async def test_retry_all_now_holds_to_the_confirmed_count(store: Store) -> None:
    outbox = Outbox(store, SLOW)
    await outbox.enqueue(make_callbacks("a", 4), "HTTP 500")
    await outbox.enqueue(make_callbacks("b", 2), "HTTP 500")
    scope = await cb.outbox_scope(store, client="a")
    assert scope.count == 4

    # A callback outboxed after the count is not part of what was confirmed.
    await outbox.enqueue(make_callbacks("a", 1, start=4), "HTTP 500")
    done = await cb.retry_all_now(store, client="a", expect=scope)
    assert done.made_due == 4
    assert [r["due"] for r in await outbox_rows(store, "a")] == [True] * 4 + [False]

    # One of the counted rows went away (delivered): the count no longer holds, ask again.
    first = (await outbox_rows(store, "b"))[0]["id"]
    everyone = await cb.outbox_scope(store)
    await store.execute("DELETE FROM callback_outbox WHERE id = %(id)s", {"id": first})
    with pytest.raises(cb.CountChanged) as info:
        await cb.retry_all_now(store, client=None, expect=everyone)
    assert info.value.scope.count == everyone.count - 1
    assert [r["due"] for r in await outbox_rows(store, "b")] == [False]  # nothing changed

    done = await cb.retry_all_now(store, client=None, expect=info.value.scope)
    assert done.made_due == 2  # a's last row and b's row; the other four were due already
    for name in ("a", "b"):
        assert all(r["due"] for r in await outbox_rows(store, name))

    nothing = cb.Scope(count=0, upto=None)
    assert (await cb.retry_all_now(store, client="nobody", expect=nothing)).made_due == 0
    with pytest.raises(cb.CountChanged):  # confirmed "none", but there are some now
        await cb.retry_all_now(store, client="a", expect=nothing)


async def test_a_change_waits_for_the_retry_job_and_gives_up_in_words(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cb, "LOCK_TIMEOUT_MS", 300)
    outbox = Outbox(store, SLOW)
    await outbox.enqueue(make_callbacks("a", 2), "HTTP 500")
    row_id = (await outbox_rows(store, "a"))[1]["id"]
    async with outbox.claim("a", 10) as claim:  # a retry pass working on client a
        assert claim is not None
        started = time.monotonic()
        with pytest.raises(cb.CallbacksBusy, match="try again"):
            await cb.retry_now(store, row_id)
        assert time.monotonic() - started < 2
    assert not any(r["due"] for r in await outbox_rows(store, "a"))
    assert (await cb.retry_now(store, row_id)).made_due == 2  # free again


# --- re-drive --------------------------------------------------------------------------------


async def test_redrive_puts_dead_letters_behind_the_waiting_rows_in_order(
    store: Store, transports: Transports
) -> None:
    sent = make_callbacks("a", 6)
    await bury(store, transports, sent[:4])
    dead = await cb.list_dead_letters(store, client="a")
    payloads = {
        r["event_id"]: r["payload"]
        for r in await store.fetch_all("SELECT event_id, payload FROM callback_dead_letters")
    }
    await Outbox(store, SLOW).enqueue(sent[4:], "HTTP 500")  # still waiting, not due
    waiting = await outbox_rows(store, "a")

    scope = await cb.dead_letter_scope(store, client="a")
    assert scope.count == 4
    done = await cb.redrive_dead_letters(store, client="a", expect=scope)
    assert (done.moved, done.queued) == (4, 4)
    rows = await outbox_rows(store, "a")
    assert rows[:2] == waiting  # untouched, still first
    redriven = rows[2:]
    assert [r["event_id"] for r in redriven] == [c.event_id for c in sent[:4]]
    assert done.first_id == redriven[0]["id"] > waiting[-1]["id"]
    assert all(r["attempts"] == 0 and r["due"] for r in redriven)
    assert all(r["payload"] == payloads[r["event_id"]] for r in redriven)
    assert all(r["created_at"] > datetime.now(UTC) - timedelta(minutes=1) for r in redriven)
    assert await cb.list_dead_letters(store, client="a") == []
    assert {d.event_id for d in dead} == {c.event_id for c in sent[:4]}


async def test_redrive_one_and_the_confirmation_rules(store: Store, transports: Transports) -> None:
    sent = make_callbacks("a", 3)
    await bury(store, transports, sent)
    dead = await cb.list_dead_letters(store, client="a")  # newest first

    one = await cb.redrive_dead_letter(store, dead[-1].id)
    assert (one.client, one.moved, one.queued, one.event_id) == ("a", 1, 1, dead[-1].event_id)
    with pytest.raises(cb.CallbackGone, match="no longer there"):
        await cb.redrive_dead_letter(store, dead[-1].id)
    await store.execute("DELETE FROM callback_outbox")  # delivered, as far as this test goes

    scope = await cb.dead_letter_scope(store, client="a")
    assert scope.count == 2
    # A dead letter that arrives after the count is left for the next confirmation.
    await bury(store, transports, make_callbacks("a", 1, start=3))
    done = await cb.redrive_dead_letters(store, client="a", expect=scope)
    assert done.moved == 2
    left = await cb.list_dead_letters(store, client="a")
    assert [d.event_id for d in left] == [make_callbacks("a", 1, start=3)[0].event_id]

    # One of the counted dead letters was re-driven by someone else: ask again.
    stale = await cb.dead_letter_scope(store, client="a")
    await cb.redrive_dead_letter(store, left[0].id)
    with pytest.raises(cb.CountChanged) as info:
        await cb.redrive_dead_letters(store, client="a", expect=stale)
    assert info.value.scope == cb.Scope(count=0, upto=None)
    empty = await cb.redrive_dead_letters(store, client="a", expect=info.value.scope)
    assert empty.moved == 0


async def test_redrive_of_an_event_already_waiting_keeps_one_row(
    store: Store, transports: Transports
) -> None:
    sent = make_callbacks("a", 1)
    await bury(store, transports, sent)
    await Outbox(store, SLOW).enqueue(sent, "HTTP 500 again")  # redelivered and failed again
    dead = await cb.list_dead_letters(store, client="a")
    done = await cb.redrive_dead_letter(store, dead[0].id)
    assert (done.moved, done.queued, done.first_id) == (1, 0, None)
    rows = await outbox_rows(store, "a")
    assert [r["event_id"] for r in rows] == [sent[0].event_id]


# --- end to end with the real retry job ------------------------------------------------------


async def test_a_redriven_callback_reaches_a_recovered_receiver_in_order(
    store: Store, transports: Transports
) -> None:
    failing = True
    async with Receiver(lambda path, body: 500 if failing else 200) as rx:
        client = Client(name="c1", callback_url=rx.url(), callback_secret="s")
        lookup = {"c1": client}.get
        sent = make_callbacks("c1", 6)
        # Two attempts each, both failing: the real retry job dead-letters them.
        give_up = Outbox(store, RetryPolicy(base_s=0.05, cap_s=0.1, max_attempts=2))
        await give_up.enqueue(sent[:4], "HTTP 500 from the notifier")
        await drain(lambda: retry_pass(give_up, transports, lookup), give_up)
        assert len(await cb.list_dead_letters(store, client="c1")) == 4
        assert rx.delivered() == [] and len(rx.hits) == 4
        # Later callbacks of the client wait in the outbox, ahead of anything re-driven.
        outbox = Outbox(store, FAST)
        await outbox.enqueue(sent[4:], "HTTP 500 from the notifier")

        failing = False
        scope = await cb.dead_letter_scope(store, client="c1")
        await cb.redrive_dead_letters(store, client="c1", expect=scope)
        await drain(lambda: retry_pass(outbox, transports, lookup), outbox)

    assert await cb.list_dead_letters(store) == []
    assert_in_order(rx.delivered(), [*sent[4:], *sent[:4]])


async def test_retry_now_sends_a_backing_off_callback_at_the_next_pass(
    store: Store, transports: Transports
) -> None:
    async with Receiver(lambda path, body: 200) as rx:
        client = Client(name="c1", callback_url=rx.url())
        outbox = Outbox(store, SLOW)
        sent = make_callbacks("c1", 3)
        await outbox.enqueue(sent, "HTTP 503 from the notifier")
        stats = await retry_pass(outbox, transports, {"c1": client}.get)
        assert stats.delivered == 0 and rx.hits == []  # backing off for ten minutes
        last = (await outbox_rows(store, "c1"))[-1]["id"]
        await cb.retry_now(store, last)
        stats = await retry_pass(outbox, transports, {"c1": client}.get)
    assert stats.delivered == 3
    assert_in_order(rx.delivered(), sent)


# --- the pages -------------------------------------------------------------------------------


class StandIn(ASGIMiddleware):
    """Logs every request in as `role` (the console's real login is tested on its own)."""

    def __init__(self, role: str) -> None:
        self.role = role

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        scope["user"] = Operator(username="alice", role=self.role)
        await next_app(scope, receive, send)


def console(store: Store, role: str = "operator") -> Litestar:
    static = [
        create_static_files_router(
            path="/static", directories=[templates_dir() / "static"], name="static"
        ),
        create_static_files_router(path="/static/htmx", directories=[htmx_dir()], name="htmx"),
    ]
    return Litestar(
        route_handlers=[*static, *callbacks.ROUTES, *audit.ROUTES],
        middleware=[StandIn(role)],
        state=State({"store": store}),
        template_config=TemplateConfig(directory=templates_dir(), engine=JinjaTemplateEngine),
    )


async def test_callbacks_page_shows_both_tables_and_bulk_asks_first(
    store: Store, transports: Transports
) -> None:
    await bury(store, transports, make_callbacks("a", 2))
    await Outbox(store, SLOW).enqueue(make_callbacks("a", 3, start=2), "HTTP 500 <b>x</b>")
    async with AsyncTestClient(console(store)) as http:
        page = await http.get("/callbacks", params={"client": "a"})
        assert page.status_code == 200
        html = page.text
        assert len(re.findall(r'id="outbox-\d', html)) == 3
        assert len(re.findall(r'id="dead-\d', html)) == 2
        assert "HTTP 500 &lt;b&gt;x&lt;/b&gt;" in html  # escaped
        assert re.search(r"in \d+ min", html) and "after #" in html  # backing off, in order
        assert 'aria-current="page">Callbacks' in html

        ask = await http.post("/callbacks/dead/redrive", data={"client": "a"})
        assert ask.status_code == 200 and "Re-drive 2 dead letters of client a?" in ask.text
        upto = re.search(r'name="upto" value="(\d+)"', ask.text)
        assert upto is not None and 'name="confirm" value="2"' in ask.text
        assert await cb.dead_letter_scope(store, client="a") == cb.Scope(
            count=2, upto=int(upto.group(1))
        )  # asking changed nothing

        stale = await http.post(
            "/callbacks/dead/redrive", data={"client": "a", "confirm": "5", "upto": upto.group(1)}
        )
        assert "count changed" in stale.text and 'name="confirm" value="2"' in stale.text

        done = await http.post(
            "/callbacks/dead/redrive", data={"client": "a", "confirm": "2", "upto": upto.group(1)}
        )
        assert done.status_code == 200 and "2 dead letters of client a" in done.text
        assert done.headers["HX-Trigger"] == "callbacks-changed"
        assert (await cb.outbox_scope(store, client="a")).count == 5

        ask = await http.post("/callbacks/outbox/retry", data={})
        assert "Retry 5 callbacks of every client now?" in ask.text

        row = (await outbox_rows(store, "a"))[0]["id"]
        one = await http.post(f"/callbacks/outbox/{row}/retry")
        assert one.status_code == 200 and f"callback #{row}" in one.text
        gone = await http.post("/callbacks/outbox/999999/retry")
        assert gone.status_code == 404 and "no longer in the outbox" in gone.text

        bad = await http.post("/callbacks/dead/redrive", data={"client": "a b"})
        assert bad.status_code == 422 and "client:" in bad.text
        bad = await http.post(
            "/callbacks/dead/redrive", data={"client": "a", "confirm": "x", "upto": "1"}
        )
        assert bad.status_code == 422 and "confirm:" in bad.text
        bad_page = await http.get("/callbacks", params={"after": "-3"})
        assert bad_page.status_code == 422 and "after:" in bad_page.text

        lines = await http.get("/audit", params={"action": "callback."})
        assert lines.status_code == 200
        assert "callback.redrive-bulk" in lines.text and "callback.retry-now" in lines.text
        assert ">alice<" in lines.text


async def test_a_viewer_may_look_but_not_change(store: Store) -> None:
    async with AsyncTestClient(console(store, role="viewer")) as http:
        assert (await http.get("/callbacks")).status_code == 200
        refused = await http.post("/callbacks/outbox/retry", data={})
        assert refused.status_code == 403


async def test_a_database_outage_is_said_plainly() -> None:
    # Nothing listens on port 1: every connection attempt fails.
    down = Store("postgresql://tidegate@127.0.0.1:1/none?connect_timeout=1", name="down")
    await down.open(wait=False)
    try:
        async with AsyncTestClient(console(down)) as http:
            started = time.monotonic()
            page = await http.get("/callbacks")
            assert page.status_code == 200 and callbacks.UNREACHABLE in page.text
            changed = await http.post("/callbacks/dead/7/redrive")
            assert changed.status_code == 503 and "nothing was changed" in changed.text
            log = await http.get("/audit")
            assert log.status_code == 200 and audit.UNREACHABLE in log.text
            assert time.monotonic() - started < 3 * callbacks.READ_TIMEOUT_S + 2
    finally:
        await asyncio.wait_for(down.close(), 5)


async def test_audit_page_filters_and_pages(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "PAGE_SIZE", 3)
    monkeypatch.setattr(audit, "SCAN_BATCH", 4)
    for i in range(10):
        actor = "alice" if i % 2 else "bob"
        await record_action(store, actor=actor, action=f"client.edit{i}", target=f"c{i}")
    newest = await audit.scan(store, audit.AuditFilters())
    assert [e.target for e in newest.entries] == ["c9", "c8", "c7"]
    older = await audit.scan(store, audit.AuditFilters(before=newest.next_before))
    assert [e.target for e in older.entries] == ["c6", "c5", "c4"]

    bob = await audit.scan(store, audit.AuditFilters(actor="bob"))
    assert [e.target for e in bob.entries] == ["c8", "c6", "c4"]
    rest = await audit.scan(store, audit.AuditFilters(actor="bob", before=bob.next_before))
    assert [e.target for e in rest.entries] == ["c2", "c0"] and rest.next_before is None

    monkeypatch.setattr(audit, "SCAN_WINDOW", 4)
    window = await audit.scan(store, audit.AuditFilters(target="C1"))  # case-insensitive
    assert window.entries == [] and window.window_ended and window.scanned == 4
    window = await audit.scan(store, audit.AuditFilters(target="c1", before=window.next_before))
    assert window.entries == [] and window.window_ended  # c5 to c2
    found = await audit.scan(store, audit.AuditFilters(target="c1", before=window.next_before))
    assert [e.target for e in found.entries] == ["c1"] and not found.window_ended


async def test_the_store_refuses_a_database_that_is_gone(store: Store) -> None:
    await store.execute("DROP TABLE callback_dead_letters")
    with pytest.raises(StoreError, match="re-drive"):
        await cb.redrive_dead_letter(store, 1)
