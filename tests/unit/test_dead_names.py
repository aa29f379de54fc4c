"""Dead-letter subjects: one token per client whatever its name, read back exactly."""

from __future__ import annotations

import pytest

from tidegate import names
from tidegate.driver.poison import client_of, stage_of


@pytest.mark.parametrize("client", ["alpha", "a.b", "a b", "*", ">", "é", "x" * 300, ""])
def test_any_client_is_one_token_and_reads_back(client: str) -> None:
    subject = names.dead_subject("submit", client)
    assert len(subject.split(".")) == 4
    assert not any(c in subject.split(".", 3)[3] for c in " *>\t")
    assert names.parse_dead_subject(subject) == ("submit", client)


def test_an_unknown_client_and_the_filters() -> None:
    assert names.parse_dead_subject(names.dead_subject("heartbeat", None)) == ("heartbeat", None)
    assert names.dead_filter() == "tg.dead.*.*"
    assert names.dead_filter("event") == "tg.dead.event.*"
    assert names.dead_filter(client="a.b") == "tg.dead.*." + names.client_token("a.b")
    assert names.parse_dead_subject("tg.event.x") is None


def test_stages_and_clients_of_spent_messages() -> None:
    assert stage_of(names.EVENTS_STREAM, names.PROJECTOR_CONSUMER) == "event"
    assert stage_of(names.EVENTS_STREAM, names.NOTIFY_CONSUMER) == "notify"
    assert stage_of(names.READY_STREAM, "ready_a_default") == "ready"
    assert stage_of("KV_tg_clients", "x") is None
    assert client_of("tg.submit.a.b") == "a.b"
    assert client_of(names.ready_subject("alpha", "default")) == "alpha"
    assert client_of(names.work_subject("default", "short", "beta")) == "beta"
    assert client_of(names.event_subject("gamma")) == "gamma"
    assert client_of("$KV.tg_executors.e1") is None
