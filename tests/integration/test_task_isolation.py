"""A task sees only what it needs: filtered environment, an unprivileged user, resource limits,
private files. End to end: a driver and an executor as processes, tasks as real processes.

The suite runs as root here, so these executors run their tasks as `nobody` (the default of a
root executor: TIDEGATE_TASK_USER is left empty, unlike the rest of the suite's). Their data
directory is traversable by everyone, as a `tidegate up` data directory is, so that only each
file's own mode keeps a task out.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from harness import Cluster, wait_for
from psycopg.conninfo import conninfo_to_dict

from tidegate.client import TidegateClient
from tidegate.endpoints import endpoints_path, write_endpoints
from tidegate.wire import TaskSpec

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="only a root executor runs its tasks as another user"
)

Conn = psycopg.AsyncConnection[Any]
NOBODY = pwd.getpwnam("nobody")
ROOT_TASK_USER = {"TIDEGATE_TASK_USER": ""}  # empty: the default, `nobody` for a root executor


@pytest.fixture
def stack(nats_url: str, engine_db: str) -> Iterator[Cluster]:
    """A cluster whose data directory anyone may enter (mode 0755, like `up`'s)."""
    top = Path(tempfile.mkdtemp(prefix="tg-isolation-"))
    top.chmod(0o755)
    data = top / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    cluster = Cluster(nats_url=nats_url, database_url=engine_db, workdir=data)
    yield cluster
    cluster.stop_all()
    shutil.rmtree(top, ignore_errors=True)


async def finished(db: Conn, task_id: str, timeout: float = 30) -> dict[str, Any]:
    async def terminal() -> dict[str, Any] | None:
        cur = await db.execute(
            "SELECT state, exit_code, reason, log_tail FROM tasks WHERE task_id = %s", (task_id,)
        )
        row = await cur.fetchone()
        if row is None or row[0] not in ("succeeded", "failed", "timed_out", "cancelled", "lost"):
            return None
        return dict(zip(("state", "exit_code", "reason", "log_tail"), row, strict=True))

    found: dict[str, Any] = await wait_for(terminal, timeout=timeout, what=f"{task_id} to end")
    return found


async def run(cluster: Cluster, db: Conn, spec: TaskSpec) -> dict[str, Any]:
    async with await TidegateClient.connect(cluster.nats_url, "alpha") as tg:
        await tg.submit(spec)
    return await finished(db, f"alpha:{spec.key}")


async def test_a_task_running_env_shows_no_tidegate_variable_and_no_server_url(
    stack: Cluster, db: Conn
) -> None:
    stack.driver()
    # Even allowed by name, a variable holding the executor's database URL is not passed on.
    stack.executor(
        slots=2,
        DATABASE_URL=stack.database_url,
        TIDEGATE_TASK_ENV_ALLOW="PATH,HOME,USER,LOGNAME,LANG,DATABASE_URL",
        **ROOT_TASK_USER,
    )
    row = await run(stack, db, TaskSpec(key="env", argv=["env"], env={"MINE": "1"}))
    assert row["state"] == "succeeded", row
    lines = row["log_tail"].splitlines()
    names = {line.split("=", 1)[0] for line in lines}
    assert not [n for n in names if n.startswith("TIDEGATE_")], lines
    assert "DATABASE_URL" not in names
    password = urlsplit(stack.database_url).password
    assert password, "the suite's database asks for a password"
    for secret in (stack.nats_url, stack.database_url, password):
        assert secret not in row["log_tail"]
    assert "MINE=1" in lines and f"HOME={NOBODY.pw_dir}" in lines and "USER=nobody" in lines
    assert names <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "MINE"}, names


async def test_a_root_executor_runs_its_tasks_as_nobody(stack: Cluster, db: Conn) -> None:
    stack.driver()
    stack.executor(slots=2, **ROOT_TASK_USER)
    row = await run(stack, db, TaskSpec(key="id", shell="id -u; id -g; id -G"))
    assert row["state"] == "succeeded", row
    uid, gid, groups = row["log_tail"].splitlines()
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert "0" not in groups.split()  # not in root's group either


async def test_a_task_cannot_read_endpoints_json_nor_the_executors_environ(
    stack: Cluster, db: Conn
) -> None:
    data = stack.workdir
    # What `tidegate up` writes there, by the same function.
    write_endpoints(endpoints_path(data), {"nats_url": stack.nats_url, "database_url": "x"})
    assert stat.S_IMODE(endpoints_path(data).stat().st_mode) == 0o600
    (data / "public.txt").write_text("anyone may read this\n")
    (data / "public.txt").chmod(0o644)
    stack.driver()
    executor = stack.executor(slots=2, **ROOT_TASK_USER)

    # The directory itself is open to the task: only the file's mode refuses it.
    public = await run(stack, db, TaskSpec(key="public", argv=["cat", str(data / "public.txt")]))
    assert public["state"] == "succeeded" and "anyone may read this" in public["log_tail"]

    cat = TaskSpec(key="endpoints", argv=["cat", str(endpoints_path(data))])
    row = await run(stack, db, cat)
    assert row["state"] == "failed" and row["exit_code"] == 1, row
    assert "Permission denied" in row["log_tail"]
    assert stack.nats_url not in row["log_tail"]

    environ = TaskSpec(key="environ", argv=["cat", f"/proc/{executor.pid}/environ"])
    row = await run(stack, db, environ)
    assert row["state"] == "failed" and "Permission denied" in row["log_tail"], row
    assert "TIDEGATE_" not in row["log_tail"]


async def test_a_task_over_its_memory_limit_fails(stack: Cluster, db: Conn) -> None:
    stack.driver()
    stack.executor(slots=2, TIDEGATE_TASK_RLIMIT_AS_MB="256", **ROOT_TASK_USER)
    grab = "import sys; x = bytearray(int(sys.argv[1]) * 2**20); print('allocated', len(x))"
    small = TaskSpec(key="small", argv=["/usr/bin/python3", "-c", grab, "64"])
    large = TaskSpec(key="large", argv=["/usr/bin/python3", "-c", grab, "512"])
    row = await run(stack, db, small)
    assert row["state"] == "succeeded" and "allocated" in row["log_tail"], row
    row = await run(stack, db, large)
    assert row["state"] == "failed" and row["exit_code"] == 1, row
    assert "MemoryError" in row["log_tail"] and "allocated" not in row["log_tail"]


async def test_task_log_files_are_readable_by_their_owner_only(stack: Cluster, db: Conn) -> None:
    stack.driver()
    stack.executor(slots=2, **ROOT_TASK_USER)
    row = await run(stack, db, TaskSpec(key="talks", argv=["echo", "a private line"]))
    assert row["state"] == "succeeded", row
    logs = stack.workdir / "task-logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_text() == "a private line\n"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    for folder in (logs, files[0].parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    # Another task (another client's, say) cannot read it.
    peek = await run(stack, db, TaskSpec(key="peek", argv=["cat", str(files[0])]))
    assert peek["state"] == "failed" and "Permission denied" in peek["log_tail"], peek


async def test_a_task_cannot_reach_the_database_with_what_its_environment_holds(
    stack: Cluster, db: Conn
) -> None:
    """The task never gets the executor's database URL: not in its environment, so whatever
    it tries it has no password. Here it knows the server's address, as a task that scanned
    the host's ports would, and still cannot connect."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    stack.driver()
    stack.executor(slots=2, **ROOT_TASK_USER)
    params = conninfo_to_dict(stack.database_url)
    script = (
        'echo "url=[${TIDEGATE_DATABASE_URL}${DATABASE_URL}${PGPASSWORD}]"; '
        f"exec {psql} -w -h {params['host']} -p {params['port']} -U {params['user']} "
        f'-d {params["dbname"]} -c "select 1"'
    )
    row = await run(stack, db, TaskSpec(key="psql", shell=script))
    assert row["state"] == "failed", row
    assert "url=[]" in row["log_tail"]
    assert "password" in row["log_tail"]  # psql: "fe_sendauth: no password supplied"
    # The same command with the URL the executor has does connect: the password is what stops it.
    reach = await run(
        stack,
        db,
        TaskSpec(key="with-url", argv=[psql, "-w", stack.database_url, "-c", "select 1"]),
    )
    assert reach["state"] == "succeeded", reach
