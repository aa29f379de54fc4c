"""The programs put in front of a task's argv to change its user and limits (executor/taskenv.py
says why these and not `subprocess`'s own means), and the user and limits themselves."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tidegate.errors import ConfigError

log = logging.getLogger(__name__)

UserArgs = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunAs:
    """Another user than the executor's, as its passwd entry gave it at start."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def popen_args(self) -> UserArgs:
        # Its own groups, always: without `extra_groups` the child keeps the executor's (root's).
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


@dataclass(frozen=True, kw_only=True)
class Rlimits:
    """Limits of each task's process (None: inherited from the executor)."""

    cpu_s: int | None = None
    as_mb: int | None = None
    nofile: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.cpu_s, self.as_mb, self.nofile))


@dataclass(frozen=True, kw_only=True)
class Wrapper:
    """Programs put in front of a task's argv; each execs the next, the last the task.

    They report a failure to start the task themselves (as `<program>: failed to execute X:
    why`, exit 126 or 127), where `subprocess` would have raised: `launch_error` turns such an
    ending back into the reason a direct start would have given."""

    switch: tuple[str, ...] = ()  # setpriv …: runs as root, never with an unsafe `env`
    limits: tuple[str, ...] = ()  # prlimit …: as the task's user
    programs: tuple[str, ...] = ()  # their names, as they begin their own error messages

    @property
    def argv(self) -> tuple[str, ...]:
        return self.switch + self.limits

    def for_task(
        self, run_as: RunAs | None, own_env: Mapping[str, str]
    ) -> tuple[tuple[str, ...], UserArgs]:
        """What goes in front of this task's argv, and the `subprocess` arguments that change
        its user when `setpriv` may not (see executor/taskenv.py's docstring)."""
        if run_as is None:
            return self.limits, {}
        if not self.switch or not safe_for_root(own_env):
            return self.limits, run_as.popen_args
        return self.switch + self.limits, {}

    def launch_error(self, exit_code: int | None, first_line: str) -> str | None:
        if not self.programs or exit_code not in (1, 126, 127):
            return None
        for program in self.programs:
            if first_line.startswith(f"{program}: "):
                return f"cannot start: {first_line.removeprefix(f'{program}: ').strip()}"
        return None


NO_WRAPPER: Final = Wrapper()

# What glibc removes from the environment of a setuid program before it runs (its
# UNSECURE_ENVVARS, with every loader, malloc and tunables variable): the names through which an
# environment reaches into a privileged process's code, and util-linux's debug switches. A
# task's own `env` naming none of them is safe for `setpriv` to see as root, as it would be for
# any setuid program; one naming any starts through `subprocess`, whose user change comes first.
_ROOT_UNSAFE_NAMES: Final = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    }
)
_ROOT_UNSAFE_PREFIXES: Final = ("LD_", "MALLOC_", "GLIBC_")


def safe_for_root(env: Mapping[str, str]) -> bool:
    return not any(
        name in _ROOT_UNSAFE_NAMES
        or name.startswith(_ROOT_UNSAFE_PREFIXES)
        or name.endswith("_DEBUG")
        for name in env
    )


Which = Callable[..., str | None]  # shutil.which, or a stand-in in tests


def check_within_hard_limits(rlimits: Rlimits, grace_s: int) -> None:
    """`prlimit` runs as the task's user, who may only lower a hard limit: a limit above the
    executor's own would fail every task at its start."""
    wanted = (
        ("TIDEGATE_TASK_RLIMIT_CPU_S", resource.RLIMIT_CPU, _plus(rlimits.cpu_s, grace_s)),
        ("TIDEGATE_TASK_RLIMIT_AS_MB", resource.RLIMIT_AS, _mb(rlimits.as_mb)),
        ("TIDEGATE_TASK_RLIMIT_NOFILE", resource.RLIMIT_NOFILE, rlimits.nofile),
    )
    for var, which, value in wanted:
        if value is None:
            continue
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY and value > hard:
            raise ConfigError(
                f"{var}: {value} is above this executor's own hard limit ({hard}), which its "
                "tasks cannot raise; lower it, or raise the executor's (`ulimit -H`, systemd "
                "`LimitNOFILE=`…)"
            )


def _plus(value: int | None, extra: int) -> int | None:
    return None if value is None else value + extra


def _mb(value: int | None) -> int | None:
    return None if value is None else value * 1024 * 1024


def build_wrapper(
    rlimits: Rlimits,
    run_as: RunAs | None,
    *,
    grace_s: int,
    which: Which,
) -> Wrapper:
    """`setpriv` (found or not: without it, `subprocess` changes the user), then `prlimit`."""
    switch: list[str] = []
    limits: list[str] = []
    programs: list[str] = []
    setpriv = _find("setpriv", which) if run_as is not None else None
    if run_as is not None and setpriv is not None:
        groups = ",".join(map(str, run_as.groups))
        switch = [
            setpriv,
            f"--reuid={run_as.uid}",
            f"--regid={run_as.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--",
        ]
        programs.append("setpriv")
    elif run_as is not None:
        log.warning("no `setpriv` (util-linux) on PATH: tasks start more slowly as another user")
    if rlimits:
        prlimit = _find("prlimit", which)
        if prlimit is None:
            raise ConfigError(
                "TIDEGATE_TASK_RLIMIT_* need the `prlimit` program (util-linux), which is not on "
                "this host's PATH: install util-linux"
            )
        limits = [prlimit]
        if rlimits.cpu_s is not None:
            # The soft limit sends SIGXCPU (a task may catch it and stop cleanly); the hard
            # one, `grace_s` later, SIGKILL: as a timeout's TERM, then KILL.
            limits.append(f"--cpu={rlimits.cpu_s}:{rlimits.cpu_s + grace_s}")
        if rlimits.as_mb is not None:
            limits.append(f"--as={rlimits.as_mb * 1024 * 1024}")
        if rlimits.nofile is not None:
            limits.append(f"--nofile={rlimits.nofile}")
        limits.append("--")
        programs.append("prlimit")
    return Wrapper(switch=tuple(switch), limits=tuple(limits), programs=tuple(programs))


def _find(name: str, which: Which) -> str | None:
    found = which(name) or which(name, path="/usr/bin:/bin")
    return str(found) if found else None
