"""Task log files: one bounded file per attempt, in one directory per UTC hour.

At the top-of-hour flood an executor host may see hundreds of thousands of attempts a day;
hour directories keep any one directory small, and retention removes whole hours at once
instead of stat-ing millions of files.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

_HOUR_FORMAT = "%Y%m%d%H"


def log_path(root: Path, task_id: str, attempt: int, at: datetime) -> Path:
    # A digest, not the id itself: ids reach 265 bytes, file names stop at 255.
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    return root / at.astimezone(UTC).strftime(_HOUR_FORMAT) / f"{digest}.{attempt}.log"


def expired_hours(root: Path, keep: timedelta, now: datetime) -> list[Path]:
    """Hour directories entirely older than `keep`."""
    cutoff = now - keep
    old = []
    for entry in root.iterdir() if root.exists() else ():
        try:
            hour = datetime.strptime(entry.name, _HOUR_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            continue  # not ours
        if entry.is_dir() and hour + timedelta(hours=1) <= cutoff:
            old.append(entry)
    return old


async def prune_loop(root: Path, keep_hours: float, every_s: float = 600.0) -> None:
    """Remove expired hour directories, now and every `every_s` seconds."""
    keep = timedelta(hours=keep_hours)
    while True:
        for hour_dir in expired_hours(root, keep, datetime.now(UTC)):
            await asyncio.to_thread(shutil.rmtree, hour_dir, True)
            log.info("removed task logs of %s (older than %s h)", hour_dir.name, keep_hours)
        await asyncio.sleep(every_s)
