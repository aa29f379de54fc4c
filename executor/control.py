"""An operator's cordon and drain, as one executor follows them.

The console writes this executor's key in the executor control bucket (`ExecutorControl`); the
executor watches that key. A cordon stops its fetch loops, running tasks go on. A drain also
cordons, and sets `drain_requested`: `run_executor` then stops as on SIGTERM (running tasks
finish within the drain timeout, the rest is handed back) and the executor exits 0. Before it
exits, the key is rewritten as a plain cordon, so that a restarted executor (`tidegate up`
restarts whatever exits) comes back cordoned and idle until an operator uncordons it.

The key is the executor id: an executor started without `--executor-id` gets a new id (host and
pid) at every start, and then a cordon does not outlive the process.
"""

from __future__ import annotations

import asyncio
import logging

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
    def __init__(self, kv: KeyValue, agent: Executor) -> None:
        self._kv = kv
        self._agent = agent
        self.drain_requested = asyncio.Event()
        self._drain: tuple[ExecutorControl, int] | None = None  # the request and its revision

    async def load(self) -> None:
        """Apply the current value before any fetch loop starts: a restarted executor must
        not take a single task before it knows it is cordoned."""
        try:
            entry = await self._kv.get(self._agent.id)
        except KeyNotFoundError:
            return
        except InvalidKeyError:
            # Its heartbeat could not be stored either: refuse to start rather than run unseen.
            raise ConfigError(
                f"executor id {self._agent.id!r} cannot be a KV key: use letters, digits "
                "and - _ = / . (not first or last)"
            ) from None
        self._apply(entry)

    async def run(self) -> None:
        watcher = await self._kv.watch(self._agent.id)
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
            self._agent.cordon(False, by="(control key removed)")
            return
        self._agent.cordon(control.cordoned or control.drain, by=control.by)
        if control.drain and not self.drain_requested.is_set():
            log.info("executor %s: drain requested by %s", self._agent.id, control.by)
            self._drain = (control, entry.revision or 0)
            self.drain_requested.set()

    async def mark_drained(self) -> None:
        """Rewrite the drain request as a cordon, unless an operator changed the key since
        (say, uncordoned it during the drain: then the executor comes back active)."""
        if self._drain is None:
            return
        request, revision = self._drain
        value = encode(ExecutorControl(cordoned=True, drain=False, by=request.by, at=now()))
        for failures in range(1, MARK_TRIES + 1):
            try:
                await self._kv.update(self._agent.id, value, last=revision)
                return
            except KeyWrongLastSequenceError:
                log.info("executor %s: control key changed during the drain; kept", self._agent.id)
                return
            except Exception as exc:
                log.warning("drained, but the control key was not rewritten: %s", exc)
                await asyncio.sleep(MARK_RETRY.delay(failures))
