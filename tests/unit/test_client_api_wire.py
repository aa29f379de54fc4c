"""The client API's pure parts: subjects, request and reply schemas, cursors, callbacks decoded
by the SDK, and the driver's answers with a stand-in database (no servers)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from tidegate import names
from tidegate.console.tasks import FilterError, _cursor, cursor_of
from tidegate.driver.callbacks import payload
from tidegate.driver.clientapi import ClientApi
from tidegate.errors import StoreError
from tidegate.metrics import DriverMetrics
from tidegate.store.rows import TaskRecord, TaskSearch
from tidegate.wire import (
    Callback,
    CancelReply,
    CancelTask,
    ClientRecord,
    ErrorReply,
    GetTask,
    ListTasks,
    NotYours,
    PageReply,
    TaskReply,
    TaskState,
    decode_callbacks,
    decode_cursor,
    decode_reply,
    decode_request,
    encode,
    encode_cursor,
    target_task,
)

T0 = datetime(2026, 12, 2, 0, 0, tzinfo=UTC)


# --- subjects ------------------------------------------------------------------------------------


def test_api_subjects_carry_the_client_and_the_operation() -> None:
    subject = names.api_subject("alpha", "get")
    assert subject == "tg.api.alpha.get"
    assert names.parse_api_subject(subject) == ("alpha", "get")
    assert names.client_of_api_subject(subject) == "alpha"
    for other in ("tg.api.alpha", "tg.api.alpha.get.x", "tg.submit.alpha.get", "tg.api"):
        assert names.parse_api_subject(other) is None
    assert names.client_api_filter("alpha") == "tg.api.alpha.>"
    assert names.callback_subject("alpha") == "tg.callback.alpha"


# --- requests ------------------------------------------------------------------------------------


def test_requests_decode_per_operation() -> None:
    assert decode_request("get", b'{"key": "k1"}') == GetTask(key="k1")
    assert decode_request("list", b"") == ListTasks()
    listed = decode_request("list", b'{"state": "running", "limit": 3}')
    assert listed == ListTasks(state="running", limit=3)
    assert decode_request("cancel", b'{"key": "k", "run": 4}') == CancelTask(key="k", run=4)


@pytest.mark.parametrize(
    ("op", "body", "why"),
    [
        ("delete", b"{}", "unknown operation"),
        ("get", b"not json", "malformed"),
        ("get", b'{"key": "has space"}', "key"),
        ("get", b'{"key": "k", "client": "beta"}', "unknown field"),
        ("list", b'{"state": "sleeping"}', "state"),
        ("list", b'{"limit": 0}', "limit"),
        ("list", b'{"limit": 501}', "limit"),
        ("cancel", b'{"key": 5}', "key"),
    ],
)
def test_bad_requests_say_why(op: str, body: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=f"(?i){why}"):
        decode_request(op, body)


def test_a_request_names_only_its_subjects_clients_tasks() -> None:
    assert target_task("alpha", GetTask(key="k")) == "alpha:k"
    assert target_task("alpha", GetTask(key="beta:k")) == "alpha:beta:k"  # a key with a colon
    assert target_task("alpha", CancelTask(task_id="alpha:k")) == "alpha:k"
    for other in ("beta:k", "alphabet:k", "k", ":k"):
        with pytest.raises(NotYours):
            target_task("alpha", GetTask(task_id=other))
    with pytest.raises(ValueError, match="one of them"):
        target_task("alpha", GetTask())
    with pytest.raises(ValueError, match="one of them"):
        target_task("alpha", GetTask(key="k", task_id="alpha:k"))


# --- replies and cursors -------------------------------------------------------------------------


def state(key: str = "k", **more: Any) -> TaskState:
    fields: dict[str, Any] = dict(
        task_id=f"alpha:{key}",
        client="alpha",
        key=key,
        run=7,
        state="succeeded",
        attempt=1,
        submitted_at=T0,
    )
    return TaskState(**(fields | more))


def test_replies_round_trip_by_kind() -> None:
    replies = [
        TaskReply(task=state(exit_code=0)),
        TaskReply(task=None),
        PageReply(tasks=[state("a"), state("b", state="running")], next="cur"),
        CancelReply(task_id="alpha:k", run=3, state="running", message="requested"),
        ErrorReply(code="not_yours", message="no"),
    ]
    for reply in replies:
        assert decode_reply(encode(reply)) == reply
    assert state(state="failed").finished and not state(state="running").finished
    with pytest.raises(msgspec.ValidationError):
        decode_reply(b'{"kind": "error", "code": "made-up", "message": "x"}')


def test_cursors_round_trip_and_are_the_consoles() -> None:
    cursor = encode_cursor(T0, "alpha:k")
    assert decode_cursor(cursor) == (T0, "alpha:k")
    record = msgspec.convert(
        {
            **{f: None for f in TaskRecord.__struct_fields__},
            "task_id": "alpha:k",
            "client": "alpha",
            "key": "k",
            "state": "queued",
            "attempt": 0,
            "submitted_at": T0,
            "updated_at": T0,
            "attempts": [],
            "run": 1,
        },
        TaskRecord,
    )
    assert cursor_of(record) == cursor
    for bad in ("", "!!", encode_cursor(T0, "x")[:-4], "bm90IGpzb24="):
        with pytest.raises(ValueError, match="not a page cursor"):
            decode_cursor(bad)
        with pytest.raises(FilterError, match="after: not a page cursor"):
            _cursor(bad)


# --- callbacks, as the SDK decodes them ----------------------------------------------------------


def test_callbacks_decode_one_or_a_batch() -> None:
    cb = Callback(
        event_id="alpha:k@1/1/running", task_id="alpha:k", client="alpha", key="k",
        state="running", attempt=1, at=T0, run=1,
    )  # fmt: skip
    assert payload.Callback is Callback  # the driver's name for the wire's struct
    assert decode_callbacks(payload.encode_batch([cb], batch=False)) == [cb]
    assert decode_callbacks(payload.encode_batch([cb, cb], batch=True)) == [cb, cb]
    assert payload.decode_one(payload.encode_one(cb)) == cb
    with pytest.raises(ValueError):
        decode_callbacks(b'{"state": "running"}')


# --- the driver's answers, with a stand-in database ----------------------------------------------


class FakeStore:
    def __init__(self, records: list[TaskRecord] | None = None, *, fail: Exception | None = None):
        self.records = records or []
        self.fail = fail
        self.delay = 0.0
        self.searches: list[TaskSearch] = []

    async def _maybe_fail(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail

    async def get_task(self, task_id: str) -> TaskRecord | None:
        await self._maybe_fail()
        return next((r for r in self.records if r.task_id == task_id), None)

    async def search_tasks(self, search: TaskSearch) -> list[TaskRecord]:
        await self._maybe_fail()
        self.searches.append(search)
        return [r for r in self.records if r.client == search.client][: search.limit]


def record(key: str, client: str = "alpha") -> TaskRecord:
    return msgspec.convert(
        {
            **{f: None for f in TaskRecord.__struct_fields__},
            "task_id": f"{client}:{key}",
            "client": client,
            "key": key,
            "state": "running",
            "attempt": 1,
            "submitted_at": T0,
            "updated_at": T0 + timedelta(seconds=1),
            "attempts": [],
            "run": 2,
        },
        TaskRecord,
    )


def api(store: FakeStore, *, timeout: float = 1.0) -> ClientApi:
    known = {"alpha": ClientRecord(name="alpha"), "beta": ClientRecord(name="beta")}
    return ClientApi(
        None,  # type: ignore[arg-type]  # answer() never touches NATS
        store,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        known.get,
        DriverMetrics(),
        read_timeout_s=timeout,
    )


async def test_the_driver_answers_get_and_list_for_the_subjects_client_only() -> None:
    store = FakeStore([record("a"), record("b"), record("x", client="beta")])
    got = await api(store).answer("tg.api.alpha.get", b'{"key": "a"}')
    assert isinstance(got, TaskReply) and got.task is not None
    assert (got.task.task_id, got.task.state, got.task.run) == ("alpha:a", "running", 2)
    none = await api(store).answer("tg.api.alpha.get", b'{"key": "x"}')
    assert none == TaskReply(task=None)
    page = await api(store).answer("tg.api.alpha.list", b'{"limit": 1}')
    assert isinstance(page, PageReply) and [t.key for t in page.tasks] == ["a"]
    assert page.next == encode_cursor(T0, "alpha:a")
    assert store.searches[-1].client == "alpha"


@pytest.mark.parametrize(
    ("subject", "body", "code", "words"),
    [
        ("tg.api.nobody.get", b'{"key": "a"}', "unknown_client", "tidegate client add nobody"),
        ("tg.api.alpha.get", b"{", "bad_request", "get:"),
        ("tg.api.alpha.drop", b"{}", "bad_request", "unknown operation"),
        ("tg.api.alpha.get", b'{"task_id": "beta:x"}', "not_yours", "only its own"),
        ("tg.api.alpha.cancel", b'{"task_id": "beta:x"}', "not_yours", "only its own"),
        ("tg.api.alpha.list", b'{"after": "garbage"}', "bad_request", "page cursor"),
        (
            "tg.api.alpha.list",
            b'{"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"}',
            "bad_request",
            "since must be before until",
        ),
    ],
)
async def test_the_driver_refuses_with_a_reason(
    subject: str, body: bytes, code: str, words: str
) -> None:
    reply = await api(FakeStore([record("x", client="beta")])).answer(subject, body)
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == code and words in reply.message


async def test_a_database_that_fails_or_hangs_is_reported_not_raised() -> None:
    failing = FakeStore(fail=StoreError("get_task failed: connection refused"))
    reply = await api(failing).answer("tg.api.alpha.get", b'{"key": "a"}')
    assert isinstance(reply, ErrorReply) and reply.code == "database_unavailable"
    assert "connection refused" in reply.message and "try again later" in reply.message
    hanging = FakeStore()
    hanging.delay = 5.0
    reply = await api(hanging, timeout=0.05).answer("tg.api.alpha.list", b"{}")
    assert isinstance(reply, ErrorReply) and reply.code == "database_unavailable"
