"""A client's command policy on the real stack: a refused executable, cwd and shell each end
`rejected` with the reason in the database and in the callback while an allowed task runs;
`tidegate client set` changes take effect live; HTTP submissions are held to the same policy."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from harness import Cluster, cli, register, scrape, wait_for
from nats.aio.msg import Msg
from test_console_api import api, app, bearer, store, token_for  # noqa: F401  (fixtures)
from test_engine_outcomes import final, task_row

from tidegate import names
from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.store.store import Store
from tidegate.wire import ClientRecord, TaskSpec

Conn = psycopg.AsyncConnection[Any]

TRUE = shutil.which("true") or "/bin/true"
ECHO = shutil.which("echo") or "/bin/echo"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A directory the client may run in and one it may not (both exist)."""
    jobs, elsewhere = tmp_path / "jobs", tmp_path / "elsewhere"
    jobs.mkdir()
    elsewhere.mkdir()
    return jobs, elsewhere


@pytest.fixture
async def callbacks(nats_url: str) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """The `policed` client's NATS callbacks, by task id (the last state of each)."""
    got: dict[str, dict[str, Any]] = {}
    nc = await nats.connect(nats_url)

    async def answer(msg: Msg) -> None:
        body = json.loads(msg.data)
        for cb in body if isinstance(body, list) else [body]:
            got[cb["task_id"]] = cb
        await msg.respond(b"")

    await nc.subscribe(names.callback_subject("policed"), cb=answer)
    yield got
    await nc.close()


async def policed(cluster: Cluster, jobs: Path, **more: Any) -> None:
    await register(
        cluster.nats_url,
        cluster.database_url,
        ClientRecord(
            name="policed",
            callback_nats=True,
            allowed_executables=(TRUE,),
            allowed_cwds=(str(jobs),),
            allow_shell=False,
            **more,
        ),
    )


async def test_refused_executable_cwd_and_shell_end_rejected_with_the_reason(
    cluster: Cluster,
    db: Conn,
    dirs: tuple[Path, Path],
    callbacks: dict[str, dict[str, Any]],
) -> None:
    jobs, elsewhere = dirs
    await policed(cluster, jobs)
    port = free_port()
    cluster.driver("--metrics-port", str(port))
    cluster.executor(slots=4)
    async with await TidegateClient.connect(cluster.nats_url, "policed") as tg:
        await tg.submit(TaskSpec(key="exe", argv=[ECHO, "hi"], cwd=str(jobs)))
        await tg.submit(TaskSpec(key="cwd", argv=[TRUE], cwd=str(elsewhere)))
        await tg.submit(TaskSpec(key="shell", shell="true", cwd=str(jobs)))
        await tg.submit(TaskSpec(key="bare", argv=["true"], cwd=str(jobs)))
        await tg.submit(TaskSpec(key="ok", argv=[TRUE], cwd=str(jobs)))

    says = {
        "exe": f"executable {ECHO} is not allowed (allowed: {TRUE})",
        "cwd": f"cwd {elsewhere} is not allowed (allowed: {jobs})",
        "shell": "`shell` is not allowed",
        "bare": "executable true is not an absolute path",
    }
    for key, reason in says.items():
        row = await final(db, f"policed:{key}", "rejected")
        assert row["reason"].startswith("command policy of client policed: "), row
        assert reason in row["reason"], row
        assert row["attempt"] == 0 and row["executor"] is None  # never dispatched
    ok = await final(db, "policed:ok", "succeeded")
    assert ok["exit_code"] == 0

    async def all_called_back() -> bool:
        return {f"policed:{k}" for k in [*says, "ok"]} <= callbacks.keys()

    await wait_for(all_called_back, timeout=30, what="the callbacks of all five tasks")
    for key, reason in says.items():
        cb = callbacks[f"policed:{key}"]
        assert cb["state"] == "rejected" and reason in cb["reason"], cb
    assert callbacks["policed:ok"]["state"] == "succeeded"

    async def counted() -> float | None:
        n = metric_of(scrape(port), 'tidegate_tasks_rejected_total{reason="command_policy"}')
        return n if n >= len(says) else None

    assert await wait_for(counted, timeout=10, what="the rejections counted") == len(says)


def metric_of(text: str, sample: str) -> float:
    """The value of one labelled sample (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_client_set_changes_take_effect_live(
    cluster: Cluster, db: Conn, dirs: tuple[Path, Path]
) -> None:
    jobs, elsewhere = dirs
    await policed(cluster, jobs)
    cluster.driver()
    cluster.executor(slots=4)
    env = cluster.env()
    async with await TidegateClient.connect(cluster.nats_url, "policed") as tg:
        await tg.submit(TaskSpec(key="before", argv=[ECHO, "hi"], cwd=str(jobs)))
        await final(db, "policed:before", "rejected")

        changed = cli(
            env,
            *("client", "set", "policed", "--allow-executable", TRUE),
            *("--allow-executable", ECHO, "--allow-executable", "/bin/sh"),
            *("--any-cwd", "--shell"),
        )
        assert changed.returncode == 0, changed.stderr
        assert f"allowed_executables={TRUE},{ECHO},/bin/sh" in changed.stdout, changed.stdout
        assert "allowed_cwds=any" in changed.stdout and "allow_shell=True" in changed.stdout
        listed = cli(env, "client", "list")
        assert f"executables={TRUE},{ECHO},/bin/sh cwds=any shell=yes" in listed.stdout
        shown = json.loads(cli(env, "client", "list", "--json").stdout)
        mine = next(c for c in shown if c["name"] == "policed")
        assert mine["allowed_executables"] == [TRUE, ECHO, "/bin/sh"]
        assert mine["allowed_cwds"] is None and mine["allow_shell"] is True

        # The drivers follow the registry's mirror: poll until a submission is routed under
        # the new policy (each attempt a task of its own), then the rest must hold as well.
        tries = iter(range(1000))

        async def routed_now() -> str | None:
            key = f"echo-{next(tries)}"
            await tg.submit(TaskSpec(key=key, argv=[ECHO, "hi"], cwd=str(elsewhere)))
            row = await wait_for(
                lambda: task_row(db, f"policed:{key}"), timeout=30, what=f"{key} projected"
            )
            return key if row["state"] != "rejected" else None

        key = await wait_for(routed_now, timeout=20, what="the new policy to reach the driver")
        row = await final(db, f"policed:{key}", "succeeded")
        assert "hi" in row["log_tail"]
        # A shell command runs /bin/sh: allowed now that the list names it.
        await tg.submit(TaskSpec(key="shell-now", shell="echo from-shell"))
        assert "from-shell" in (await final(db, "policed:shell-now", "succeeded"))["log_tail"]

        # And back: shell refused again, live.
        assert cli(env, "client", "set", "policed", "--no-shell").returncode == 0

        async def refused_now() -> str | None:
            key = f"sh-{next(tries)}"
            await tg.submit(TaskSpec(key=key, shell="true"))
            row = await wait_for(
                lambda: task_row(db, f"policed:{key}"), timeout=30, what=f"{key} projected"
            )
            return str(row["reason"]) if row["state"] == "rejected" else None

        reason = await wait_for(refused_now, timeout=20, what="--no-shell to reach the driver")
        assert "`shell` is not allowed" in reason and "--shell" in reason

    bad = cli(env, "client", "set", "policed", "--allow-executable", "python3")
    assert bad.returncode == 2 and "not an absolute path" in bad.stderr, bad.stderr
    both = cli(env, "client", "set", "policed", "--allow-cwd", "/srv", "--any-cwd")
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr


async def test_an_http_submission_is_held_to_the_same_policy(
    cluster: Cluster,
    db: Conn,
    dirs: tuple[Path, Path],
    api: Any,  # noqa: F811
    store: Store,  # noqa: F811
) -> None:
    jobs, _ = dirs
    await policed(cluster, jobs)
    cluster.driver()
    cluster.executor(slots=2)
    token = await token_for(store, "policed-bot", "client", "policed")
    refused = {"key": "http-exe", "argv": ["/bin/rm", "-rf", str(jobs)], "cwd": str(jobs)}
    answer = await api.post("/api/v1/tasks", json=refused, headers=bearer(token))
    assert answer.status_code == 201, answer.text  # accepted: the route step decides
    allowed = {"key": "http-ok", "argv": [TRUE], "cwd": str(jobs)}
    assert (await api.post("/api/v1/tasks", json=allowed, headers=bearer(token))).status_code == 201
    row = await final(db, "policed:http-exe", "rejected")
    assert "executable /bin/rm is not allowed" in row["reason"], row
    await final(db, "policed:http-ok", "succeeded")
    assert jobs.is_dir()
