"""How the executor's event loop learns that a task's process exited.

Python 3.11's default child watcher (`ThreadedChildWatcher`) starts a thread per child to wait
for it: at flood rates a thread start and join per task. On Linux (5.3+) a pidfd watcher
waits for every child on the event loop itself (an fd per child, no thread). Python 3.12 picks
it by itself; on 3.11 it is installed here, for the executor's loop only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings

log = logging.getLogger(__name__)


def _pidfd_works() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an older kernel (ENOSYS), or a sandbox that forbids it
        return False
    return True


def use_pidfd_watcher(loop: asyncio.AbstractEventLoop) -> bool:
    """Install a pidfd child watcher for `loop` where it is available and not the default;
    says whether children are now watched through pidfds (False: the default stays)."""
    if sys.version_info >= (3, 12) or not _pidfd_works():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the watcher API, from 3.12 on
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
    log.info("task processes are watched through pidfds")
    return True
