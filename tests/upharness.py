"""`tidegate up` for tests: one real `up` process, its data directory and its commands.

Every process `up` starts names the data directory on its command line (nats-server `-sd`,
postgres `-D`, components `--data-dir`), so "nothing left behind" is checked by looking for
processes whose command line points into the data directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tidegate.embedded.children import process_alive
from tidegate.embedded.servers import free_port

START_S = 90.0  # first start: initdb plus three Python children
TASK_S = 30.0
STOP_S = 45.0  # the executor drain deadline plus stopping the servers


def tidegate_script() -> str:
    found = shutil.which("tidegate", path=sysconfig.get_path("scripts"))
    assert found, "the `tidegate` console script is not installed in this environment"
    return found


def up_env(data_dir: Path, bin_dir: Path | None = None) -> dict[str, str]:
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


def describe(procs: list[psutil.Process]) -> str:
    return "\n".join(f"{p.pid}: {shlex.join(p.info['cmdline'] or [])}" for p in procs)


def console_login(console: httpx.Client, username: str, password: str) -> None:
    """Log in through the login form, as a browser does (its CSRF token included)."""
    page = console.get("/login")
    token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    done = console.post(
        "/login",
        data={"username": username, "password": password, "_csrf_token": token.group(1)},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text


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


def stop_all(made: list[Up]) -> None:
    """Stop every `Up` still running, and whatever of theirs is left (the `ups` fixture)."""
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


def new_up(ups: list[Up], tmp_path: Path, data_dir: Path, port: int | None = None) -> Up:
    up = Up(
        script=tidegate_script(),
        data_dir=data_dir,
        console_port=port or free_port(),
        env=up_env(data_dir),
        cwd=tmp_path,
    )
    ups.append(up)
    return up
