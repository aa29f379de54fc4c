"""`mesh/driver/decide.py`: the pure routing decision for one submission (no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import Decision, Unroutable, decide, task_class
from tidegate.wire import ClientRecord, Queued, Rejected, TaskSpec, WorkItem

STORED_AT = datetime(2026, 11, 27, 0, 0, 1, 500000, tzinfo=UTC)  # JetStream's timestamp
CLIENTS = {
    "alpha": ClientRecord(name="alpha"),
    "beta": ClientRecord(name="beta", sensitive=True, default_pool="batch"),
}
SETTINGS = DriverSettings()
LIMITS = Limits()


def spec_body(**fields: Any) -> bytes:
    spec: dict[str, Any] = {"key": "k1", "argv": ["/bin/true"]}
    spec.update(fields)
    return json.dumps(spec).encode()


def run(
    data: bytes,
    *,
    client: str = "alpha",
    header: str | None = "",
    seq: int = 42,
    settings: DriverSettings = SETTINGS,
    limits: Limits = LIMITS,
    clients: dict[str, ClientRecord] = CLIENTS,
) -> Decision:
    """`header=""` means "the header the SDK would send for the body's key"."""
    if header == "":
        header = f"{client}:{json.loads(data)['key']}"
    return decide(
        f"tg.submit.{client}",
        data,
        header,
        seq,
        STORED_AT,
        lookup=clients.get,
        settings=settings,
        limits=limits,
    )


def rejection(d: Decision) -> Rejected:
    assert d.work is None
    assert isinstance(d.event, Rejected)
    assert d.event.attempt == 0 and d.event.state == "rejected" and d.event.terminal
    return d.event


def accepted(d: Decision) -> tuple[Queued, WorkItem]:
    assert isinstance(d.event, Queued), getattr(d.event, "reason", d.event)
    assert d.work is not None
    return d.event, d.work


# --- accepted ------------------------------------------------------------------------------------


def test_a_valid_task_is_routed_and_queued() -> None:
    queued, work = accepted(run(spec_body()))
    assert work.task_id == queued.task_id == "alpha:k1"
    assert work.client == queued.client == "alpha" and queued.key == "k1"
    assert work.spec == queued.spec == TaskSpec(key="k1", argv=["/bin/true"])
    assert queued.attempt == 0
    assert work.sensitive is False


def test_without_a_header_the_key_comes_from_the_body() -> None:
    queued, work = accepted(run(spec_body(key="k9"), header=None))
    assert work.task_id == queued.task_id == "alpha:k9"


def test_sensitive_flag_follows_the_client_record() -> None:
    _, work = accepted(run(spec_body(), client="beta"))
    assert work.sensitive is True


def test_sensitive_flag_is_stamped_on_the_event_from_the_registry() -> None:
    """Projector and notifier treat an event by its own flag, not by a later registry read."""
    queued, _ = accepted(run(spec_body(), client="beta"))
    assert queued.sensitive is True
    assert accepted(run(spec_body()))[0].sensitive is False
    assert rejection(run(spec_body(argv=[]), client="beta")).sensitive is True
    oversized = run(spec_body(), client="beta", limits=Limits(max_task_bytes=1))
    assert rejection(oversized).sensitive is True
    assert rejection(run(spec_body(), client="nobody")).sensitive is False


def test_submitted_at_is_the_jetstream_timestamp() -> None:
    """The same when another driver routes it again: the row lands in the same partition."""
    queued, work = accepted(run(spec_body()))
    assert queued.at == queued.submitted_at == work.submitted_at == STORED_AT


# --- pool and class ------------------------------------------------------------------------------


def test_pool_from_the_spec_wins() -> None:
    _, work = accepted(run(spec_body(pool="gpu"), client="beta"))
    assert work.pool == "gpu"


def test_pool_from_the_client_default_next() -> None:
    queued, work = accepted(run(spec_body(), client="beta"))
    assert work.pool == queued.pool == "batch"


def test_pool_from_the_settings_last() -> None:
    # A record fetched from the KV mirror always has a default pool ("default" unless set), so
    # the settings' default applies only to a record without one.
    clients = {"gamma": ClientRecord(name="gamma", default_pool="")}
    settings = DriverSettings(default_pool="fallback")
    _, work = accepted(run(spec_body(), client="gamma", clients=clients, settings=settings))
    assert work.pool == "fallback"


def test_default_client_record_routes_to_the_default_pool() -> None:
    _, work = accepted(run(spec_body()))
    assert work.pool == "default"


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(1, "short"), (299.999, "short"), (300, "short"), (300.001, "long"), (3600, "long")],
)
def test_class_by_timeout_at_the_default_bound(timeout: float, expected: str) -> None:
    queued, work = accepted(run(spec_body(timeout_s=timeout)))
    assert work.task_class == queued.task_class == expected


def test_class_bound_comes_from_the_settings() -> None:
    settings = DriverSettings(short_max_timeout_s=10)
    assert accepted(run(spec_body(timeout_s=10), settings=settings))[1].task_class == "short"
    assert accepted(run(spec_body(timeout_s=11), settings=settings))[1].task_class == "long"


def test_default_timeout_is_long() -> None:
    """A spec without timeout_s has 3600 s: the `long` class with default settings."""
    assert accepted(run(spec_body()))[1].task_class == "long"


def test_task_class_helper() -> None:
    assert task_class(5, 5) == "short"
    assert task_class(5.0001, 5) == "long"


# --- rejected ------------------------------------------------------------------------------------


def test_unknown_client_is_rejected_under_the_header_key() -> None:
    event = rejection(run(spec_body(), client="nobody"))
    assert "unknown client 'nobody'" in event.reason
    assert "tidegate client add" in event.reason
    assert (event.task_id, event.client, event.key) == ("nobody:k1", "nobody", "k1")


def test_oversized_is_rejected_before_parsing() -> None:
    limits = Limits(max_task_bytes=100)
    data = spec_body(labels={"pad": "x" * 200})
    event = rejection(run(data, limits=limits))
    assert f"task is {len(data)} bytes; the limit is 100" == event.reason
    assert event.task_id == "alpha:k1"


def test_exactly_at_the_size_limit_is_accepted() -> None:
    data = spec_body()
    accepted(run(data, limits=Limits(max_task_bytes=len(data))))
    rejection(run(data, limits=Limits(max_task_bytes=len(data) - 1)))


def test_oversized_from_an_unknown_client_is_rejected_as_oversized() -> None:
    event = rejection(run(spec_body(), client="nobody", limits=Limits(max_task_bytes=1)))
    assert "the limit is 1" in event.reason


@pytest.mark.parametrize("data", [b"{not json", b"", b"\x00\x01"])
def test_malformed_body_is_rejected_under_the_header_key(data: bytes) -> None:
    event = rejection(run(data, header="alpha:wf-1"))
    assert event.reason.startswith("malformed JSON")
    assert (event.task_id, event.key) == ("alpha:wf-1", "wf-1")


def test_invalid_spec_is_rejected_with_the_schema_reason() -> None:
    event = rejection(run(spec_body(argv=[])))
    assert "`argv` is empty" in event.reason
    assert event.task_id == "alpha:k1"


def test_msg_id_mismatch_is_rejected_and_says_which_id_to_use() -> None:
    event = rejection(run(spec_body(key="k1"), header="alpha:k2"))
    assert "'alpha:k2' does not match" in event.reason and "'alpha:k1'" in event.reason
    # Filed under the id the client used: that is where it will look for the outcome.
    assert event.task_id == "alpha:k2"


def test_msg_id_of_another_client_is_a_mismatch() -> None:
    event = rejection(run(spec_body(), header="beta:k1"))
    assert "does not match" in event.reason
    assert event.task_id == "alpha:k1"  # the body's key: where the client will look


@pytest.mark.parametrize("header", [None, "alpha:", "beta:wf-1", "wf-1"])
def test_no_key_in_header_or_body_is_unroutable_not_rejected(header: str | None) -> None:
    """No state can be filed under an id the client would look for: a dead letter of the
    client's, never a rejection under a made-up id."""
    for data in (b"{", b"[]", b'{"key": 5}', b'{"key": "has space"}', b"\xff"):
        with pytest.raises(Unroutable) as caught:
            run(data, header=header, seq=1234)
        assert caught.value.client == "alpha" and "no task key" in str(caught.value)


@pytest.mark.parametrize("header", [None, "alpha:", "wf-1"])
def test_a_key_in_an_invalid_body_files_the_rejection(header: str | None) -> None:
    event = rejection(run(b'{"key": "k9", "argv": 5}', header=header))
    assert (event.task_id, event.key) == ("alpha:k9", "k9")
    assert "invalid task" in event.reason


@pytest.mark.parametrize("client", ["a.b", "", "a b", "x" * 65, "*", ">"])
def test_a_subject_no_client_can_own_is_unroutable(client: str) -> None:
    with pytest.raises(Unroutable) as caught:
        run(spec_body(), client=client, header=None)
    assert caught.value.client is None and "does not name a valid client" in str(caught.value)


def test_a_key_may_contain_the_separator() -> None:
    event = rejection(run(b"{", header="alpha:a:b"))
    assert event.key == "a:b"


def test_rejection_times_are_the_jetstream_timestamp() -> None:
    event = rejection(run(b"{", header="alpha:k"))
    assert event.at == event.submitted_at == event.finished_at == STORED_AT


def test_decide_raises_nothing_but_unroutable() -> None:
    """Bad input never stops a driver: every odd case is a decision, or `Unroutable` (a dead
    letter) when no task can be told."""
    odd = [b"", b"{", b"[]", b"null", spec_body(argv=None), spec_body(env={"1": "x"}), b"\xff"]
    for data in odd:
        for header in (None, "alpha:x", "zzz", ""):
            for client in ("alpha", "nobody", ""):
                try:
                    d = decide(
                        f"tg.submit.{client}",
                        data,
                        header,
                        7,
                        STORED_AT,
                        lookup=CLIENTS.get,
                        settings=SETTINGS,
                        limits=LIMITS,
                    )
                except Unroutable as exc:
                    assert not client or not (header or "").startswith(f"{client}:")
                    assert exc.client == (client or None)
                    continue
                assert isinstance(d.event, Rejected)
