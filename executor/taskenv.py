"""What a task's process gets from its executor: environment, user and resource limits.

Decided once, when the executor starts (`TaskLaunch.from_settings`), never per task. A task
sees an allow-list of the executor's variables plus its own `env`; never the engine's
`TIDEGATE_*` variables or the executor's server URLs, whatever the allow-list says. An executor
that runs as root runs its tasks as an unprivileged user (`nobody` unless `TIDEGATE_TASK_USER`
names another); one that does not cannot change user, so its tasks run as itself.

How the user changes. `subprocess`'s `user=`/`group=`/`extra_groups=` make the child a full
`fork()` of the executor instead of a `vfork()`: it costs the executor about 2.5 times the CPU
per task, and halves a flood's tasks per second. So tasks start through `setpriv` (util-linux)
instead, which changes the user after a `vfork()`. `setpriv` runs as root, and a root process
must not read what a client wrote where it reaches into the process's code: `LD_PRELOAD` or
`GCONV_PATH` in a task's `env` would run the client's code as root. A task whose `env` names
any such variable (those glibc itself removes for a setuid program: `taskwrap.safe_for_root`)
starts through `subprocess`, whose user change comes before any program runs. Limits are set by
`prlimit` (util-linux) after the user change, never by a `preexec_fn` (Python code in the
forked child: slow, and unsafe with threads). With no user change and no limit, nothing is put
in front of a task: no per-task cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import pwd
import re
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from tidegate.config import Settings
from tidegate.errors import ConfigError
from tidegate.executor.taskwrap import (
    NO_WRAPPER,
    Rlimits,
    RunAs,
    Wrapper,
    build_wrapper,
    check_within_hard_limits,
)

log = logging.getLogger(__name__)

RESERVED_PREFIX: Final = "TIDEGATE_"

# What a task gets from the executor's environment unless the pool's executors say otherwise
# (TIDEGATE_TASK_ENV_ALLOW). Enough for ordinary programs to behave as they do in a login shell:
#  - PATH, so `argv[0]` without a slash is found as an operator would find it;
#  - HOME, USER, LOGNAME: who the program runs as (set from the task user's passwd entry when
#    tasks run as another user, not copied from the executor's);
#  - LANG, LANGUAGE, LC_*: the locale, so text output is encoded as the host's programs expect;
#  - TZ: local times as on the host; TMPDIR: where temporary files go;
#  - SHELL, TERM: programs that start a shell or format output read them.
# Everything else stays out: other services' credentials (cloud keys, SSH_AUTH_SOCK, proxies with
# passwords), loader and interpreter hooks (LD_*, PYTHONPATH) and the engine's own settings.
# A pool whose tasks need more names them; a task needing a value passes it in its own `env`.
DEFAULT_ENV_ALLOW: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "SHELL",
    "TERM",
)

DEFAULT_ROOT_TASK_USER: Final = "nobody"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PASSWORD_IN_CONNINFO = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
# A password this short would match inside unrelated values; the whole URL is checked anyway.
_SHORTEST_SECRET = 8


@dataclass(frozen=True, kw_only=True)
class TaskLaunch:
    """How every task of this executor is started."""

    base_env: Mapping[str, str]
    run_as: RunAs | None = None
    rlimits: Rlimits = field(default_factory=Rlimits)
    wrapper: Wrapper = NO_WRAPPER

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> TaskLaunch:
        """Raises ConfigError for a setting this executor cannot honour."""
        ex = settings.executor
        environ = os.environ if environ is None else environ
        allow = parse_allow_list(ex.task_env_allow)
        run_as = resolve_run_as(ex.task_user, euid=os.geteuid())
        rlimits = Rlimits(
            cpu_s=ex.task_rlimit_cpu_s, as_mb=ex.task_rlimit_as_mb, nofile=ex.task_rlimit_nofile
        )
        secrets = connection_secrets(settings.connection.nats_url, settings.connection.database_url)
        base, dropped = task_base_env(environ, allow, run_as=run_as, secrets=secrets)
        for name in dropped:
            log.warning("%s is allowed for tasks but holds an engine credential: not passed", name)
        grace_s = math.ceil(ex.kill_grace_s) or 1
        if rlimits:
            check_within_hard_limits(rlimits, grace_s)
        wrapper = build_wrapper(rlimits, run_as, grace_s=grace_s, which=shutil.which)
        return cls(base_env=base, run_as=run_as, rlimits=rlimits, wrapper=wrapper)

    def describe(self) -> str:
        user = self.run_as.name if self.run_as is not None else "the executor's own user"
        seen = ", ".join(sorted(self.base_env)) or "no variable"
        limits = ", ".join(f"{k} {v}" for k, v in vars(self.rlimits).items() if v is not None)
        return f"tasks run as {user}; see {seen}; limits: {limits or 'inherited'}"


def parse_allow_list(text: str) -> tuple[str, ...]:
    """`TIDEGATE_TASK_ENV_ALLOW`: comma-separated names, `PREFIX*` for every name so starting;
    empty means `DEFAULT_ENV_ALLOW`."""
    if not text.strip():
        return DEFAULT_ENV_ALLOW
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if not _NAME.fullmatch(name.removesuffix("*")):
            raise ConfigError(
                f"TIDEGATE_TASK_ENV_ALLOW: {name!r} is not a variable name (or NAME_PREFIX*)"
            )
        if name.startswith(RESERVED_PREFIX) or RESERVED_PREFIX.startswith(name.removesuffix("*")):
            raise ConfigError(
                f"TIDEGATE_TASK_ENV_ALLOW: {name!r} would pass the engine's own TIDEGATE_* "
                "settings to tasks, which never see them: remove it"
            )
        names.append(name)
    return tuple(names)


def allowed(name: str, allow: Sequence[str]) -> bool:
    if name.startswith(RESERVED_PREFIX):
        return False
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in allow)


def connection_secrets(*urls: str) -> tuple[str, ...]:
    """The values no task may see: each server URL whole (they may hold credentials), and a
    password inside one."""
    found: list[str] = []
    for url in urls:
        if not url:
            continue
        found.append(url)
        for part in url.split(","):  # a NATS URL may list several servers
            try:
                password = urlsplit(part.strip()).password
            except ValueError:
                password = None
            if password is None and (m := _PASSWORD_IN_CONNINFO.search(part)):
                password = m.group(1).strip("'")
            if password and len(password) >= _SHORTEST_SECRET:
                found.append(password)
    return tuple(found)


def task_base_env(
    environ: Mapping[str, str],
    allow: Sequence[str],
    *,
    run_as: RunAs | None = None,
    secrets: Sequence[str] = (),
) -> tuple[dict[str, str], list[str]]:
    """The allowed part of `environ`, without any value holding a secret; and the names left out
    for that reason (an operator's allow-list mistake worth a warning)."""
    base: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in environ.items():
        if not allowed(name, allow):
            continue
        if any(secret in value for secret in secrets):
            dropped.append(name)
            continue
        base[name] = value
    if run_as is not None:
        # Who the task is, not who the executor is.
        for name, value in (("HOME", run_as.home), ("USER", run_as.name), ("LOGNAME", run_as.name)):
            if allowed(name, allow):
                base[name] = value
    return base, sorted(dropped)


def reserved_names(env: Mapping[str, str]) -> list[str]:
    """A task's own `env` names the engine keeps for itself (the task is refused for them)."""
    return sorted(name for name in env if name.startswith(RESERVED_PREFIX))


def refusal(env: Mapping[str, str]) -> str | None:
    reserved = reserved_names(env)
    if not reserved:
        return None
    return (
        f"cannot start: the task's env sets {', '.join(reserved)}; names starting with "
        f"{RESERVED_PREFIX} are reserved for the engine: rename them"
    )


def cwd_refusal(cwd: str, run_as: RunAs) -> str | None:
    """Why the task user may not work in `cwd`, or None.

    `subprocess` enters a task's cwd before `setpriv` changes the user, with the executor's
    rights: without this check a task could work inside a directory its user cannot enter, and
    read what is readable there. Checked as the kernel would for the user (mode bits, on every
    directory of the path as given and as resolved; ACLs are not read). A path that does not
    exist is left to the start to report, as for any task."""
    given = os.path.abspath(cwd)
    for path in dict.fromkeys((given, os.path.realpath(given))):
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts) + 1):
            prefix = "/" + "/".join(parts[:depth])
            try:
                info = os.stat(prefix)
            except OSError:
                return None
            if not _may_search(info, run_as):
                return f"cannot enter cwd {cwd}: Permission denied (tasks run as {run_as.name})"
    return None


def _may_search(info: os.stat_result, run_as: RunAs) -> bool:
    if info.st_uid == run_as.uid:
        bit = stat.S_IXUSR
    elif info.st_gid == run_as.gid or info.st_gid in run_as.groups:
        bit = stat.S_IXGRP
    else:
        bit = stat.S_IXOTH
    return bool(info.st_mode & bit)


def resolve_run_as(requested: str, *, euid: int) -> RunAs | None:
    """The user tasks run as; None for the executor's own user (nothing to change)."""
    name = requested.strip() or (DEFAULT_ROOT_TASK_USER if euid == 0 else "")
    if not name:
        return None
    entry = _lookup(name)
    if entry.pw_uid == euid:
        return None
    if euid != 0:
        raise ConfigError(
            f"TIDEGATE_TASK_USER={requested}: this executor runs as uid {euid}, not root, and "
            "cannot start processes as another user; run the executor as root (its tasks then "
            "run as TIDEGATE_TASK_USER), or leave TIDEGATE_TASK_USER unset to run them as itself"
        )
    if entry.pw_uid == 0:
        return None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return RunAs(
        name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir
    )


def _lookup(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"TIDEGATE_TASK_USER={name}: no such user on this host; create it or name another"
        ) from None


def keep_environ_private() -> None:
    """Make this process non-dumpable (Linux): tasks that run as the executor's own user can
    then no longer read its /proc/<pid>/environ or memory, where its credentials are. Only a
    process allowed to trace any process (root, CAP_SYS_PTRACE) still can. A task is not
    affected: executing a program makes a process dumpable again."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        pr_set_dumpable = 4
        if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
            log.warning("could not make the executor non-dumpable: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # not Linux
        return
