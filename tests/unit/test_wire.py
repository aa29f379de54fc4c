"""The wire schema: task validation (the same on the SDK and the driver side) and the messages
that travel between components, without any server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args

import msgspec
import pytest

from tidegate import names
from tidegate.errors import InvalidTask
from tidegate.wire import (
    FINISHED_BY_STATE,
    MAX_ATTEMPTS_LIMIT,
    MAX_TIMEOUT_S,
    STATE_RANK,
    TERMINAL_STATES,
    AnyEvent,
    Cancelled,
    CancelRequest,
    Dispatched,
    Failed,
    Heartbeat,
    Lost,
    Queued,
    Rejected,
    Running,
    RunningTask,
    State,
    Succeeded,
    TaskSpec,
    TimedOut,
    WorkItem,
    check_spec,
    decode_cancel,
    decode_event,
    decode_heartbeat,
    decode_spec,
    encode,
    peek_state,
)

T0 = datetime(2026, 11, 27, 0, 0, 0, 123456, tzinfo=UTC)


def body(**fields: Any) -> bytes:
    spec: dict[str, Any] = {"key": "wf-812.node-3.2026112700", "argv": ["/usr/bin/env", "true"]}
    spec.update(fields)
    return json.dumps({k: v for k, v in spec.items() if v is not _DROP}).encode()


_DROP = object()  # body(argv=_DROP) leaves the field out


def rejected(data: bytes) -> str:
    with pytest.raises(InvalidTask) as info:
        decode_spec(data)
    return str(info.value)


# --- TaskSpec ------------------------------------------------------------------------------------


def test_the_documented_example_decodes_with_every_field() -> None:
    spec = decode_spec(
        b'{"key": "wf-812.node-3.2026112700", "argv": ["/usr/bin/env", "echo", "hi"],'
        b' "env": {"A": "1"}, "cwd": null, "timeout_s": 3600, "pool": "default",'
        b' "priority": 0, "labels": {"name": "daily_report"}, "max_attempts": 3}'
    )
    assert spec.argv == ["/usr/bin/env", "echo", "hi"]
    assert spec.env == {"A": "1"} and spec.labels == {"name": "daily_report"}
    assert (spec.timeout_s, spec.pool, spec.priority, spec.max_attempts) == (3600, "default", 0, 3)


def test_only_key_and_command_are_required() -> None:
    spec = decode_spec(b'{"key": "k", "shell": "echo hi"}')
    assert spec == TaskSpec(key="k", shell="echo hi")
    assert (spec.argv, spec.env, spec.cwd, spec.pool, spec.labels) == (None, {}, None, None, {})
    assert (spec.timeout_s, spec.priority, spec.max_attempts) == (3600, 0, 3)


def test_encode_then_decode_is_identity() -> None:
    spec = TaskSpec(
        key="k",
        argv=["/bin/echo", "ü"],
        env={"_X1": "v"},
        cwd="/tmp",
        timeout_s=1.5,
        pool="gpu_1",
        priority=-5,
        labels={"a": "b"},
        max_attempts=1,
    )
    assert decode_spec(encode(spec)) == spec


@pytest.mark.parametrize(
    "fields",
    [{"shell": "true"}, {"argv": _DROP}, {"argv": None}, {"argv": None, "shell": None}],
    ids=["both", "neither", "argv-null", "both-null"],
)
def test_exactly_one_of_argv_and_shell(fields: dict[str, Any]) -> None:
    assert "exactly one of `argv`" in rejected(body(**fields))


def test_empty_argv_is_rejected() -> None:
    assert "`argv` is empty" in rejected(body(argv=[]))


def test_argv0_must_name_a_program() -> None:
    assert "`argv[0]` is empty" in rejected(body(argv=["", "x"]))


@pytest.mark.parametrize("shell", ["", " ", "\t\n"])
def test_blank_shell_is_rejected(shell: str) -> None:
    assert "`shell` is blank" in rejected(body(argv=_DROP, shell=shell))


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "É", "A\x00"])
def test_bad_env_names_are_rejected(name: str) -> None:
    assert "not a valid environment variable name" in rejected(body(env={name: "v"}))


@pytest.mark.parametrize("name", ["A", "_", "_a1", "PATH", "lower_case"])
def test_good_env_names_pass(name: str) -> None:
    assert decode_spec(body(env={name: "v"})).env == {name: "v"}


def test_nul_in_argv_is_rejected() -> None:
    assert "NUL" in rejected(body(argv=["/bin/echo", "a\x00b"]))


def test_nul_in_env_value_is_rejected() -> None:
    assert "NUL" in rejected(body(env={"A": "x\x00"}))


# A NUL can be neither passed to exec nor stored in a PostgreSQL text or jsonb value: one that
# got through would fail every projection batch it is in, for every client, forever.
def test_nul_in_shell_is_rejected() -> None:
    assert "NUL" in rejected(body(argv=_DROP, shell="echo a\x00b"))


def test_nul_in_cwd_is_rejected() -> None:
    assert "NUL" in rejected(body(cwd="/tmp\x00x"))


def test_nul_in_labels_is_rejected() -> None:
    assert "NUL" in rejected(body(labels={"name": "a\x00b"}))
    assert "NUL" in rejected(body(labels={"na\x00me": "ab"}))


@pytest.mark.parametrize("cwd", ["tmp", "./tmp", "~/x", ""])
def test_relative_cwd_is_rejected(cwd: str) -> None:
    assert "`cwd` must be an absolute path" in rejected(body(cwd=cwd))


def test_absolute_cwd_passes() -> None:
    assert decode_spec(body(cwd="/var/tmp")).cwd == "/var/tmp"


def test_unknown_field_is_rejected_and_named() -> None:
    reason = rejected(body(comand="typo"))
    assert reason.startswith("invalid task:") and "comand" in reason


@pytest.mark.parametrize(
    "fields",
    [
        {"key": 5},
        {"argv": "/bin/true"},
        {"argv": ["/bin/echo", 1]},
        {"argv": _DROP, "shell": ["echo"]},
        {"env": {"A": 1}},
        {"env": ["A=1"]},
        {"cwd": 7},
        {"timeout_s": "10"},
        {"priority": 1.5},
        {"max_attempts": "3"},
        {"labels": {"a": None}},
        {"pool": 3},
    ],
    ids=lambda f: ",".join(f),
)
def test_wrong_types_are_rejected(fields: dict[str, Any]) -> None:
    assert rejected(body(**fields)).startswith("invalid task:")


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b'{"key": "k",}', b"\xff"])
def test_malformed_json_is_rejected(data: bytes) -> None:
    assert rejected(data).startswith("malformed JSON")


@pytest.mark.parametrize("data", [b"[]", b'"task"', b"null", b"3"])
def test_a_body_that_is_not_an_object_is_rejected(data: bytes) -> None:
    assert rejected(data).startswith("invalid task:")


def test_missing_key_is_rejected() -> None:
    assert "key" in rejected(body(key=_DROP))


@pytest.mark.parametrize("timeout", [0.001, 1, 300, MAX_TIMEOUT_S])
def test_timeout_inside_bounds(timeout: float) -> None:
    assert decode_spec(body(timeout_s=timeout)).timeout_s == timeout


@pytest.mark.parametrize("timeout", [0, -1, MAX_TIMEOUT_S + 1, 1e308])
def test_timeout_outside_bounds(timeout: float) -> None:
    assert "timeout_s" in rejected(body(timeout_s=timeout))


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("max_attempts", [1, MAX_ATTEMPTS_LIMIT], [0, -1, MAX_ATTEMPTS_LIMIT + 1]),
        ("priority", [-100, 0, 100], [-101, 101]),
    ],
)
def test_integer_bounds(field: str, good: list[int], bad: list[int]) -> None:
    for value in good:
        assert getattr(decode_spec(body(**{field: value})), field) == value
    for value in bad:
        assert field in rejected(body(**{field: value}))


@pytest.mark.parametrize("key", ["k", "wf-812.node-3.2026112700", "a:b/c", "~!#", "x" * 200, "0"])
def test_key_pattern_accepts(key: str) -> None:
    assert decode_spec(body(key=key)).key == key


@pytest.mark.parametrize("key", ["", "a b", "tab\tkey", "ü", "x" * 201, "a\x00", "a\nb"])
def test_key_pattern_rejects(key: str) -> None:
    assert "key" in rejected(body(key=key))


# Python's `$` also matches before a final newline (msgspec checks `pattern` with re.search),
# hence `\Z` in the patterns. The key goes into the Nats-Msg-Id header and the pool into NATS
# subjects, where a newline breaks the protocol line.
def test_key_with_a_trailing_newline_is_rejected() -> None:
    assert "key" in rejected(body(key="k\n"))


def test_pool_with_a_trailing_newline_is_rejected() -> None:
    assert "pool" in rejected(body(pool="default\n"))


@pytest.mark.parametrize("pool", ["a.b", "a b", "", "x" * 65, "gpu*", "p>"])
def test_pool_must_be_one_subject_token(pool: str) -> None:
    assert "pool" in rejected(body(pool=pool))


def test_check_spec_applies_cross_field_rules_to_a_struct_built_in_code() -> None:
    with pytest.raises(InvalidTask, match="exactly one"):
        check_spec(TaskSpec(key="k"))
    spec = TaskSpec(key="k", argv=["/bin/true"])
    assert check_spec(spec) is spec


def test_invalid_task_reason_is_the_same_on_both_sides() -> None:
    """The SDK validates structs with check_spec; the driver decodes bytes: same reason."""
    spec = TaskSpec(key="k", argv=["/bin/true"], cwd="relative")
    with pytest.raises(InvalidTask) as sdk:
        check_spec(spec)
    assert rejected(encode(spec)) == str(sdk.value)


# --- events --------------------------------------------------------------------------------------

BASE: dict[str, Any] = dict(
    task_id="alpha:k1",
    client="alpha",
    key="k1",
    attempt=2,
    at=T0 + timedelta(seconds=3),
    submitted_at=T0,
)
SPEC = TaskSpec(key="k1", argv=["/bin/true"], labels={"n": "1"})


def finished(cls: type[Any], **more: Any) -> Any:
    return cls(
        **BASE,
        executor="host-1",
        exit_code=1,
        reason="why",
        log_tail="out\n",
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=2),
        **more,
    )


EVENTS: dict[str, AnyEvent] = {
    "queued": Queued(**BASE, spec=SPEC, pool="default", task_class="short"),
    "dispatched": Dispatched(**BASE, pool="default", executor="host-1"),
    "running": Running(**BASE, executor="host-1", started_at=T0 + timedelta(seconds=1)),
    "succeeded": finished(Succeeded),
    "failed": finished(Failed),
    "timed_out": finished(TimedOut),
    "cancelled": finished(Cancelled),
    "lost": finished(Lost),
    "rejected": Rejected(**BASE, reason="bad", finished_at=T0),
}


def test_there_is_an_event_for_every_state() -> None:
    assert set(EVENTS) == set(get_args(State)) == set(STATE_RANK)


@pytest.mark.parametrize("state", list(EVENTS))
def test_event_round_trip(state: str) -> None:
    event = EVENTS[state]
    data = encode(event)
    assert json.loads(data)["state"] == state  # the tag travels as the `state` field
    back = decode_event(data)
    assert type(back) is type(event)
    assert back == event
    assert back.state == state
    assert back.at.tzinfo is not None and back.at == event.at


@pytest.mark.parametrize("state", list(EVENTS))
def test_peek_state_reads_the_state_decode_event_reads(state: str) -> None:
    assert peek_state(encode(EVENTS[state])) == decode_event(encode(EVENTS[state])).state


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'{"key": "k"}'])
def test_peek_state_of_what_has_no_state_is_none(data: bytes) -> None:
    assert peek_state(data) is None


def test_rejected_without_executor_or_exit_code_round_trips() -> None:
    back = decode_event(encode(EVENTS["rejected"]))
    assert isinstance(back, Rejected)
    assert (back.executor, back.exit_code, back.log_tail) == (None, None, "")


def test_sensitive_flag_travels_and_defaults_to_false() -> None:
    plain = EVENTS["dispatched"]
    assert plain.sensitive is False
    marked = Dispatched(**BASE, pool="default", sensitive=True)
    back = decode_event(encode(marked))
    assert back.sensitive is True and back.executor is None
    assert back.event_id == plain.event_id  # the flag is not part of the identity


def test_finished_by_state_builds_the_tagged_classes() -> None:
    assert set(FINISHED_BY_STATE) == TERMINAL_STATES
    for state, cls in FINISHED_BY_STATE.items():
        event = cls(**BASE, finished_at=T0)
        assert event.state == state and event.terminal
        assert decode_event(encode(event)) == event


def test_an_unknown_state_does_not_decode() -> None:
    data = json.loads(encode(EVENTS["dispatched"]))
    data["state"] = "exploded"
    with pytest.raises(msgspec.ValidationError):
        decode_event(json.dumps(data).encode())


def test_a_non_utc_time_decodes_to_the_same_instant() -> None:
    cet = timezone(timedelta(hours=1))
    event = Dispatched(**{**BASE, "at": T0.astimezone(cet)}, pool="default")
    assert decode_event(encode(event)).at == T0.astimezone(cet)


def test_terminal_flag() -> None:
    for state, event in EVENTS.items():
        assert event.terminal == (state in TERMINAL_STATES)


def test_event_id_names_task_attempt_and_state() -> None:
    # Run 0: an event from a component that predates runs keeps the id it always had.
    assert EVENTS["running"].event_id == "alpha:k1/2/running"
    for state, event in EVENTS.items():
        assert event.event_id == f"alpha:k1/2/{state}"


def test_event_id_names_the_run_when_there_is_one() -> None:
    for state, event in EVENTS.items():
        later = msgspec.structs.replace(event, run=4711)
        assert later.event_id == f"alpha:k1@4711/2/{state}"
        assert later.event_id != event.event_id
        assert decode_event(encode(later)).run == 4711
    # Two runs of one task id never share an event id: their callbacks are told apart.
    first = Dispatched(**BASE, pool="default", run=5)
    second = Dispatched(**BASE, pool="default", run=9)
    assert first.event_id != second.event_id


def test_messages_without_a_run_still_decode_as_run_0() -> None:
    """Rolling upgrades: an older component's event, work item and heartbeat have no run."""
    old_event = json.loads(encode(EVENTS["failed"]))
    del old_event["run"]
    assert decode_event(json.dumps(old_event).encode()).run == 0
    item = WorkItem(
        task_id="alpha:k1",
        client="alpha",
        spec=SPEC,
        pool="default",
        task_class="short",
        submitted_at=T0,
    )
    old_item = json.loads(encode(item))
    del old_item["run"]
    assert msgspec.json.decode(json.dumps(old_item).encode(), type=WorkItem).run == 0


def test_run_msg_id_tells_runs_apart() -> None:
    assert names.run_msg_id("alpha:k1", 17) == "alpha:k1@17"
    assert names.run_msg_id("alpha:k1", 17) != names.run_msg_id("alpha:k1", 18)
    assert names.run_msg_id("alpha:k1", 0) == "alpha:k1"  # a work item from before runs


def test_a_retry_msg_id_belongs_to_its_task_only() -> None:
    retry = names.retry_msg_id("alpha", "k1", "abc")
    assert retry == "alpha:k1#retry-abc"
    assert names.msg_id_matches(retry, "alpha", "k1")
    assert names.msg_id_matches("alpha:k1", "alpha", "k1")
    assert not names.msg_id_matches(retry, "alpha", "k2")
    assert not names.msg_id_matches("alpha:k1#retry-", "alpha", "k1")
    assert not names.msg_id_matches("beta:k1#retry-abc", "alpha", "k1")


def test_a_cancel_request_reaches_only_its_run() -> None:
    just_5 = CancelRequest(task_id="alpha:k1", run=5)
    assert just_5.applies_to(5, T0) and not just_5.applies_to(9, T0)
    so_far = CancelRequest(task_id="alpha:k1", at=T0)
    assert so_far.applies_to(5, T0 - timedelta(seconds=1))
    assert not so_far.applies_to(9, T0 + timedelta(seconds=1))  # submitted after the request
    assert decode_cancel(encode(just_5)) == just_5
    # A bare task id, as components before runs wrote it: every run.
    legacy = decode_cancel(b"alpha:k1")
    assert legacy.task_id == "alpha:k1" and legacy.applies_to(9, T0 + timedelta(days=1))


def test_event_id_is_stable_across_time_and_redelivery() -> None:
    """The dedup id and the callback's event_id: it must not depend on when it was reported."""
    a = Dispatched(**BASE, pool="default", executor="host-1")
    b = Dispatched(**{**BASE, "at": T0 + timedelta(hours=1)}, pool="default", executor="host-2")
    assert a.event_id == b.event_id
    assert decode_event(encode(a)).event_id == a.event_id


def test_event_id_differs_per_attempt_and_state() -> None:
    ids = {e.event_id for e in EVENTS.values()}
    ids.add(Dispatched(**{**BASE, "attempt": 3}, pool="default").event_id)
    assert len(ids) == len(EVENTS) + 1


# --- state ranks ---------------------------------------------------------------------------------


def test_state_rank_orders_the_lifecycle() -> None:
    assert STATE_RANK["queued"] < STATE_RANK["dispatched"] < STATE_RANK["running"]
    top = max(STATE_RANK.values())
    assert {s for s, r in STATE_RANK.items() if r == top} == TERMINAL_STATES
    assert all(STATE_RANK[s] > STATE_RANK["running"] for s in TERMINAL_STATES)


def test_terminal_states_share_one_rank() -> None:
    """Whichever terminal state of an attempt is written first stays."""
    assert len({STATE_RANK[s] for s in TERMINAL_STATES}) == 1


# --- heartbeats ----------------------------------------------------------------------------------


def test_heartbeat_round_trip() -> None:
    hb = Heartbeat(
        executor="host-1",
        host="host",
        pid=42,
        pools=["default", "gpu"],
        slots=16,
        running=[
            RunningTask(
                task_id="alpha:k1",
                client="alpha",
                key="k1",
                attempt=1,
                pool="default",
                started_at=T0 + timedelta(seconds=1),
                submitted_at=T0,
            )
        ],
        load=0.75,
        at=T0 + timedelta(seconds=2),
    )
    back = decode_heartbeat(encode(hb))
    assert back == hb
    assert back.draining is False
    assert back.running[0].started_at == T0 + timedelta(seconds=1)


def test_heartbeat_draining_and_empty_running() -> None:
    hb = Heartbeat(
        executor="e",
        host="h",
        pid=1,
        pools=["default"],
        slots=1,
        running=[],
        load=0.0,
        at=T0,
        draining=True,
    )
    assert decode_heartbeat(encode(hb)) == hb


def test_heartbeat_missing_field_does_not_decode() -> None:
    data = json.loads(
        encode(
            Heartbeat(
                executor="e",
                host="h",
                pid=1,
                pools=[],
                slots=1,
                running=[],
                load=0.0,
                at=T0,
            )
        )
    )
    del data["slots"]
    with pytest.raises(msgspec.ValidationError):
        decode_heartbeat(json.dumps(data).encode())
