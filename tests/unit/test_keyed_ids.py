"""Keyed submission ids: a tag only the publisher (its NATS password) can compute, so no other
client can make one of its ids and have its task dropped as a duplicate (no servers)."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from tidegate import names
from tidegate.bus.submit import id_secret, task_message, task_messages, url_id_secret
from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import Decision, decide
from tidegate.wire import ClientRecord, Queued, Rejected, TaskSpec

STORED_AT = datetime(2026, 12, 3, 0, 0, 1, tzinfo=UTC)
CLIENTS = {"alpha": ClientRecord(name="alpha")}
SECRET = b"alpha-password"


def route(body: bytes, header: str | None, seq: int = 7) -> Decision:
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


def body_of(key: str) -> bytes:
    return json.dumps({"key": key, "argv": ["/bin/true"]}).encode()


# --- msg_id ----------------------------------------------------------------------------------


def test_without_a_secret_the_id_is_the_plain_task_id() -> None:
    assert names.msg_id("alpha", "k1") == "alpha:k1"
    assert names.msg_id("alpha", "k1", None) == "alpha:k1"
    assert names.msg_id("alpha", "k1", b"") == "alpha:k1"


def test_a_keyed_id_is_the_plain_id_and_a_truncated_hmac_of_it() -> None:
    expected = hmac.new(SECRET, b"alpha:k1", hashlib.sha256).hexdigest()[:20]
    assert names.msg_id("alpha", "k1", SECRET) == f"alpha:k1#id-{expected}"
    assert names.id_tag("alpha", "k1", SECRET) == expected
    assert names.ID_TAG_HEX == 20


def test_a_keyed_id_is_stable_for_its_publisher_and_differs_by_secret_client_and_key() -> None:
    mine = names.msg_id("alpha", "k1", SECRET)
    assert names.msg_id("alpha", "k1", SECRET) == mine  # resubmissions still deduplicate
    assert names.msg_id("alpha", "k1", b"another-password") != mine
    tag = names.id_tag("alpha", "k1", SECRET)
    assert names.id_tag("beta", "k1", SECRET) != tag
    assert names.id_tag("alpha", "k2", SECRET) != tag


def test_the_bus_messages_carry_the_keyed_id_when_given_the_secret() -> None:
    spec = TaskSpec(key="k1", argv=["/bin/true"])
    keyed = names.msg_id("alpha", "k1", SECRET)
    assert task_message("alpha", spec, max_task_bytes=65536).msg_id == "alpha:k1"
    assert task_message("alpha", spec, max_task_bytes=65536, secret=SECRET).msg_id == keyed
    many = task_messages("alpha", [spec], max_task_bytes=65536, secret=SECRET)
    assert [o.msg_id for o in many] == [keyed]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://client-alpha:s3cret@127.0.0.1:4222", b"s3cret"),
        ("nats://u:p%40ss@h:4222,nats://u:other@h2:4222", b"p@ss"),  # the first server's
        ("nats://127.0.0.1:4222", None),
        ("nats://just-a-token@127.0.0.1:4222", None),
        ("", None),
    ],
)
def test_the_id_secret_of_a_url_is_its_password(url: str, expected: bytes | None) -> None:
    assert url_id_secret(url) == expected


def test_an_id_secret_is_the_password_as_bytes_and_none_when_empty() -> None:
    assert id_secret("pw") == b"pw" and id_secret(b"pw") == b"pw"
    assert id_secret(None) is None and id_secret("") is None


# --- msg_id_matches --------------------------------------------------------------------------


def test_the_plain_and_the_keyed_id_match_their_task() -> None:
    assert names.msg_id_matches("alpha:k1", "alpha", "k1")
    assert names.msg_id_matches(names.msg_id("alpha", "k1", SECRET), "alpha", "k1")


def test_retry_and_redrive_ids_still_match_their_task() -> None:
    retry = names.retry_msg_id("alpha", "k1", "abc")
    assert retry == "alpha:k1#retry-abc" and names.msg_id_matches(retry, "alpha", "k1")
    keyed = names.msg_id("alpha", "k1", SECRET)
    for original in ("alpha:k1", keyed, retry):
        redriven = names.redrive_msg_id(original, 42)
        assert redriven == f"{original}#retry-dead-42"
        assert names.msg_id_matches(redriven, "alpha", "k1")


def test_a_bare_mark_or_a_bare_hash_matches_no_task() -> None:
    assert not names.msg_id_matches("alpha:k1#", "alpha", "k1")
    assert not names.msg_id_matches("alpha:k1#retry-", "alpha", "k1")
    assert not names.msg_id_matches("alpha:k1#id-", "alpha", "k1")


def test_another_clients_or_another_keys_id_does_not_match() -> None:
    assert not names.msg_id_matches(names.msg_id("beta", "k1", SECRET), "alpha", "k1")
    assert not names.msg_id_matches("beta:k1", "alpha", "k1")
    assert not names.msg_id_matches(names.msg_id("alpha", "k2", SECRET), "alpha", "k1")
    assert not names.msg_id_matches("alpha:k10", "alpha", "k1")


def test_a_key_holding_a_hash_is_matched_exactly_against_the_bodys_key() -> None:
    key = "wf#3"
    assert names.msg_id_matches("alpha:wf#3", "alpha", key)
    assert names.msg_id_matches(names.msg_id("alpha", key, SECRET), "alpha", key)
    assert not names.msg_id_matches("alpha:wf#4", "alpha", key)
    assert not names.msg_id_matches("alpha:wf", "alpha", key)
    # The id of task `wf#3` is not one of task `wf#30`'s, keyed or not.
    assert not names.msg_id_matches(names.msg_id("alpha", key, SECRET), "alpha", "wf#30")


# --- the route step --------------------------------------------------------------------------


def test_decide_routes_a_submission_with_a_keyed_id() -> None:
    d = route(body_of("k1"), names.msg_id("alpha", "k1", SECRET))
    assert d.work is not None and d.work.task_id == "alpha:k1"
    assert isinstance(d.event, Queued) and d.event.key == "k1"


def test_decide_routes_a_key_holding_a_hash_with_its_keyed_id() -> None:
    d = route(body_of("a#id-b"), names.msg_id("alpha", "a#id-b", SECRET))
    assert d.work is not None and d.work.task_id == "alpha:a#id-b"


def test_decide_rejects_a_keyed_id_of_another_key() -> None:
    d = route(body_of("k2"), names.msg_id("alpha", "k1", SECRET))
    assert d.work is None and isinstance(d.event, Rejected)
    assert "does not match the task key" in d.event.reason


def test_decide_reads_the_key_of_a_keyed_header_when_the_body_is_junk() -> None:
    d = route(b"\x00not json", names.msg_id("alpha", "k1", SECRET))
    assert isinstance(d.event, Rejected) and d.event.key == "k1"
    assert d.event.task_id == "alpha:k1"


def test_decide_reads_the_key_of_a_redriven_keyed_header_when_the_body_is_junk() -> None:
    header = names.redrive_msg_id(names.msg_id("alpha", "k1", SECRET), 9)
    d = route(b"{", header)
    assert isinstance(d.event, Rejected) and d.event.task_id == "alpha:k1"


def test_decide_keeps_a_hash_that_is_no_tag_in_a_header_only_key() -> None:
    d = route(b"junk", "alpha:wf#3")  # a plain id (no users) of a key holding `#`
    assert isinstance(d.event, Rejected) and d.event.key == "wf#3"
