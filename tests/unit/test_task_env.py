"""executor.taskenv: what a task gets from its executor (environment, user, limits)."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidegate.config import Connection, ExecutorSettings, Settings
from tidegate.errors import ConfigError
from tidegate.executor.process import ProcessLimits, run_process
from tidegate.executor.taskenv import (
    DEFAULT_ENV_ALLOW,
    TaskLaunch,
    allowed,
    connection_secrets,
    cwd_refusal,
    parse_allow_list,
    refusal,
    resolve_run_as,
    task_base_env,
)
from tidegate.executor.taskwrap import (
    Rlimits,
    RunAs,
    Wrapper,
    build_wrapper,
    check_within_hard_limits,
)
from tidegate.wire import TaskSpec

NATS_URL = "nats://exec:s3cret-nats-pw@10.0.0.5:4222"
DB_URL = "postgresql://tidegate:s3cret-db-password@db:5432/tidegate"
EXECUTOR_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LANG": "C.UTF-8",
    "LC_TIME": "en_GB.UTF-8",
    "TERM": "xterm",
    "TIDEGATE_NATS_URL": NATS_URL,
    "TIDEGATE_DATABASE_URL": DB_URL,
    "TIDEGATE_DATA_DIR": "/var/lib/tidegate",
    "AWS_SECRET_ACCESS_KEY": "aws-key",
    "SSH_AUTH_SOCK": "/tmp/ssh-agent",
    "PYTHONPATH": "/opt/hooks",
    "LD_PRELOAD": "/opt/hook.so",
}
NOBODY = RunAs(name="nobody", uid=65534, gid=65534, groups=(65534,), home="/nonexistent")


def which_everything(name: str, path: str | None = None) -> str:
    return f"/usr/bin/{name}"


# --- the allow-list ------------------------------------------------------------------------------


def test_an_empty_allow_list_is_the_default_one() -> None:
    assert parse_allow_list("") == DEFAULT_ENV_ALLOW
    assert parse_allow_list("  ") == DEFAULT_ENV_ALLOW


def test_an_allow_list_is_names_and_prefixes_separated_by_commas() -> None:
    assert parse_allow_list(" PATH, HTTP_PROXY ,LC_*,,") == ("PATH", "HTTP_PROXY", "LC_*")


@pytest.mark.parametrize("text", ["PATH,BAD-NAME", "1ABC", "*", "A*B", "PATH=1"])
def test_a_malformed_name_in_the_allow_list_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="TIDEGATE_TASK_ENV_ALLOW"):
        parse_allow_list(text)


@pytest.mark.parametrize("text", ["TIDEGATE_NATS_URL", "PATH,TIDEGATE_*", "TIDE*", "T*"])
def test_an_allow_list_naming_the_engines_variables_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="never see them"):
        parse_allow_list(text)


def test_a_prefix_allows_every_name_that_starts_with_it() -> None:
    allow = ("PATH", "LC_*")
    assert allowed("LC_TIME", allow) and allowed("LC_", allow) and allowed("PATH", allow)
    assert not allowed("PATHS", allow) and not allowed("LANG", allow)


def test_a_tidegate_name_is_never_allowed_whatever_the_list() -> None:
    assert not allowed("TIDEGATE_NATS_URL", ("TIDEGATE_NATS_URL", "TIDEGATE_*", "T*"))


# --- the base environment ------------------------------------------------------------------------


def test_the_default_base_environment_keeps_only_the_allowed_names() -> None:
    base, dropped = task_base_env(EXECUTOR_ENV, DEFAULT_ENV_ALLOW)
    assert base == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "USER": "root",
        "LANG": "C.UTF-8",
        "LC_TIME": "en_GB.UTF-8",
        "TERM": "xterm",
    }
    assert dropped == []


def test_an_allowed_variable_holding_a_server_url_or_its_password_is_left_out() -> None:
    environ = {
        **EXECUTOR_ENV,
        "DATABASE_URL": DB_URL,
        "PGPASSWORD": "s3cret-db-password",
        "NATS": f"{NATS_URL},nats://10.0.0.6:4222",
        "HARMLESS": "tidegate",
    }
    allow = ("PATH", "DATABASE_URL", "PGPASSWORD", "NATS", "HARMLESS")
    base, dropped = task_base_env(environ, allow, secrets=connection_secrets(NATS_URL, DB_URL))
    assert base == {"PATH": "/usr/bin:/bin", "HARMLESS": "tidegate"}
    assert dropped == ["DATABASE_URL", "NATS", "PGPASSWORD"]


def test_a_task_user_brings_its_own_home_and_name() -> None:
    base, _ = task_base_env(EXECUTOR_ENV, DEFAULT_ENV_ALLOW, run_as=NOBODY)
    assert (base["HOME"], base["USER"], base["LOGNAME"]) == ("/nonexistent", "nobody", "nobody")
    # Only the names the list allows: a pool that withholds HOME gets none.
    base, _ = task_base_env(EXECUTOR_ENV, ("PATH", "USER"), run_as=NOBODY)
    assert base == {"PATH": "/usr/bin:/bin", "USER": "nobody"}


def test_the_secrets_are_each_url_and_the_passwords_in_them() -> None:
    secrets = connection_secrets(
        "nats://a:long-enough-pw@h1:4222,nats://h2:4222",
        "host=db user=tg password='conninfo-password' dbname=tg",
    )
    assert "long-enough-pw" in secrets and "conninfo-password" in secrets
    # A short password would match inside unrelated values; the whole URL still counts.
    assert connection_secrets("postgresql://u:pw@db/x") == ("postgresql://u:pw@db/x",)
    assert connection_secrets("", "") == ()


def test_launch_from_settings_never_passes_tidegate_variables_or_the_urls() -> None:
    settings = Settings(
        connection=Connection(nats_url=NATS_URL, database_url=DB_URL),
        executor=ExecutorSettings(
            task_user=pwd.getpwuid(os.geteuid()).pw_name,
            task_env_allow="PATH,DATABASE_URL,LC_*",
        ),
    )
    launch = TaskLaunch.from_settings(settings, {**EXECUTOR_ENV, "DATABASE_URL": DB_URL})
    assert launch.base_env == {"PATH": "/usr/bin:/bin", "LC_TIME": "en_GB.UTF-8"}
    assert launch.run_as is None and launch.wrapper == Wrapper()
    assert "as the executor's own user" in launch.describe()


# --- a task's own env ----------------------------------------------------------------------------


def test_a_task_env_setting_a_tidegate_name_is_refused_with_the_names() -> None:
    assert refusal({"A": "1", "PATH": "/bin"}) is None
    reason = refusal({"TIDEGATE_NATS_URL": "x", "A": "1", "TIDEGATE_B": "y"})
    assert reason is not None
    assert "TIDEGATE_B, TIDEGATE_NATS_URL" in reason and "reserved for the engine" in reason


# --- the task user -------------------------------------------------------------------------------


def test_a_root_executor_runs_tasks_as_nobody_by_default() -> None:
    run_as = resolve_run_as("", euid=0)
    nobody = pwd.getpwnam("nobody")
    assert run_as is not None
    assert (run_as.name, run_as.uid, run_as.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert run_as.home == nobody.pw_dir
    # Its own groups only: never the executor's (root's group would open root's files).
    assert set(run_as.groups) == set(os.getgrouplist("nobody", nobody.pw_gid))
    assert resolve_run_as(str(nobody.pw_uid), euid=0) == run_as


def test_a_root_executor_may_keep_tasks_as_root_when_told() -> None:
    assert resolve_run_as("root", euid=0) is None


def test_a_non_root_executor_runs_tasks_as_itself() -> None:
    me = pwd.getpwnam("nobody")
    assert resolve_run_as("", euid=me.pw_uid) is None
    assert resolve_run_as("nobody", euid=me.pw_uid) is None


def test_a_non_root_executor_told_to_use_another_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not root"):
        resolve_run_as("root", euid=pwd.getpwnam("nobody").pw_uid)


def test_an_unknown_task_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no such user"):
        resolve_run_as("no-such-user-here", euid=0)


# --- limits and the wrapper ----------------------------------------------------------------------


def test_nothing_configured_puts_nothing_in_front_of_a_task() -> None:
    assert build_wrapper(Rlimits(), None, grace_s=5, which=which_everything) == Wrapper()


def test_user_and_limits_become_setpriv_then_prlimit() -> None:
    wrapper = build_wrapper(
        Rlimits(cpu_s=60, as_mb=256, nofile=100), NOBODY, grace_s=5, which=which_everything
    )
    switch = ("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--groups=65534", "--")
    limits = ("/usr/bin/prlimit", "--cpu=60:65", f"--as={256 * 1024 * 1024}", "--nofile=100", "--")
    assert (wrapper.switch, wrapper.limits) == (switch, limits)
    assert wrapper.programs == ("setpriv", "prlimit")
    # A task whose env a setuid program could be given: setpriv (it runs as root).
    assert wrapper.for_task(NOBODY, {}) == (switch + limits, {})
    assert wrapper.for_task(NOBODY, {"A": "1", "PATH": "/opt/bin", "LANG": "C"}) == (
        switch + limits,
        {},
    )
    # One naming what reaches into a root process's code: subprocess changes the user first.
    args = {"user": 65534, "group": 65534, "extra_groups": [65534]}
    for unsafe in ("LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH", "MALLOC_ARENA_MAX", "TMPDIR"):
        assert wrapper.for_task(NOBODY, {"A": "1", unsafe: "x"}) == (limits, args), unsafe
    assert wrapper.for_task(NOBODY, {"ULPATH_DEBUG": "all"}) == (limits, args)
    # As the executor's own user: the limits only.
    assert wrapper.for_task(None, {"LD_PRELOAD": "x"}) == (limits, {})


def test_without_setpriv_subprocess_changes_the_user() -> None:
    def no_setpriv(name: str, path: str | None = None) -> str | None:
        return None if name == "setpriv" else f"/usr/bin/{name}"

    wrapper = build_wrapper(Rlimits(), NOBODY, grace_s=5, which=no_setpriv)
    assert wrapper.switch == () and wrapper.limits == ()
    assert wrapper.for_task(NOBODY, {}) == ((), NOBODY.popen_args)


def test_a_missing_prlimit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="prlimit"):
        build_wrapper(Rlimits(nofile=10), None, grace_s=5, which=lambda *a, **k: None)


def test_a_wrappers_own_start_error_reads_as_a_start_error() -> None:
    wrapper = Wrapper(switch=("/usr/bin/setpriv", "--"), programs=("setpriv",))
    line = "setpriv: failed to execute nope: No such file or directory"
    assert wrapper.launch_error(127, line) == (
        "cannot start: failed to execute nope: No such file or directory"
    )
    assert wrapper.launch_error(127, "sh: 1: nope: not found") is None
    assert wrapper.launch_error(2, line) is None
    assert Wrapper().launch_error(127, line) is None


def test_limits_above_the_executors_hard_limit_are_a_config_error() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    with pytest.raises(ConfigError, match="TIDEGATE_TASK_RLIMIT_NOFILE"):
        check_within_hard_limits(Rlimits(nofile=hard + 1), grace_s=5)
    check_within_hard_limits(Rlimits(nofile=hard), grace_s=5)


# --- with real processes -------------------------------------------------------------------------

LIMITS = ProcessLimits(kill_grace_s=0.3)
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root starts tasks as another user")


def _wrapper(rlimits: Rlimits | None = None, run_as: RunAs | None = None) -> Wrapper:
    return build_wrapper(rlimits or Rlimits(), run_as, grace_s=1, which=shutil.which)


async def test_a_task_with_a_tidegate_variable_in_its_env_fails_without_starting() -> None:
    task = TaskSpec(key="k", argv=["/bin/true"], env={"TIDEGATE_DATABASE_URL": "x"})
    result = await run_process(task, limits=LIMITS, base_env={}, log_path=None)
    assert result.outcome == "failed" and result.exit_code is None
    assert "TIDEGATE_DATABASE_URL" in result.reason and "reserved" in result.reason


async def test_a_task_sees_the_base_environment_and_its_own_env_only() -> None:
    task = TaskSpec(key="k", argv=["/usr/bin/env"], env={"MINE": "1"})
    result = await run_process(task, limits=LIMITS, base_env={"PATH": "/bin"}, log_path=None)
    assert sorted(result.log_tail.split()) == ["MINE=1", "PATH=/bin"]


@ROOT_ONLY
@pytest.mark.parametrize(
    "own_env", [{"MINE": "1"}, {"LD_LIBRARY_PATH": "/nowhere"}], ids=["setpriv", "subprocess"]
)
async def test_a_task_runs_as_the_task_user_with_its_groups(own_env: dict[str, str]) -> None:
    run_as = resolve_run_as("nobody", euid=0)
    task = TaskSpec(key="k", argv=["/usr/bin/id"], env=own_env)
    wrapper = _wrapper(Rlimits(nofile=256), run_as=run_as)
    result = await run_process(
        task, limits=LIMITS, base_env={}, log_path=None, wrapper=wrapper, run_as=run_as
    )
    assert result.outcome == "succeeded", result
    nobody = pwd.getpwnam("nobody")
    assert f"uid={nobody.pw_uid}(" in result.log_tail and f"gid={nobody.pw_gid}(" in result.log_tail
    assert "(root)" not in result.log_tail


@ROOT_ONLY
async def test_a_missing_program_behind_setpriv_is_a_start_failure() -> None:
    run_as = resolve_run_as("nobody", euid=0)
    task = TaskSpec(key="k", argv=["no-such-program-here"])
    wrapper = _wrapper(run_as=run_as)
    result = await run_process(
        task,
        limits=LIMITS,
        base_env={"PATH": "/bin"},
        log_path=None,
        wrapper=wrapper,
        run_as=run_as,
    )
    assert result.outcome == "failed"
    assert result.reason == (
        "cannot start: failed to execute no-such-program-here: No such file or directory"
    )


@ROOT_ONLY
async def test_a_tasks_own_env_never_reaches_a_process_running_as_root() -> None:
    """The dynamic loader reads LD_PRELOAD in every program it starts: were the task's env
    given to `setpriv` (root), its warning would appear once more, for setpriv."""
    run_as = resolve_run_as("nobody", euid=0)
    task = TaskSpec(key="k", argv=["/usr/bin/id", "-u"], env={"LD_PRELOAD": "/no/such/lib.so"})
    wrapper = _wrapper(Rlimits(nofile=256), run_as=run_as)
    result = await run_process(
        task, limits=LIMITS, base_env={}, log_path=None, wrapper=wrapper, run_as=run_as
    )
    assert result.outcome == "succeeded", result
    lines = result.log_tail.splitlines()
    # Once for prlimit and once for id, both running as nobody; never for a root process.
    assert sum("/no/such/lib.so" in line for line in lines) == 2, lines
    assert lines[-1] == str(pwd.getpwnam("nobody").pw_uid)


async def test_a_task_over_its_memory_limit_fails() -> None:
    grab = "x = bytearray(512 * 1024 * 1024); print('allocated')"
    task = TaskSpec(key="k", argv=["/usr/bin/python3", "-c", grab])
    wrapper = _wrapper(Rlimits(as_mb=256))
    result = await run_process(task, limits=LIMITS, base_env={}, log_path=None, wrapper=wrapper)
    assert result.outcome == "failed", result
    assert "MemoryError" in result.log_tail and "allocated" not in result.log_tail


async def test_a_task_over_its_cpu_limit_is_killed_with_sigxcpu() -> None:
    task = TaskSpec(key="k", argv=["/bin/sh", "-c", "while :; do :; done"], timeout_s=30)
    wrapper = _wrapper(Rlimits(cpu_s=1))
    result = await run_process(task, limits=LIMITS, base_env={}, log_path=None, wrapper=wrapper)
    assert result.outcome == "failed"
    assert result.reason == "killed by signal SIGXCPU: over its CPU time limit"


async def test_a_task_limited_in_open_files_sees_that_limit() -> None:
    task = TaskSpec(key="k", argv=["/bin/sh", "-c", "ulimit -n"])
    wrapper = _wrapper(Rlimits(nofile=64))
    result = await run_process(task, limits=LIMITS, base_env={}, log_path=None, wrapper=wrapper)
    assert result.outcome == "succeeded" and result.log_tail.strip() == "64"


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory everyone may enter (the suite's own are private to its user)."""
    top = Path(tempfile.mkdtemp(prefix="tg-taskenv-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_cwd_the_task_user_cannot_enter_is_refused(open_tmp: Path) -> None:
    open_dir = open_tmp / "open"
    closed = open_dir / "closed"
    inside = closed / "inside"
    inside.mkdir(parents=True)
    for folder in (open_dir, inside):
        folder.chmod(0o755)
    closed.chmod(0o700)
    owner = pwd.getpwuid(os.geteuid())
    other = RunAs(
        name="other", uid=owner.pw_uid + 12345, gid=owner.pw_gid + 12345, groups=(), home="/"
    )
    assert cwd_refusal(str(open_dir), other) is None
    assert cwd_refusal(str(inside), other) == (
        f"cannot enter cwd {inside}: Permission denied (tasks run as other)"
    )
    # Through a symbolic link, the directory it leads to counts.
    link = open_dir / "link"
    link.symlink_to(inside)
    assert cwd_refusal(str(link), other) is not None
    # Its owner may, whatever the others' bits say; a missing directory is the start's to report.
    same = RunAs(name="me", uid=owner.pw_uid, gid=owner.pw_gid, groups=(), home="/")
    assert cwd_refusal(str(inside), same) is None
    assert cwd_refusal(str(open_dir / "missing"), other) is None


@ROOT_ONLY
async def test_a_task_as_nobody_cannot_work_in_a_directory_nobody_cannot_enter(
    tmp_path: Path,
) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    run_as = resolve_run_as("nobody", euid=0)
    task = TaskSpec(key="k", argv=["/bin/ls"], cwd=str(closed))
    result = await run_process(
        task,
        limits=LIMITS,
        base_env={},
        log_path=None,
        wrapper=_wrapper(run_as=run_as),
        run_as=run_as,
    )
    assert result.outcome == "failed" and result.exit_code is None
    assert result.reason == f"cannot enter cwd {closed}: Permission denied (tasks run as nobody)"
