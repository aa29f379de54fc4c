"""Runs in the route step: the submission's stream sequence is the run, and it names the ready
and work messages and the events (no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from tidegate import names
from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import Decision, decide, to_publish
from tidegate.executor.cancels import cancels
from tidegate.wire import CancelRequest, ClientRecord, Queued, Rejected, TaskSpec, WorkItem, encode

STORED_AT = datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC)
CLIENTS = {"alpha": ClientRecord(name="alpha")}


def route(key: str, header: str, seq: int) -> Decision:
    body = json.dumps({"key": key, "argv": ["/bin/true"]}).encode()
    return decide(
        "tg.submit.alpha",
        body,
        header,
        seq,
        STORED_AT,
        lookup=CLIENTS.get,
        settings=DriverSettings(),
        limits=Limits(),
    )


def test_the_submission_sequence_is_the_run_of_every_message() -> None:
    d = route("k1", "alpha:k1", 42)
    assert d.work is not None and d.work.run == 42
    assert isinstance(d.event, Queued) and d.event.run == 42
    ready, event = to_publish(d)
    assert ready.msg_id == "alpha:k1@42" == names.run_msg_id("alpha:k1", 42)
    assert event.msg_id == "alpha:k1@42/0/queued"


def test_routing_a_submission_again_gives_the_same_ids_and_a_later_one_new_ids() -> None:
    """A redelivered submission (same sequence) is deduplicated downstream; the key submitted
    again after the window (a larger sequence) is not: before runs, both had the task id."""
    first, again, later = (
        route("k1", "alpha:k1", 42),
        route("k1", "alpha:k1", 42),
        route("k1", "alpha:k1", 97),
    )
    ids = [[o.msg_id for o in to_publish(d)] for d in (first, again, later)]
    assert ids[0] == ids[1]
    assert not set(ids[0]) & set(ids[2])


def test_a_retry_id_is_the_same_task_and_its_next_run() -> None:
    d = route("k1", names.retry_msg_id("alpha", "k1", "f00d"), 120)
    assert d.work is not None and (d.work.task_id, d.work.run) == ("alpha:k1", 120)


def test_a_retry_id_of_another_key_is_refused_and_the_rejection_names_its_run() -> None:
    d = route("k2", names.retry_msg_id("alpha", "k1", "f00d"), 121)
    assert d.work is None and isinstance(d.event, Rejected)
    assert "does not match the task key" in d.event.reason
    # Filed under the header's key, as every mismatch is, in a run of its own.
    assert d.event.run == 121 and d.event.event_id == "alpha:k1@121/0/rejected"


def test_the_executor_honours_a_cancel_request_for_its_run_only() -> None:
    def item(run: int) -> WorkItem:
        spec = TaskSpec(key="k1", argv=["/bin/true"])
        return WorkItem(
            task_id="alpha:k1",
            client="alpha",
            spec=spec,
            pool="default",
            task_class="short",
            submitted_at=STORED_AT,
            run=run,
        )

    old_run = encode(CancelRequest(task_id="alpha:k1", run=42))
    assert cancels(old_run, item(42)) and not cancels(old_run, item(97))
    other_task = encode(CancelRequest(task_id="alpha:k2", run=42))
    assert not cancels(other_task, item(42))
    assert cancels(b"alpha:k1", item(97))  # written by a component from before runs
    assert not cancels(b"{not json", item(42))  # logged, and cancels nothing
