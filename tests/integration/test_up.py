"""`tidegate up` as an operator runs it: real processes, embedded servers, signals, kill -9.

Every process `up` starts names the data directory on its command line (nats-server `-sd`,
postgres `-D`, components `--data-dir`), so "nothing left behind" is checked by looking for
processes whose command line points into the test's data directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from upharness import (
    STOP_S,
    TASK_S,
    Up,
    console_login,
    describe,
    new_up,
    processes_of,
    up_env,
)

from tidegate.embedded.children import process_alive
from tidegate.embedded.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_up_runs_a_task_and_stops_cleanly_on_ctrl_c(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = new_up(ups, tmp_path, data).start()
    endpoints = up.wait_endpoints()
    # With the operator's own NATS credentials: the commands beside `up` connect as it.
    assert re.fullmatch(r"nats://operator:[\w-]+@127\.0\.0\.1:\d+", endpoints["nats_url"])
    assert endpoints["database_url"].startswith("postgresql://")
    assert endpoints["console_url"] == f"http://127.0.0.1:{up.console_port}"
    assert endpoints["data_dir"] == str(data)

    record = up.submit_and_wait("echo", "hi")
    assert record["exit_code"] == 0
    assert "hi" in (record["log_tail"] or "")

    health = httpx.get(f"{endpoints['console_url']}/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "nats": True, "database": True}
    # The console needs a login: the one `up` made for its first operator.
    operator = endpoints["operator"]
    assert operator["username"] == "admin" and len(operator["password"]) >= 20
    assert operator["password"] in up.out.read_text()  # the banner shows it
    with httpx.Client(base_url=endpoints["console_url"], timeout=10) as console:
        first = console.get("/", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/login"
        console_login(console, operator["username"], operator["password"])
        page = console.get("/")
        assert page.status_code == 200
        assert "admin" in page.text and "Log out" in page.text
        assert console.get("/api/session").json() == {"username": "admin", "role": "operator"}

    assert up.interrupt() == 0
    assert not (data / "endpoints.json").exists()
    left = processes_of(data)
    assert not left, "processes left behind:\n" + describe(left)


def test_a_component_that_dies_is_restarted(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = new_up(ups, tmp_path, data).start()
    endpoints = up.wait_endpoints()
    banner = up.out.read_text()
    assert endpoints["console_url"] in banner
    assert "operator login" in banner
    assert endpoints["nats_url"] in banner
    console = httpx.Client(base_url=endpoints["console_url"], timeout=10)
    console_login(console, **endpoints["operator"])

    old = endpoints["pids"]["console"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        pids = json.loads((data / "endpoints.json").read_text())["pids"]
        if pids["console"] != old:
            break
        assert time.monotonic() < deadline, "the console was not restarted\n" + up.diagnostics()
        time.sleep(0.2)
    assert f"console (pid {old}) DIED" in up.out.read_text()
    deadline = time.monotonic() + 60  # a new Python process on a busy machine
    while True:
        try:
            if httpx.get(endpoints["console_url"] + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the restarted console does not answer"
        time.sleep(0.2)
    # Sessions are kept in NATS too: the login made before the crash still works.
    me = console.get("/api/session")
    console.close()
    assert me.json() == {"username": "admin", "role": "operator"}
    assert up.interrupt() == 0
    left = processes_of(data)
    assert not left, "processes left behind:\n" + describe(left)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_with_a_running_task_leaves_nothing(
    ups: list[Up], tmp_path: Path
) -> None:
    """A terminal's Ctrl-C signals the whole process group: `up` and nats-server alike."""
    data = tmp_path / "data"
    up = new_up(ups, tmp_path, data)
    up.new_session = True
    up.start()
    up.wait_endpoints()
    marker = ["sleep", "61.25"]  # a command line no other process has
    done = up.tidegate("submit", "--client", "demo", "--timeout", "120", "--", *marker)
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.split()[0]
    deadline = time.monotonic() + TASK_S
    while "running" not in up.tidegate("task", "show", task_id).stdout:
        assert time.monotonic() < deadline, f"{task_id} never ran\n{up.diagnostics()}"
        time.sleep(0.3)

    assert up.proc is not None
    started = time.monotonic()
    os.killpg(up.proc.pid, signal.SIGINT)
    assert up.proc.wait(STOP_S) == 0
    assert time.monotonic() - started < 20, "waited for drains that could not hand off"
    left = processes_of(data) + [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == marker
    ]
    assert not left, "processes left behind:\n" + describe(left)


@pytest.mark.slow
def test_up_after_kill_9_cleans_up_the_old_run(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = new_up(ups, tmp_path, data).start()
    first_endpoints = first.wait_endpoints()
    old = first_endpoints["pids"]
    assert {"nats-server", "postgres", "driver", "exec-0", "console"} <= old.keys()
    first.kill()  # kill -9: no cleanup of its own

    # The same console port: the old console must be gone before the new one binds it.
    second = new_up(ups, tmp_path, data, port=first.console_port).start()
    endpoints = second.wait_endpoints()
    assert second.proc is not None and endpoints["pids"]["up"] == second.proc.pid
    for name in ("nats-server", "postgres", "driver", "exec-0", "console"):
        assert not process_alive(old[name]) or old[name] == endpoints["pids"].get(name), (
            f"{name} (pid {old[name]}) of the killed run is still alive"
        )
    second.submit_and_wait("echo", "hi again")
    # The same data directory, the same first operator and login (not a second one).
    assert endpoints["operator"] == first_endpoints["operator"]
    listed = second.tidegate("operator", "list", "--json")
    assert [o["username"] for o in json.loads(listed.stdout)] == ["admin"], listed.stderr
    with httpx.Client(base_url=endpoints["console_url"], timeout=10) as console:
        console_login(console, **endpoints["operator"])

    assert second.interrupt() == 0
    left = processes_of(data)
    assert not left, "processes left behind:\n" + describe(left)


def test_second_up_on_the_same_data_dir_is_refused(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    import fcntl

    with open(data / "run" / "up.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        up = new_up(ups, tmp_path, data).start()
        assert up.proc is not None
        assert up.proc.wait(30) == 1
    assert "already running" in up.out.read_text()
    assert "4242" in up.out.read_text()


def test_busy_console_port_is_a_usage_error(ups: list[Up], tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = new_up(ups, tmp_path, tmp_path / "data", port=port).start()
        assert up.proc is not None
        assert up.proc.wait(30) == 2
    assert f"console port {port} is in use" in up.out.read_text()
    assert not processes_of(tmp_path / "data")


# --- the README's promise -----------------------------------------------------------------------


def _readme_commands() -> list[str]:
    """The README's first two commands (the first fenced block)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```", 2)[1]
    lines = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
    return lines[:2]


def test_readme_starts_with_install_and_test_commands() -> None:
    install, test = _readme_commands()
    assert install == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' "
        "--config-settings editable_mode=strict && .venv/bin/tidegate up --demo"
    )
    assert test == ".venv/bin/pytest"
    # CI runs exactly the README's test command, in its own fresh environment.
    ci = (ROOT / ".ci" / "run").read_text()
    assert '\n"$VENV/bin/pytest"\n' in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def _copy_source(dest: Path) -> Path:
    skip = shutil.ignore_patterns(
        ".git",
        ".venv*",
        "__pycache__",
        "*.egg-info",
        "build",
        "dist",
        ".*_cache",
        "tidegate-data",
    )
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_commands_in_a_fresh_virtualenv(ups: list[Up], tmp_path: Path) -> None:
    """A newcomer's first minutes, from a plain (non-editable) install of this tree.

    Installing from a copy proves the wheel ships what it needs (migrations, templates), not
    only that the source tree works.
    """
    install, _ = _readme_commands()
    assert "tidegate up --demo" in install
    source = _copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", f"{source}[all]"],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    shutil.rmtree(source)  # from here on, only the installed package can be used

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import tidegate; print(tidegate.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert str(venv) in where.stdout

    data = tmp_path / "data"
    up = Up(
        script=str(venv / "bin" / "tidegate"),
        data_dir=data,
        console_port=free_port(),
        env=up_env(data, venv / "bin"),
        cwd=tmp_path,
        extra=("--demo",),
    )
    ups.append(up)
    up.start()
    up.wait_endpoints()
    up.submit_and_wait("echo", "hi")
    listed = up.tidegate("tasks", "--client", "demo", "--state", "succeeded")
    assert listed.returncode == 0 and "succeeded" in listed.stdout, listed.stderr
    assert up.interrupt() == 0
    left = processes_of(data)
    assert not left, "processes left behind:\n" + describe(left)


# --- the console without its servers ------------------------------------------------------------


def test_console_reports_unreachable_servers_and_still_renders(tmp_path: Path) -> None:
    """Without its servers the console still starts, answers /health and its login page,
    and says why nobody can log in now; it never shows a password."""
    from litestar.testing import TestClient

    from tidegate.config import Connection, Settings
    from tidegate.console.app import create_app

    nobody = free_port()  # nothing listens there
    settings = Settings(
        connection=Connection(
            nats_url=f"nats://127.0.0.1:{nobody}",
            database_url=f"postgresql://postgres:secret@127.0.0.1:{nobody}/postgres",
            data_dir=tmp_path,
        )
    )
    with TestClient(create_app(settings)) as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "degraded", "nats": False, "database": False}
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        login_page = client.get("/login")
        assert login_page.status_code == 200
        token = re.search(r'name="_csrf_token" value="([^"]+)"', login_page.text)
        assert token
        refused = client.post(
            "/login",
            data={"username": "admin", "password": "x" * 20, "_csrf_token": token.group(1)},
        )
        assert refused.status_code == 503
        assert "the database is unreachable: new logins are not possible" in refused.text
        assert "secret" not in refused.text  # the database password is never shown
