"""Nothing is stranded: consumer names that cannot collide, messages of a newer version that
an older one still reads, and the task a raw message id names (no servers)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import msgspec
import pytest

from tidegate import names
from tidegate.bus.lost import lost_event, task_of_msg_id
from tidegate.errors import InvalidTask
from tidegate.wire import (
    Queued,
    Succeeded,
    TaskSpec,
    UnknownEventState,
    WorkItem,
    decode_event,
    decode_spec,
    decode_work_item,
    encode,
)

T0 = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)
SPEC = TaskSpec(key="k1", argv=["/bin/true"], labels={"n": "1"})
NAMES = ["team", "team_x", "x_default", "default", "a", "a_b", "b", "_", "a-", "-_"]


def test_ready_consumers_of_different_client_and_pool_never_meet() -> None:
    assert names.ready_consumer("team_x", "default") != names.ready_consumer("team", "x_default")
    made = {names.ready_consumer(c, p): (c, p) for c, p in itertools.product(NAMES, NAMES)}
    assert len(made) == len(NAMES) ** 2
    # ... nor a consumer of the earlier naming, which is deleted when found on the same subject.
    legacy = {names.legacy_ready_consumer(c, p) for c, p in itertools.product(NAMES, NAMES)}
    assert not legacy & made.keys()


def test_work_and_route_consumers_never_meet() -> None:
    work = {
        names.work_consumer(p, cls): (p, cls)
        for p, cls in itertools.product([*NAMES, "x_short", "x_long"], names.TASK_CLASSES)
    }
    assert len(work) == len([*NAMES, "x_short", "x_long"]) * len(names.TASK_CLASSES)
    routes = {names.route_consumer(c) for c in [*NAMES, "a.b", "a b", "é"]}
    assert len(routes) == len(NAMES) + 3


def test_ready_subjects_with_tokens_no_name_can_be_are_not_parsed() -> None:
    assert names.parse_ready_subject("tg.ready.team_x.default") == ("team_x", "default")
    for subject in ("tg.ready.a=b.c", "tg.ready.*.p", "tg.ready.c.>", "tg.ready.a.b.c"):
        assert names.parse_ready_subject(subject) is None


# --- rolling upgrades: a newer driver's messages -------------------------------------------------


def work_item() -> WorkItem:
    return WorkItem(
        task_id="alpha:k1",
        client="alpha",
        spec=SPEC,
        pool="default",
        task_class="short",
        submitted_at=T0,
        run=7,
    )


def test_a_work_item_with_a_spec_field_this_version_does_not_know_still_runs() -> None:
    data = json.loads(encode(work_item()))
    data["spec"]["gpus"] = 2  # a field a newer driver added
    data["placement"] = {"zone": "b"}
    item = decode_work_item(json.dumps(data).encode())
    assert item == work_item() and type(item.spec) is TaskSpec
    # The client's own submission is still held to the schema.
    with pytest.raises(InvalidTask, match="unknown field `gpus`"):
        decode_spec(json.dumps(data["spec"]).encode())


def test_a_queued_event_with_an_unknown_spec_field_decodes() -> None:
    queued = Queued(
        task_id="alpha:k1",
        client="alpha",
        key="k1",
        attempt=0,
        at=T0,
        submitted_at=T0,
        spec=SPEC,
        pool="default",
        task_class="short",
    )
    data = json.loads(encode(queued))
    data["spec"]["gpus"] = 2
    data["shard"] = 3
    back = decode_event(json.dumps(data).encode())
    assert back == queued and type(back) is Queued


def test_an_unknown_event_state_is_a_validation_error_that_says_why() -> None:
    event = Succeeded(
        task_id="alpha:k1", client="alpha", key="k1", attempt=1, at=T0, submitted_at=T0,
        finished_at=T0,
    )  # fmt: skip
    data = json.loads(encode(event))
    data["state"] = "preempted"
    with pytest.raises(UnknownEventState, match="unknown event state 'preempted'") as caught:
        decode_event(json.dumps(data).encode())
    # Consumers that catch msgspec's errors set it aside rather than crash or loop.
    assert isinstance(caught.value, msgspec.ValidationError)
    data["state"] = "succeeded"
    data["attempt"] = "one"
    with pytest.raises(msgspec.ValidationError) as other:
        decode_event(json.dumps(data).encode())
    assert not isinstance(other.value, UnknownEventState)


# --- the task a raw message names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "msg_id", "expected"),
    [
        ("alpha", "alpha:k1", ("k1", 0)),
        ("alpha", "alpha:k1@42", ("k1", 42)),
        ("alpha", "alpha:a:b", ("a:b", 0)),
        ("alpha", "beta:k1", None),
        ("alpha", "alpha:", None),
        ("alpha", "alpha:has space", None),
        ("alpha", None, None),
        (None, "alpha:k1", None),
        ("a.b", "a.b:k1", None),
    ],
)
def test_task_of_msg_id(
    client: str | None, msg_id: str | None, expected: tuple[str, int] | None
) -> None:
    assert task_of_msg_id(client, msg_id) == expected


def test_lost_event_is_terminal_with_its_reason_and_run() -> None:
    event = lost_event(
        client="alpha",
        key="k1",
        run=42,
        attempt=2,
        submitted_at=T0,
        reason="no live executor in pool p for 600 s",
        sensitive=True,
    )
    assert event.state == "lost" and event.terminal and event.task_id == "alpha:k1"
    assert (event.run, event.attempt, event.sensitive) == (42, 2, True)
    assert decode_event(encode(event)) == event
