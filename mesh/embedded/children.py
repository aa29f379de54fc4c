"""Component processes (`python -m tidegate …`) started by `tidegate up` and `tidegate bench`,
and the psutil helpers that stop them and whatever they started."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

from tidegate.embedded.servers import die_with_parent

KILL_WAIT_S = 5.0


def spawn_component(
    args: Sequence[str],
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    new_session: bool = False,
    header: str = "",
) -> subprocess.Popen[bytes]:
    """Start `python -m tidegate *args`, its output appended to `log_path`.

    The child is in a process group of its own (with `new_session`, a session of its own), so
    a Ctrl-C in the terminal reaches only the parent, which then stops the children in order
    instead of all of them racing each other; die_with_parent covers a parent killed outright.
    """
    with open(log_path, "ab") as out:
        if header:
            out.write(header.encode())
            out.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "tidegate", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            process_group=None if new_session else 0,
            start_new_session=new_session,
        )


def signal_alive(procs: Iterable[subprocess.Popen[bytes]], sig: signal.Signals) -> None:
    """Send `sig` to those of `procs` still running."""
    for proc in procs:
        if proc.poll() is None:
            # It may exit between the poll and the signal.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def kill_trees(procs: list[psutil.Process], timeout: float = KILL_WAIT_S) -> None:
    """SIGKILL processes and their descendants: an executor killed this way cannot stop its
    tasks, which run in sessions of their own and would otherwise outlive it."""
    victims: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            victims.extend(proc.children(recursive=True))
        victims.append(proc)
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=timeout)


def process_alive(pid: int | None) -> bool:
    """True if `pid` runs; a zombie (exited, not yet reaped) does not count."""
    if pid is None:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
