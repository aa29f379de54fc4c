"""A task as a client submits it (`TaskSpec`), its checks, and the ids derived from it."""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from tidegate.errors import InvalidTask

# A name that is also a single NATS subject token and a KV key (clients, pools).
NAME_RE: Final = r"\A[A-Za-z0-9_-]{1,64}\Z"  # \Z: `$` would let a trailing newline in
Name = Annotated[str, Meta(pattern=NAME_RE)]
# The client's own idempotency key: printable, no whitespace, bounded.
KEY_PATTERN: Final = r"\A[!-~]{1,200}\Z"
Key = Annotated[str, Meta(pattern=KEY_PATTERN)]

MAX_ATTEMPTS_LIMIT: Final = 20
MAX_TIMEOUT_S: Final = 7 * 24 * 3600


class TaskSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a client submits (the JSON body published to `tg.submit.<client>`)."""

    key: Key
    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 3600
    pool: Name | None = None
    priority: Annotated[int, Meta(ge=-100, le=100)] = 0
    labels: dict[str, str] = {}
    max_attempts: Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS_LIMIT)] = 3


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_spec(spec: TaskSpec) -> TaskSpec:
    """Cross-field rules that msgspec's per-field constraints cannot express."""
    if (spec.argv is None) == (spec.shell is None):
        raise InvalidTask("give exactly one of `argv` (a list) or `shell` (a string)")
    if spec.argv is not None:
        if not spec.argv:
            raise InvalidTask("`argv` is empty: give at least the program to run")
        if not spec.argv[0]:
            raise InvalidTask("`argv[0]` is empty: it must name the program to run")
        if any("\x00" in a for a in spec.argv):
            raise InvalidTask("`argv` contains a NUL byte")
    if spec.shell is not None and not spec.shell.strip():
        raise InvalidTask("`shell` is blank: give the command line to run")
    if spec.shell is not None and "\x00" in spec.shell:
        raise InvalidTask("`shell` contains a NUL byte")
    if spec.cwd is not None and "\x00" in spec.cwd:
        raise InvalidTask("`cwd` contains a NUL byte")
    for name, value in spec.labels.items():
        if "\x00" in name or "\x00" in value:
            raise InvalidTask(f"label {name!r} contains a NUL byte")
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name):
            raise InvalidTask(f"`env` name {name!r} is not a valid environment variable name")
        if "\x00" in value:
            raise InvalidTask(f"`env[{name}]` contains a NUL byte")
    if spec.cwd is not None and not spec.cwd.startswith("/"):
        raise InvalidTask("`cwd` must be an absolute path")
    return spec


def decode_spec(data: bytes) -> TaskSpec:
    """Parse and validate a task body; raises `InvalidTask` with a reason fit for the client."""
    try:
        spec = msgspec.json.decode(data, type=TaskSpec)
    except msgspec.ValidationError as exc:
        raise InvalidTask(f"invalid task: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidTask(f"malformed JSON: {exc}") from None
    return check_spec(spec)


def task_id(client: str, key: str) -> str:
    return f"{client}:{key}"


def run_ref(task_id: str, run: int) -> str:
    """One run of a task, `task_id@run`; the bare task id for run 0 (before runs existed)."""
    return f"{task_id}@{run}" if run else task_id


def event_id_of(task_id: str, run: int, attempt: int, state: str) -> str:
    """A state event's id: `task_id/attempt/state`, `task_id@run/attempt/state` once runs
    are known."""
    return f"{run_ref(task_id, run)}/{attempt}/{state}"


TaskClass = Literal["short", "long"]


class SpecOnWire(TaskSpec, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A spec inside a routed message or an event. A driver wrote it, maybe a newer one whose
    spec has fields this version does not know: skipped, not refused, so that an older
    executor still runs what a newer driver routed (a rolling upgrade strands nothing). A
    client's own submission is still held to `TaskSpec` (`decode_spec`). Only the decoders
    of this package use it (not re-exported)."""


def plain_spec(spec: TaskSpec) -> TaskSpec:
    """A `SpecOnWire` (or any spec) as this version's own `TaskSpec`."""
    return TaskSpec(**msgspec.structs.asdict(spec))
