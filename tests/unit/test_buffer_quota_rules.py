"""A client's own buffer quota: the pure rules, the CLI value, the form field, the record's
decoding, and the publishers' gate against a fake JetStream (no servers)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from tidegate import names
from tidegate.bus.quota import QuotaGate, effective_quota, over_quota, ready_room
from tidegate.cli.options import BUFFER_MAX_DEFAULT, buffer_quota
from tidegate.console.clientform import FormError, changes_of, form_from, parse_form
from tidegate.errors import UsageError
from tidegate.registry import check_buffer_max
from tidegate.wire import ClientRecord


def test_the_effective_quota_never_exceeds_the_ceiling() -> None:
    assert effective_quota(None, 1_000_000) is None  # no own quota: the ceiling alone
    assert effective_quota(50, 1_000_000) == 50
    assert effective_quota(5_000_000, 1_000_000) == 1_000_000  # the ceiling was lowered since
    assert effective_quota(50, -1) == 50  # a stream without a per-subject limit


def test_ready_room_counts_every_pool_of_the_client() -> None:
    assert ready_room(None, [5, 6]) is None
    assert ready_room(10, [3, 4]) == 3
    assert ready_room(10, [6, 7]) == 0  # over (another driver routed meanwhile): no room
    assert ready_room(10, []) == 10


def test_the_refusal_says_whose_and_what_to_do() -> None:
    text = over_quota("billing", quota=100, waiting=103)
    assert "'billing'" in text and "quota is 100" in text and "103 tasks waiting" in text
    assert "`tidegate client set billing --buffer-max N`" in text
    assert "Other clients are not affected" in text


def test_the_registry_refuses_a_quota_above_the_ceiling() -> None:
    check_buffer_max(None, 10)
    check_buffer_max(10, 10)
    check_buffer_max(10**9, None)  # ceiling unknown: the effective quota is clamped anyway
    with pytest.raises(UsageError, match="above the stream-wide ceiling of 10") as caught:
        check_buffer_max(11, 10)
    assert caught.value.exit_code == 2
    assert "--max-msgs-per-subject" in str(caught.value)


def test_the_command_line_value() -> None:
    assert buffer_quota("250") == 250
    assert buffer_quota("default") == BUFFER_MAX_DEFAULT
    assert buffer_quota(" Default ") == BUFFER_MAX_DEFAULT
    for bad in ("0", "-1", "lots", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="default"):
            buffer_quota(bad)


def test_an_older_record_decodes_without_a_quota() -> None:
    old = b'{"name": "billing", "sensitive": true, "callback_held_max": 10}'
    assert msgspec.json.decode(old, type=ClientRecord).buffer_max is None
    new = msgspec.json.encode(ClientRecord(name="billing", buffer_max=7))
    assert msgspec.json.decode(new, type=ClientRecord).buffer_max == 7
    with pytest.raises(msgspec.ValidationError, match="buffer_max"):
        msgspec.json.decode(b'{"name": "billing", "buffer_max": 0}', type=ClientRecord)


def test_the_form_field() -> None:
    assert form_from({"buffer_max": 12}).buffer_max == 12
    assert parse_form({"buffer_max": " "}).buffer_max is None  # empty: the stream-wide one
    form = parse_form({"buffer_max": "40"})
    assert form.buffer_max == 40 and changes_of(form, None)["buffer_max"] == 40
    for bad in ("lots", "0", "-5", "2.5"):
        with pytest.raises(FormError, match=r"^buffer_max: "):
            parse_form({"buffer_max": bad})


# --- the publishers' gate ----------------------------------------------------------------------


@dataclass
class FakeKv:
    records: dict[str, ClientRecord]

    async def get(self, key: str) -> Any:
        if key not in self.records:
            raise KeyNotFoundError
        return SimpleNamespace(value=msgspec.json.encode(self.records[key]))


@dataclass
class FakeJs:
    """Stream totals per subject and the clients bucket; counts the stream reads."""

    kv: FakeKv
    subjects: dict[str, int] = field(default_factory=dict)
    ceiling: int = 1_000_000
    reads: int = 0
    fail: bool = False

    async def key_value(self, bucket: str) -> FakeKv:
        assert bucket == names.CLIENTS_BUCKET
        return self.kv

    async def stream_info(self, stream: str, subjects_filter: str) -> Any:
        self.reads += 1
        if self.fail:
            raise TimeoutError
        prefix = subjects_filter.removesuffix(">")
        found = {s: n for s, n in self.subjects.items() if s.startswith(prefix)}
        return SimpleNamespace(
            state=SimpleNamespace(subjects=found or None),
            config=SimpleNamespace(max_msgs_per_subject=self.ceiling),
        )


def _gate(js: FakeJs, fresh_s: float = 60.0) -> QuotaGate:
    return QuotaGate(js, fresh_s=fresh_s)  # type: ignore[arg-type]


async def test_the_gate_grants_up_to_the_quota_and_counts_what_it_granted() -> None:
    js = FakeJs(
        FakeKv({"tiny": ClientRecord(name="tiny", buffer_max=10)}),
        subjects={
            names.submit_subject("tiny"): 3,
            names.ready_subject("tiny", "default"): 2,
            names.ready_subject("tiny", "gpu"): 1,
            names.submit_subject("other"): 500,
        },
    )
    gate = _gate(js)
    first = await gate.take("tiny", 3)
    assert first.allowed == 3 and not first.reason  # 6 waiting, room for 4
    second = await gate.take("tiny", 5)
    assert second.allowed == 1 and "quota is 10" in second.reason
    assert (await gate.take("tiny", 1)).allowed == 0
    gate.give_back("tiny", first, 2)  # two were duplicates: they added nothing
    assert (await gate.take("tiny", 5)).allowed == 2
    assert js.reads == 2  # one backlog read (two streams) for all of it


async def test_a_newer_read_ignores_give_backs_of_the_older_one() -> None:
    js = FakeJs(
        FakeKv({"tiny": ClientRecord(name="tiny", buffer_max=4)}),
        subjects={names.submit_subject("tiny"): 2},
    )
    gate = _gate(js, fresh_s=0.0)  # every take reads again
    old = await gate.take("tiny", 2)
    assert old.allowed == 2
    js.subjects[names.submit_subject("tiny")] = 4  # both stored
    newer = await gate.take("tiny", 1)
    assert newer.allowed == 0
    gate.give_back("tiny", old, 2)  # counted by the newer read already: no room made
    assert (await gate.take("tiny", 1)).allowed == 0


async def test_the_gate_costs_no_stream_read_without_an_own_quota() -> None:
    js = FakeJs(FakeKv({"plain": ClientRecord(name="plain")}))
    gate = _gate(js)
    assert (await gate.take("plain", 10_000)).allowed == 10_000
    assert (await gate.take("stranger", 3)).allowed == 3  # unknown here: the router answers
    assert js.reads == 0


async def test_an_unreadable_backlog_refuses_nothing() -> None:
    js = FakeJs(FakeKv({"tiny": ClientRecord(name="tiny", buffer_max=1)}), fail=True)
    assert (await _gate(js).take("tiny", 5)).allowed == 5  # the ceiling still holds


async def test_the_ceiling_caps_an_own_quota() -> None:
    js = FakeJs(FakeKv({"big": ClientRecord(name="big", buffer_max=100)}), ceiling=8)
    grant = await _gate(js).take("big", 10)
    assert grant.allowed == 8 and "quota is 8" in grant.reason
