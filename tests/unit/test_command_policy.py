"""A client's command policy (`tidegate.wire.command_policy`): glob matching by path
component, cwd prefixes and `..` escapes, shell, None = any; the route decision that turns a
refusal into `rejected`, and the lists an operator may set (no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from tidegate.cli.clients import _command_policy
from tidegate.cli.parser import build_parser
from tidegate.config import DriverSettings, Limits
from tidegate.driver.decide import decide
from tidegate.driver.route import _reason_kind
from tidegate.errors import UsageError
from tidegate.wire import (
    COMMAND_POLICY,
    ClientRecord,
    Queued,
    Rejected,
    TaskSpec,
    check_command_lists,
    command_list,
    command_refusal,
)
from tidegate.wire.command_policy import path_matches, under

PY = "/usr/bin/python3"


def client(**policy: Any) -> ClientRecord:
    return ClientRecord(name="team-a", **policy)


def task(**fields: Any) -> TaskSpec:
    fields.setdefault("key", "k")
    if "shell" not in fields:
        fields.setdefault("argv", [PY, "job.py"])
    return TaskSpec(**fields)


# --- matching ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "pattern", "matches"),
    [
        ("/usr/bin/python3", "/usr/bin/python3", True),
        ("/usr/bin/python3", "/usr/bin/*", True),
        ("/usr/bin/python3", "/usr/bin/python?", True),
        ("/usr/bin/python3", "/usr/bin/py[tx]hon3", True),
        ("/usr/bin/python3", "/usr/bin/perl", False),
        ("/usr/bin/sub/tool", "/usr/bin/*", False),  # `*` stays within a component
        ("/opt/jobs/a/b/run", "/opt/jobs/**", True),  # `**` crosses components
        ("/opt/jobs/a/b/run", "/opt/jobs/**/run", True),
        ("/opt/jobs/run", "/opt/jobs/**/run", True),  # `**` is also none
        ("/opt/other/run", "/opt/jobs/**", False),
        ("/usr//bin/./python3", "/usr/bin/python3", True),  # folded, the same file
        ("/usr/bin/../../bin/rm", "/usr/bin/*", False),  # `..` never matches
        ("/usr/bin/../../bin/rm", "/**", False),
        ("python3", "*", False),  # relative: PATH is not known where tasks are routed
        ("/usr/bin/python3", "usr/bin/python3", False),  # a relative pattern matches nothing
        ("/USR/bin/python3", "/usr/bin/python3", False),  # case-sensitive, as paths are
    ],
)
def test_executable_globs_match_by_path_component(path: str, pattern: str, matches: bool) -> None:
    assert path_matches(path, pattern) is matches


@pytest.mark.parametrize(
    ("path", "prefix", "inside"),
    [
        ("/data/team-a", "/data/team-a", True),
        ("/data/team-a/run/1", "/data/team-a", True),
        ("/data/team-a/run/1", "/data/team-a/", True),
        ("/data/team-ab", "/data/team-a", False),  # a prefix of the name is not a parent
        ("/data/team-a/../team-b", "/data/team-a", False),  # `..` escapes are refused
        ("/data/team-a/..", "/data/team-a", False),
        ("/data/team-a/./x", "/data/team-a", True),
        ("/anything/at/all", "/", True),
        ("relative/dir", "/", False),
    ],
)
def test_cwd_must_be_under_an_allowed_prefix(path: str, prefix: str, inside: bool) -> None:
    assert under(path, prefix) is inside


# --- the refusal -------------------------------------------------------------------------------


def test_none_allows_anything_as_before() -> None:
    everything = client()
    assert everything.allowed_executables is None and everything.allowed_cwds is None
    assert everything.allow_shell
    for spec in (
        task(argv=["rm", "-rf", "/tmp/x"]),
        task(argv=["/bin/rm"], cwd="/"),
        task(shell="echo hi | wc -c"),
    ):
        assert command_refusal(everything, spec) is None


def test_an_executable_outside_the_list_is_refused_with_the_fix() -> None:
    policy = client(allowed_executables=(PY, "/opt/jobs/*"))
    assert command_refusal(policy, task()) is None
    assert command_refusal(policy, task(argv=["/opt/jobs/nightly", "--all"])) is None
    why = command_refusal(policy, task(argv=["/bin/rm", "-rf", "/"]))
    assert why is not None and why.startswith(COMMAND_POLICY)
    assert "client team-a" in why and "executable /bin/rm is not allowed" in why
    assert "allowed: /usr/bin/python3, '/opt/jobs/*'" in why
    assert "tidegate client set team-a --allow-executable PATH" in why


def test_a_bare_program_name_is_refused_when_a_list_is_set() -> None:
    why = command_refusal(client(allowed_executables=("/usr/bin/*",)), task(argv=["echo", "hi"]))
    assert why is not None
    assert "executable echo is not an absolute path" in why and "full path" in why


def test_a_dotdot_escape_in_argv0_is_refused() -> None:
    policy = client(allowed_executables=("/usr/bin/*",))
    why = command_refusal(policy, task(argv=["/usr/bin/../../bin/rm"]))
    assert why is not None and "'..'" in why


def test_a_cwd_outside_the_prefixes_is_refused() -> None:
    policy = client(allowed_cwds=("/data/team-a", "/tmp/team-a"))
    assert command_refusal(policy, task(cwd="/data/team-a/run")) is None
    outside = command_refusal(policy, task(cwd="/data/team-b"))
    assert outside is not None
    assert "cwd /data/team-b is not allowed" in outside and "--allow-cwd DIR" in outside
    escape = command_refusal(policy, task(cwd="/data/team-a/../team-b"))
    assert escape is not None and "'..'" in escape
    # No cwd would run in the executor's own directory, which no list names.
    missing = command_refusal(policy, task())
    assert missing is not None and "no `cwd` given" in missing


def test_shell_is_refused_when_not_allowed() -> None:
    why = command_refusal(client(allow_shell=False), task(shell="echo hi"))
    assert why is not None and why.startswith(COMMAND_POLICY)
    assert "`shell` is not allowed" in why and "tidegate client set team-a --shell" in why
    assert command_refusal(client(allow_shell=False), task()) is None  # argv still runs


def test_shell_runs_bin_sh_which_an_executable_list_must_name() -> None:
    listed = client(allowed_executables=(PY,))
    why = command_refusal(listed, task(shell="rm -rf /"))
    assert why is not None and "`shell` runs /bin/sh, which is not allowed" in why
    assert command_refusal(client(allowed_executables=(PY, "/bin/sh")), task(shell="ls")) is None


def test_a_refusal_is_bounded_and_quotes_what_it_repeats() -> None:
    policy = client(allowed_executables=tuple(f"/opt/tool{i}" for i in range(40)))
    why = command_refusal(policy, task(argv=["/bin/" + "x" * 5000 + " ; rm"]))
    assert why is not None and len(why) < 1000
    assert "and 35 more" in why and "'/bin/xxx" in why


# --- in the route decision ---------------------------------------------------------------------


def decided(record: ClientRecord, **fields: Any) -> Any:
    spec: dict[str, Any] = {"key": "k1", "argv": [PY]}
    spec.update(fields)
    return decide(
        f"tg.submit.{record.name}",
        json.dumps(spec).encode(),
        f"{record.name}:k1",
        7,
        datetime(2026, 12, 3, tzinfo=UTC),
        lookup={record.name: record}.get,
        settings=DriverSettings(),
        limits=Limits(),
    )


def test_the_route_decision_rejects_a_refused_task_and_counts_it_apart() -> None:
    policy = client(allowed_executables=(PY,), allowed_cwds=("/srv",), allow_shell=False)
    refused = decided(policy, argv=["/bin/rm"], cwd="/srv")
    assert refused.work is None and isinstance(refused.event, Rejected)
    assert refused.event.task_id == "team-a:k1" and "/bin/rm" in refused.event.reason
    assert _reason_kind(refused.event) == "command_policy"
    assert _reason_kind(decided(policy, cwd="/etc").event) == "command_policy"
    assert _reason_kind(decided(policy, argv=None, shell="id", cwd="/srv").event) == (
        "command_policy"
    )
    routed = decided(policy, cwd="/srv/jobs")
    assert routed.work is not None and isinstance(routed.event, Queued)


# --- the lists as an operator sets them --------------------------------------------------------


@pytest.mark.parametrize(
    ("executables", "cwds", "says"),
    [
        (["python3"], None, "not an absolute path"),
        (["/usr/bin/../sbin/x"], None, "'..'"),
        (None, ["data"], "allowed_cwds"),
        (None, ["/data/\nx"], "control character"),
        ([], None, "empty list"),
        (["/x"] * 300, None, "at most 256"),
    ],
)
def test_lists_that_could_never_match_as_meant_are_refused(
    executables: list[str] | None, cwds: list[str] | None, says: str
) -> None:
    with pytest.raises(UsageError, match=says):
        check_command_lists(executables, cwds)


def test_lists_are_stored_trimmed_and_once_and_records_decode_without_them() -> None:
    assert command_list([" /usr/bin/* ", "", "/usr/bin/*", "/opt/x"]) == ("/usr/bin/*", "/opt/x")
    assert command_list(None) is None
    check_command_lists(("/usr/bin/*", "/opt/jobs/**"), ("/",))
    # A record mirrored before migration 0012 (no policy fields) allows everything.
    old = msgspec.json.decode(b'{"name": "old"}', type=ClientRecord)
    assert (old.allowed_executables, old.allowed_cwds, old.allow_shell) == (None, None, True)
    again = msgspec.json.decode(
        msgspec.json.encode(client(allowed_cwds=("/srv",))), type=ClientRecord
    )
    assert again.allowed_cwds == ("/srv",)


# --- the command line's flags ------------------------------------------------------------------


def test_client_flags_give_only_what_they_name() -> None:
    parse = build_parser().parse_args
    given = parse(["client", "add", "x", "--allow-executable", " /usr/bin/* ", "--no-shell"])
    assert _command_policy(given) == {"allowed_executables": ("/usr/bin/*",), "allow_shell": False}
    assert _command_policy(parse(["client", "set", "x", "--pause"])) == {}
    back = parse(["client", "set", "x", "--any-executable", "--any-cwd", "--shell"])
    assert _command_policy(back) == {
        "allowed_executables": None,
        "allowed_cwds": None,
        "allow_shell": True,
    }
    with pytest.raises(UsageError, match="not both"):
        _command_policy(parse(["client", "set", "x", "--allow-cwd", "/srv", "--any-cwd"]))
    with pytest.raises(UsageError, match="not an absolute path"):
        _command_policy(parse(["client", "set", "x", "--allow-cwd", "srv"]))
