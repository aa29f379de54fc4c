"""Task log files: one bounded file per attempt, in one directory per UTC hour.

At the top-of-hour flood an executor host may see hundreds of thousands of attempts a day;
hour directories keep any one directory small, and retention removes whole hours at once
instead of stat-ing millions of files.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_HOUR_FORMAT = "%Y%m%d%H"

# A task's output is its client's business: readable by the executor's user only (the log
# server reads it for the console), never by the tasks of other clients on the same host.
DIR_MODE = 0o700
FILE_MODE = 0o600


def create_log(path: Path) -> BinaryIO:
    """A new (or emptied) log file, private to this user."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "wb")


def make_private_root(root: Path) -> None:
    """The log directory, private whatever it was before: files written by an earlier version
    were readable by everyone, and are no longer reachable through it."""
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(root, DIR_MODE)


class LogFiles:
    """Opens attempts' log files, making each hour directory once rather than per attempt.

    Called on the event loop, not in a thread: creating a file in a directory that exists is
    a few microseconds on a local disk, less than a hop to a worker thread and back."""

    _KEEP = 4  # directories remembered: the hours that may still be started in

    def __init__(self) -> None:
        self._made: list[Path] = []

    def open(self, path: Path) -> BinaryIO:
        folder = path.parent
        if folder not in self._made:
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self._made = [*self._made[-(self._KEEP - 1) :], folder]
        try:
            return create_log(path)
        except FileNotFoundError:
            # Removed meanwhile (by hand, or retention set shorter than an hour): make it again.
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            return create_log(path)


def log_path(root: Path, task_id: str, attempt: int, at: datetime) -> Path:
    return root / _hour_name(at) / _file_name(task_id, attempt)


def _file_name(task_id: str, attempt: int) -> str:
    # A digest, not the id itself: ids reach 265 bytes, file names stop at 255.
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    return f"{digest}.{attempt}.log"


def utc(at: datetime) -> datetime:
    # A time without a zone (from a hand-made request) is taken as UTC, as everything here is.
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def _hour_name(at: datetime) -> str:
    return utc(at).strftime(_HOUR_FORMAT)


def _hour_of(entry: Path) -> datetime | None:
    try:
        return datetime.strptime(entry.name, _HOUR_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None  # not ours


def _expired(hour: datetime, keep: timedelta, now: datetime) -> bool:
    return hour + timedelta(hours=1) <= now - keep


def pruned(started_at: datetime, keep: timedelta, now: datetime) -> bool:
    """The hour directory of an attempt started then is past retention (removed, or about to be)."""
    hour = datetime.strptime(_hour_name(started_at), _HOUR_FORMAT).replace(tzinfo=UTC)
    return _expired(hour, keep, now)


def expired_hours(root: Path, keep: timedelta, now: datetime) -> list[Path]:
    """Hour directories entirely older than `keep`."""
    old = []
    for entry in root.iterdir() if root.exists() else ():
        hour = _hour_of(entry)
        if hour is not None and entry.is_dir() and _expired(hour, keep, now):
            old.append(entry)
    return old


def find_log(
    root: Path, task_id: str, attempt: int, started_at: datetime | None = None
) -> Path | None:
    """The file `log_path` wrote for this attempt, if this host still keeps it.

    The attempt's start names its hour directory (or a neighbour: the start may come from
    another host's clock). Without it every hour directory is searched, newest first (a few
    dozen `stat`s: retention keeps them few); a task id resubmitted after the duplicate
    window starts again at attempt 1, so only the start tells such runs apart. Blocking:
    call it in a thread.
    """
    name = _file_name(task_id, attempt)
    if started_at is not None:
        for skew in (0, -1, 1):
            hinted = root / _hour_name(started_at + timedelta(hours=skew)) / name
            if hinted.is_file():
                return hinted
        return None
    if not root.is_dir():
        return None
    hours = sorted(((h, e) for e in root.iterdir() if (h := _hour_of(e)) is not None), reverse=True)
    for _hour, entry in hours:
        if (entry / name).is_file():
            return entry / name
    return None


async def prune_loop(root: Path, keep_hours: float, every_s: float = 600.0) -> None:
    """Remove expired hour directories, now and every `every_s` seconds."""
    keep = timedelta(hours=keep_hours)
    while True:
        for hour_dir in expired_hours(root, keep, datetime.now(UTC)):
            await asyncio.to_thread(shutil.rmtree, hour_dir, True)
            log.info("removed task logs of %s (older than %s h)", hour_dir.name, keep_hours)
        await asyncio.sleep(every_s)
