"""An operator's cordon and drain, as one executor follows them.

The console writes this executor's key in the executor control bucket (`ExecutorControl`); the
executor watches that key. A cordon stops its fetch loops, running tasks go on. A drain also
cordons, and sets `drain_requested`: `run_executor` then stops as on SIGTERM (running tasks
finish within the drain timeout, the rest is handed back) and the executor exits 0. Before it
exits, the key is rewritten as a plain cordon, so that a restarted executor (`tidegate up`
restarts whatever exits) comes back cordoned and idle until an operator uncordons it.

The key is the executor id: an executor started without `--executor-id` gets a new id (host and
pid) at every start, and then a cordon does not outlive the process. A worker of an executor
with `--workers` (workers.py) follows every worker's key: a cordon or drain of any of them is one
of the whole executor, and the executor is cordoned while any of its keys says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import msgspec
from nats.js.errors import InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tidegate.backoff import Backoff
from tidegate.errors import ConfigError
from tidegate.executor.agent import Executor
from tidegate.wire import ExecutorControl, decode_executor_control, encode, now

log = logging.getLogger(__name__)

_DELETE_OPS = {"DEL", "PURGE"}
# Rewriting a drain as a cordon before exiting: a few tries. If NATS does not take it, the
# restarted executor sees the drain again, has nothing to finish and exits again, until it does.
MARK_TRIES = 5
MARK_RETRY = Backoff(base_s=0.2, cap_s=2.0)


class ControlFollower:
    def __init__(self, kv: KeyValue, agent: Executor, keys: Sequence[str] = ()) -> None:
        self._kv = kv
        self._agent = agent
        self._keys = list(keys) or [agent.id]
        self._orders: dict[str, ExecutorControl] = {}  # each key's value now
        self.drain_requested = asyncio.Event()
        # The request, its key and revision.
        self._drain: tuple[ExecutorControl, str, int] | None = None

    async def load(self) -> None:
        """Apply the current value before any fetch loop starts: a restarted executor must
        not take a single task before it knows it is cordoned."""
        for key in self._keys:
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue
            except InvalidKeyError:
                # Its heartbeat could not be stored either: refuse to start rather than run unseen.
                raise ConfigError(
                    f"executor id {key!r} cannot be a KV key: use letters, digits "
                    "and - _ = / . (not first or last)"
                ) from None
            self._apply(entry)

    async def run(self) -> None:
        if len(self._keys) == 1:
            await self._follow(self._keys[0])
            return
        # A task group: one watch failing ends the others too, and the whole is restarted.
        async with asyncio.TaskGroup() as group:
            for key in self._keys:
                group.create_task(self._follow(key))

    async def _follow(self, key: str) -> None:
        watcher = await self._kv.watch(key)
        try:
            async for entry in watcher:
                if entry is not None:  # None: the end of the initial value
                    self._apply(entry)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    def _apply(self, entry: KeyValue.Entry) -> None:
        control: ExecutorControl | None = None
        if entry.operation not in _DELETE_OPS and entry.value:
            try:
                control = decode_executor_control(entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # A bad value written by hand must not stop the executor, nor change it.
                log.warning("ignoring undecodable control entry %r: %s", entry.key, exc)
                return
        if control is None:
            self._orders.pop(entry.key, None)
        else:
            self._orders[entry.key] = control
        cordoned = any(c.cordoned or c.drain for c in self._orders.values())
        self._agent.cordon(cordoned, by=control.by if control else "(control key removed)")
        if control is not None and control.drain and not self.drain_requested.is_set():
            log.info("executor %s: drain requested by %s", self._agent.id, control.by)
            self._drain = (control, entry.key, entry.revision or 0)
            self.drain_requested.set()

    async def mark_drained(self) -> None:
        """Rewrite the drain request as a cordon, unless an operator changed the key since
        (say, uncordoned it during the drain: then the executor comes back active)."""
        if self._drain is None:
            return
        request, key, revision = self._drain
        value = encode(ExecutorControl(cordoned=True, drain=False, by=request.by, at=now()))
        for failures in range(1, MARK_TRIES + 1):
            try:
                # Workers of one executor race here: the first rewrites it, the others find
                # it changed (by their sibling) and keep it.
                await self._kv.update(key, value, last=revision)
                return
            except KeyWrongLastSequenceError:
                log.info("executor %s: control key changed during the drain; kept", self._agent.id)
                return
            except Exception as exc:
                log.warning("drained, but the control key was not rewritten: %s", exc)
                await asyncio.sleep(MARK_RETRY.delay(failures))
