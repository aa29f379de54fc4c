"""`tidegate up` as an operator runs it: real processes, embedded servers, signals, kill -9.

Every process `up` starts names the data directory on its command line (nats-server `-sd`,
postgres `-D`, components `--data-dir`), so "nothing left behind" is checked by looking for
processes whose command line points into the test's data directory.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tidegate.embedded.children import process_alive
from tidegate.embedded.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
START_S = 90.0  # first start: initdb plus three Python children
TASK_S = 30.0
STOP_S = 45.0  # the executor drain deadline plus stopping the servers


def _tidegate_script() -> str:
    found = shutil.which("tidegate", path=sysconfig.get_path("scripts"))
    assert found, "the `tidegate` console script is not installed in this environment"
    return found


def _env(data_dir: Path, bin_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env["TIDEGATE_DATA_DIR"] = str(data_dir)
    env["TIDEGATE_DRAIN_TIMEOUT_S"] = "5"
    if bin_dir is not None:
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def processes_of(data_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line points into `data_dir`."""
    prefix = str(data_dir)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        inside = any(a == prefix or a.startswith(prefix + os.sep) for a in cmdline)
        if inside and proc.pid != os.getpid() and process_alive(proc.pid):
            found.append(proc)
    return found


def _describe(procs: list[psutil.Process]) -> str:
    return "\n".join(f"{p.pid}: {shlex.join(p.info['cmdline'] or [])}" for p in procs)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no file)"


@dataclass
class Up:
    """One `tidegate up` process and the commands run against its data directory."""

    script: str
    data_dir: Path
    console_port: int
    env: dict[str, str]
    cwd: Path
    extra: tuple[str, ...] = ()
    new_session: bool = False  # its own process group, as a shell's job would have
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-up.out"

    def start(self) -> Up:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.script,
                    "--data-dir",
                    str(self.data_dir),
                    "up",
                    "--console-port",
                    str(self.console_port),
                    *self.extra,
                ],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        return self

    def diagnostics(self) -> str:
        logs = self.data_dir / "logs"
        parts = [f"--- tidegate up output ---\n{_tail(self.out, 60)}"]
        for name in ("driver", "exec-0", "console"):
            parts.append(f"--- logs/{name}.log ---\n{_tail(logs / f'{name}.log')}")
        return "\n".join(parts)

    def wait_endpoints(self, timeout: float = START_S) -> dict[str, Any]:
        assert self.proc is not None
        path = self.data_dir / "endpoints.json"
        deadline = time.monotonic() + timeout
        # A killed run leaves its file behind: wait for the one this process wrote.
        while not (path.exists() and self._written_by_me(path)):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"`tidegate up` exited with {self.proc.returncode}\n{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {path} after {timeout:.0f}s\n{self.diagnostics()}")
            time.sleep(0.2)
        found: dict[str, Any] = json.loads(path.read_text())
        return found

    def _written_by_me(self, path: Path) -> bool:
        assert self.proc is not None
        try:
            return bool(json.loads(path.read_text())["pids"]["up"] == self.proc.pid)
        except (OSError, ValueError, KeyError):
            return False

    def tidegate(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.script, *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit_and_wait(self, *argv: str) -> dict[str, Any]:
        """Submit as the `demo` client; return the task once the database says it succeeded."""
        done = self.tidegate("submit", "--client", "demo", "--", *argv)
        assert done.returncode == 0, done.stderr
        task_id = done.stdout.split()[0]
        assert task_id.startswith("demo:"), done.stdout
        deadline = time.monotonic() + TASK_S
        last = ""
        while time.monotonic() < deadline:
            shown = self.tidegate("task", "show", task_id, "--json")
            if shown.returncode == 0:
                record: dict[str, Any] = json.loads(shown.stdout)
                if record["state"] == "succeeded":
                    return record
                last = f"state {record['state']}: {shown.stdout}"
            else:
                last = shown.stderr
            time.sleep(0.5)
        pytest.fail(
            f"{task_id} did not succeed within {TASK_S:.0f}s ({last})\n{self.diagnostics()}"
        )

    def interrupt(self) -> int:
        """Ctrl-C; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"`tidegate up` still running {STOP_S:.0f}s after SIGINT\n{self.diagnostics()}"
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[list[Up]]:
    """Every `Up` a test makes; whatever is still running afterwards is stopped."""
    made: list[Up] = []
    yield made
    for up in made:
        if up.proc is not None and up.proc.poll() is None:
            up.proc.send_signal(signal.SIGINT)
            try:
                up.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                up.kill()
        for proc in processes_of(up.data_dir):
            if "postgres" in proc.name():
                # The postmaster is not our child: stop it the way up would have.
                subprocess.run(
                    [
                        str(Path(proc.exe()).parent / "pg_ctl"),
                        "-D",
                        str(up.data_dir / "pg"),
                        "-m",
                        "immediate",
                        "stop",
                    ],
                    user="pgserver" if os.geteuid() == 0 else None,
                    check=False,
                    capture_output=True,
                )
            else:
                proc.kill()


def _new_up(ups: list[Up], tmp_path: Path, data_dir: Path, port: int | None = None) -> Up:
    up = Up(
        script=_tidegate_script(),
        data_dir=data_dir,
        console_port=port or free_port(),
        env=_env(data_dir),
        cwd=tmp_path,
    )
    ups.append(up)
    return up


def test_up_runs_a_task_and_stops_cleanly_on_ctrl_c(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = _new_up(ups, tmp_path, data).start()
    endpoints = up.wait_endpoints()
    assert endpoints["nats_url"].startswith("nats://127.0.0.1:")
    assert endpoints["database_url"].startswith("postgresql://")
    assert endpoints["console_url"] == f"http://127.0.0.1:{up.console_port}"
    assert endpoints["data_dir"] == str(data)

    record = up.submit_and_wait("echo", "hi")
    assert record["exit_code"] == 0
    assert "hi" in (record["log_tail"] or "")

    health = httpx.get(f"{endpoints['console_url']}/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "nats": True, "database": True}
    page = httpx.get(endpoints["console_url"] + "/", timeout=10)
    assert page.status_code == 200
    assert "succeeded" in page.text

    assert up.interrupt() == 0
    assert not (data / "endpoints.json").exists()
    left = processes_of(data)
    assert not left, "processes left behind:\n" + _describe(left)


def test_a_component_that_dies_is_restarted(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = _new_up(ups, tmp_path, data).start()
    endpoints = up.wait_endpoints()
    banner = up.out.read_text()
    assert endpoints["console_url"] in banner
    assert "operator login" in banner
    assert endpoints["nats_url"] in banner

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
    while True:
        try:
            if httpx.get(endpoints["console_url"] + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the restarted console does not answer"
        time.sleep(0.2)
    assert up.interrupt() == 0
    left = processes_of(data)
    assert not left, "processes left behind:\n" + _describe(left)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_with_a_running_task_leaves_nothing(
    ups: list[Up], tmp_path: Path
) -> None:
    """A terminal's Ctrl-C signals the whole process group: `up` and nats-server alike."""
    data = tmp_path / "data"
    up = _new_up(ups, tmp_path, data)
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
    assert not left, "processes left behind:\n" + _describe(left)


@pytest.mark.slow
def test_up_after_kill_9_cleans_up_the_old_run(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = _new_up(ups, tmp_path, data).start()
    old = first.wait_endpoints()["pids"]
    assert {"nats-server", "postgres", "driver", "exec-0", "console"} <= old.keys()
    first.kill()  # kill -9: no cleanup of its own

    # The same console port: the old console must be gone before the new one binds it.
    second = _new_up(ups, tmp_path, data, port=first.console_port).start()
    endpoints = second.wait_endpoints()
    assert second.proc is not None and endpoints["pids"]["up"] == second.proc.pid
    for name in ("nats-server", "postgres", "driver", "exec-0", "console"):
        assert not process_alive(old[name]) or old[name] == endpoints["pids"].get(name), (
            f"{name} (pid {old[name]}) of the killed run is still alive"
        )
    second.submit_and_wait("echo", "hi again")

    assert second.interrupt() == 0
    left = processes_of(data)
    assert not left, "processes left behind:\n" + _describe(left)


def test_second_up_on_the_same_data_dir_is_refused(ups: list[Up], tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    import fcntl

    with open(data / "run" / "up.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        up = _new_up(ups, tmp_path, data).start()
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
        up = _new_up(ups, tmp_path, tmp_path / "data", port=port).start()
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
        env=_env(data, venv / "bin"),
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
    assert not left, "processes left behind:\n" + _describe(left)


# --- the console without its servers ------------------------------------------------------------


def test_console_reports_unreachable_servers_and_still_renders(tmp_path: Path) -> None:
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
        page = client.get("/")
        assert page.status_code == 200
        assert "task counts unavailable" in page.text
        assert "secret" not in page.text  # the password is never shown
        assert f"nats://127.0.0.1:{nobody}" in page.text
