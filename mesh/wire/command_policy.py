"""A client's command policy: which executables and working directories its tasks may use, and
whether `shell` is allowed (`ClientRecord.allowed_executables`, `.allowed_cwds`, `.allow_shell`).

Pure and checked in one place: the driver's route step (`command_refusal`, which turns a
refused task into `rejected` with the reason), whatever way the task came in (the SDK,
`tidegate submit`, the console's HTTP submit, an operator's retry). The registry checks the
lists themselves (`check_command_lists`) when an operator sets them.

The check runs where a task is routed, not where it runs: PATH cannot be resolved there (it is
the executor's), so with an executables list `argv[0]` must be an absolute path. Paths are
taken as given: a path with a `..` component is refused rather than normalised (through a
symlinked directory `..` leads elsewhere than `os.path.normpath` says), and symlinks inside an
allowed directory are the host administrator's to trust.
"""

from __future__ import annotations

import os.path
import shlex
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Final, Protocol

from tidegate.errors import UsageError
from tidegate.wire.spec import TaskSpec

SHELL_PROGRAM: Final = "/bin/sh"  # what runs a `shell` task (the executor's `/bin/sh -c`)
COMMAND_POLICY: Final = "command policy"  # in every refusal: the rejected counter's `reason` kind
LIST_MAX: Final = 256  # entries in one list (the database's CHECK repeats it)
_SHOWN_MAX = 5  # allowed entries named in a refusal
_VALUE_MAX = 200  # characters of a refused value repeated in the reason


class Policy(Protocol):
    """The three fields of `ClientRecord` this module reads."""

    @property
    def name(self) -> str: ...
    @property
    def allowed_executables(self) -> Sequence[str] | None: ...
    @property
    def allowed_cwds(self) -> Sequence[str] | None: ...
    @property
    def allow_shell(self) -> bool: ...


def command_refusal(policy: Policy, spec: TaskSpec) -> str | None:
    """Why `policy` refuses `spec` (a reason that says what to do), or None when it may run."""
    name = policy.name
    if spec.shell is not None:
        if not policy.allow_shell:
            return (
                f"{COMMAND_POLICY} of client {name}: `shell` is not allowed; submit `argv` with an "
                f"absolute program path instead, or ask an operator to run "
                f"`tidegate client set {name} --shell`"
            )
        program = SHELL_PROGRAM
    else:
        program = (spec.argv or [""])[0]
    if policy.allowed_executables is not None:
        why = _executable_refusal(name, program, policy.allowed_executables, spec.shell is not None)
        if why:
            return why
    if policy.allowed_cwds is not None:
        return _cwd_refusal(name, spec.cwd, policy.allowed_cwds)
    return None


def _executable_refusal(name: str, program: str, allowed: Sequence[str], shell: bool) -> str | None:
    head = f"{COMMAND_POLICY} of client {name}:"
    listed = _listed(allowed)
    if not program.startswith("/"):
        return (
            f"{head} executable {_shown(program)} is not an absolute path; its executables are "
            f"checked by path (allowed: {listed}) and the executor's PATH is not known where "
            f"tasks are routed: give the full path (as `command -v` prints it on the executor)"
        )
    if _has_dotdot(program):
        return f"{head} executable {_shown(program)} has a '..' component; give it without '..'"
    if any(path_matches(program, pattern) for pattern in allowed):
        return None
    fix = (
        f"ask an operator to run `tidegate client set {name} --allow-executable PATH` "
        "(repeat it for each path to keep: the list given replaces the current one)"
    )
    if shell:
        what = f"`shell` runs {SHELL_PROGRAM}, which"
        fix = f"submit `argv` with an allowed program instead, or {fix}"
    else:
        what = f"executable {_shown(program)}"
    return f"{head} {what} is not allowed (allowed: {listed}); {fix}"


def _cwd_refusal(name: str, cwd: str | None, allowed: Sequence[str]) -> str | None:
    head = f"{COMMAND_POLICY} of client {name}:"
    listed = _listed(allowed)
    if cwd is None:
        return f"{head} no `cwd` given, and its tasks must run under one of: {listed}; give `cwd`"
    if _has_dotdot(cwd):
        return f"{head} cwd {_shown(cwd)} has a '..' component; give it without '..'"
    if any(under(cwd, prefix) for prefix in allowed):
        return None
    return (
        f"{head} cwd {_shown(cwd)} is not allowed (allowed: {listed}); ask an operator to run "
        f"`tidegate client set {name} --allow-cwd DIR` (repeat it for each directory to keep: "
        "the list given replaces the current one)"
    )


def path_matches(path: str, pattern: str) -> bool:
    """`path` matches `pattern` one component at a time, as a shell glob does: `*`, `?` and
    `[...]` stay within a component (`/usr/bin/*` is not `/usr/bin/sub/x`); a `**` component
    matches any number of components (`/opt/jobs/**`). Both absolute, neither with `..`."""
    if not (path.startswith("/") and pattern.startswith("/")):
        return False
    if _has_dotdot(path) or _has_dotdot(pattern):
        return False
    return _match(_parts(path), _parts(pattern))


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(parts[1:], rest)


def under(path: str, prefix: str) -> bool:
    """`path` is the directory `prefix` or inside it (`/data/a` is not under `/data/ab`)."""
    if not (path.startswith("/") and prefix.startswith("/")):
        return False
    if _has_dotdot(path) or _has_dotdot(prefix):
        return False
    p, base = _parts(path), _parts(prefix)
    return p[: len(base)] == base


def _parts(path: str) -> list[str]:
    # normpath folds `//`, `/./` and a trailing `/`; `..` never reaches here.
    return [c for c in os.path.normpath(path).split("/") if c]


def _has_dotdot(path: str) -> bool:
    return ".." in path.split("/")


def _listed(allowed: Sequence[str]) -> str:
    if not allowed:
        return "none"
    shown = ", ".join(_shown(a) for a in allowed[:_SHOWN_MAX])
    more = len(allowed) - _SHOWN_MAX
    return shown + (f" and {more} more" if more > 0 else "")


def _shown(value: str) -> str:
    """A value as the reason repeats it: quoted when it needs to be, and bounded."""
    cut = value if len(value) <= _VALUE_MAX else value[:_VALUE_MAX] + "…"
    return shlex.quote(cut)


# --- the lists themselves, as an operator sets them ----------------------------------------------


def check_command_lists(executables: Sequence[str] | None, cwds: Sequence[str] | None) -> None:
    """Refuse (`UsageError`, naming the entry) a list the route check could never match as
    meant: relative paths, `..`, empty or control characters, too many entries."""
    for what, flag, entries in (
        ("allowed_executables", "--allow-executable", executables),
        ("allowed_cwds", "--allow-cwd", cwds),
    ):
        if entries is None:
            continue
        if not entries:
            raise UsageError(
                f"{what}: an empty list would refuse every task; give at least one path, or "
                "none (null) to allow any; to hold a client's tasks back, pause it"
            )
        if len(entries) > LIST_MAX:
            raise UsageError(f"{what}: {len(entries)} entries; at most {LIST_MAX}")
        for entry in entries:
            if not entry.startswith("/"):
                raise UsageError(
                    f"{what}: {_shown(entry)} is not an absolute path ({flag} takes paths "
                    "starting with /)"
                )
            if _has_dotdot(entry):
                raise UsageError(f"{what}: {_shown(entry)} has a '..' component; leave it out")
            if any(ord(c) < 32 or ord(c) == 127 for c in entry):
                raise UsageError(f"{what}: {_shown(entry)} contains a control character")


def command_list(entries: Sequence[str] | None) -> tuple[str, ...] | None:
    """A list as stored: each entry stripped of blanks around it, empty ones left out, in the
    order given, each once."""
    if entries is None:
        return None
    kept = [e.strip() for e in entries if e.strip()]
    return tuple(dict.fromkeys(kept))
