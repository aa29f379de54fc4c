"""The Executors page: every executor, live from its heartbeat, and an operator's cordon and drain.

Heartbeats come from the executors bucket (a key that ages out is a dead executor). A cordon or
drain is written into the executor control bucket, where each executor watches its own key
(`tidegate.executor.control`): the console never talks to an executor directly, and a change
reaches it within a second while NATS is up. While NATS is down the page says so and a change
is refused (503) with nothing half done: heartbeats and cordons live only in NATS.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import msgspec
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.response import Redirect, Response, Template
from litestar.status_codes import (
    HTTP_303_SEE_OTHER,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from tidegate import names
from tidegate.console.auth import actor_of, operator_only
from tidegate.errors import TidegateError
from tidegate.store.operators import record_action
from tidegate.store.store import Store
from tidegate.wire import (
    ExecutorControl,
    Heartbeat,
    decode_executor_control,
    decode_heartbeat,
    encode,
    now,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_TIMEOUT_S = 2.0
POLL_EVERY_S = 2
LATE_AFTER_BEATS = 2  # a heartbeat older than this many intervals is shown as late
TASKS_SHOWN = 20  # running tasks listed per executor; the rest are counted
# An executor id is a KV key (nats' own rule), and the only thing a route takes from the URL.
EXECUTOR_ID = re.compile(r"\A(?!\.)[-/_=.A-Za-z0-9]{1,256}(?<!\.)\Z")
NATS_DOWN = "NATS is unreachable: the executor was not told; nothing changed"
NO_STORE = {"Cache-Control": "no-store"}
_DELETE_OPS = {"DEL", "PURGE"}


@dataclass(frozen=True)
class RunningView:
    task_id: str
    attempt: int
    started_at: datetime
    running_for: str


@dataclass(frozen=True)
class ExecutorView:
    executor_id: str
    heartbeat: Heartbeat | None  # None: not running, listed for its cordon
    control: ExecutorControl | None
    state: str  # active | cordoned | draining | drained
    pending: str  # what was asked and is not in effect yet, in words ("" if nothing)
    age: str = ""
    late: bool = False
    running: list[RunningView] = field(default_factory=list)
    more_running: int = 0

    @property
    def used(self) -> int:
        return len(self.heartbeat.running) if self.heartbeat else 0

    @property
    def cordoned(self) -> bool:
        """Cordoned as far as the operator is concerned: the control key wins over the beat."""
        if self.control is not None:
            return self.control.cordoned or self.control.drain
        return self.heartbeat is not None and (self.heartbeat.cordoned or self.heartbeat.draining)


@dataclass
class ExecutorsPage:
    at: datetime = field(default_factory=now)
    rows: list[ExecutorView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, in words
    message: str = ""  # the outcome of the change just made

    @property
    def used(self) -> int:
        return sum(e.used for e in self.rows)

    @property
    def total(self) -> int:
        return sum(e.heartbeat.slots for e in self.rows if e.heartbeat)


# --- reading -------------------------------------------------------------------------------------


def duration_words(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def executor_state(hb: Heartbeat | None, control: ExecutorControl | None) -> str:
    """`drained`: cordoned with nothing running here, so it is safe to stop (or it stopped)."""
    if hb is None:
        return "drained" if control is not None and (control.cordoned or control.drain) else ""
    if hb.draining:
        return "draining"
    if hb.cordoned:
        return "cordoned" if hb.running else "drained"
    return "active"


def pending_of(hb: Heartbeat | None, control: ExecutorControl | None) -> str:
    if hb is None or control is None:
        return ""
    by = f"by {control.by}"
    if control.drain and not hb.draining:
        return f"drain requested {by}"
    if hb.draining and not control.cordoned:
        return f"uncordoned {by}: it still exits, then comes back active"
    if control.cordoned and not (hb.cordoned or hb.draining):
        return f"cordon requested {by}"
    if not control.cordoned and hb.cordoned and not hb.draining:
        return f"uncordon requested {by}"
    return ""


def view_of(
    executor_id: str,
    hb: Heartbeat | None,
    control: ExecutorControl | None,
    *,
    at: datetime,
    interval_s: float,
) -> ExecutorView:
    if hb is None:
        return ExecutorView(
            executor_id=executor_id,
            heartbeat=None,
            control=control,
            state=executor_state(None, control),
            pending="",
            age="no heartbeat: not running",
        )
    age_s = (at - hb.at).total_seconds()
    tasks = sorted(hb.running, key=lambda t: t.started_at)
    return ExecutorView(
        executor_id=executor_id,
        heartbeat=hb,
        control=control,
        state=executor_state(hb, control),
        pending=pending_of(hb, control),
        age=duration_words(age_s),
        late=age_s > LATE_AFTER_BEATS * interval_s,
        running=[
            RunningView(
                task_id=t.task_id,
                attempt=t.attempt,
                started_at=t.started_at,
                running_for=duration_words((at - t.started_at).total_seconds()),
            )
            for t in tasks[:TASKS_SHOWN]
        ],
        more_running=max(0, len(tasks) - TASKS_SHOWN),
    )


async def latest_values(kv: KeyValue) -> dict[str, bytes]:
    """Every key's current value in one pass: one consumer, not one request per key."""
    watcher = await kv.watchall()
    values: dict[str, bytes] = {}
    try:
        async for entry in watcher:
            if entry is None:  # the end of the current values
                break
            if entry.operation in _DELETE_OPS or not entry.value:
                values.pop(entry.key, None)
            else:
                values[entry.key] = entry.value
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return values


async def _bucket_values(js: JetStreamContext, bucket: str) -> dict[str, bytes]:
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:  # no executor (or driver) of this version has started yet
        return {}
    return await latest_values(kv)


async def collect(js: JetStreamContext | None, *, interval_s: float) -> ExecutorsPage:
    """Every executor with a heartbeat, and every cordoned one without (it stopped)."""
    page = ExecutorsPage()
    if js is None:
        page.problems.append("NATS unreachable: executors cannot be listed now")
        return page
    try:
        beats, controls = await asyncio.wait_for(
            asyncio.gather(
                _bucket_values(js, names.EXECUTORS_BUCKET),
                _bucket_values(js, names.EXECUTOR_CONTROL_BUCKET),
            ),
            READ_TIMEOUT_S,
        )
    except Exception as exc:
        page.problems.append(f"NATS did not answer ({exc or 'timeout'}): executors unknown")
        return page
    decoded = {k: _decoded(page, k, v, decode_heartbeat) for k, v in beats.items()}
    orders = {k: _decoded(page, k, v, decode_executor_control) for k, v in controls.items()}
    page.at = now()
    for key in sorted(decoded.keys() | orders.keys()):
        hb, control = decoded.get(key), orders.get(key)
        if hb is None and not (control and (control.cordoned or control.drain)):
            continue  # an uncordoned executor that is gone: nothing to show or do
        page.rows.append(view_of(key, hb, control, at=page.at, interval_s=interval_s))
    return page


def _decoded(page: ExecutorsPage, key: str, data: bytes, decode: Callable[[bytes], T]) -> T | None:
    try:
        return decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        page.problems.append(f"skipped an undecodable entry for {key!r}: {exc}")
        return None


def interval_of(state: State) -> float:
    return float(state.settings.limits.heartbeat_interval_s)


def live_context(page: ExecutorsPage) -> dict[str, Any]:
    return {"page": page, "poll_every_s": POLL_EVERY_S}


# --- changing ------------------------------------------------------------------------------------


class Refused(TidegateError):
    """A change that was not made; `status` and the message go back to the browser."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _current(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:  # never written, or deleted
        return None
    return entry.value or None


async def _bucket(js: JetStreamContext, bucket: str, missing: str) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        raise Refused(HTTP_404_NOT_FOUND, missing) from None


async def _tell(js: JetStreamContext, executor_id: str, action: str, actor: str) -> dict[str, Any]:
    """Write the executor's control key for `action`; the audit details of what was done."""
    beats = await _bucket(js, names.EXECUTORS_BUCKET, "no executor has started yet")
    control_kv = await _bucket(
        js,
        names.EXECUTOR_CONTROL_BUCKET,
        "the executor control bucket does not exist: executors of this version create it",
    )
    beat = await _current(beats, executor_id)
    hb: Heartbeat | None = None
    if beat is not None:
        try:
            hb = decode_heartbeat(beat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass  # an executor of another version: it runs, its details are unknown here
    if beat is None and await _current(control_kv, executor_id) is None:
        raise Refused(HTTP_404_NOT_FOUND, f"no executor {executor_id!r} (no heartbeat, no cordon)")
    if action == "drain" and beat is None:
        raise Refused(HTTP_409_CONFLICT, f"{executor_id} is not running: there is nothing to drain")
    if action == "uncordon" and beat is None:
        await control_kv.delete(executor_id)  # gone: nothing to tell, the row goes away
    else:
        value = ExecutorControl(
            cordoned=action != "uncordon", drain=action == "drain", by=actor, at=now()
        )
        await control_kv.put(executor_id, encode(value))
    return {
        "running": beat is not None,
        "host": hb.host if hb else None,
        "running_tasks": len(hb.running) if hb else None,
    }


async def _audit(store: Store, actor: str, action: str, target: str, details: Any) -> None:
    try:
        await record_action(store, actor=actor, action=action, target=target, details=details)
    except Exception as exc:  # the change is made; a lost audit line is logged, not hidden
        log.warning("audit of %s on %s not recorded: %s", action, target, exc)


async def change(request: Request[Any, Any, Any], executor_id: str, action: str) -> str:
    """Cordon, uncordon or drain one executor and audit it; what was done, in words. A change
    that was not made raises `Refused` with the status and the reason."""
    state = request.app.state
    if not EXECUTOR_ID.match(executor_id):
        raise Refused(HTTP_404_NOT_FOUND, "no such executor: not a valid executor id")
    js = state.link.js
    if js is None:
        raise Refused(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
    actor = actor_of(request)
    try:
        details = await asyncio.wait_for(_tell(js, executor_id, action, actor), READ_TIMEOUT_S)
    except Refused:
        raise
    except Exception as exc:  # NATS went away between the check and the write
        raise Refused(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"NATS did not answer ({exc or 'timeout'}): the executor may not have been told; "
            "look at the page before trying again",
        ) from None
    await _audit(state.store, actor, f"executor.{action}", executor_id, details)
    return f"{executor_id}: {action} sent"


async def _change(request: Request[Any, Any, Any], executor_id: str, action: str) -> Response[Any]:
    try:
        message = await change(request, executor_id, action)
    except Refused as exc:
        return _plain(exc.status, str(exc))
    if request.headers.get("hx-request") != "true":
        return Redirect("/executors", status_code=HTTP_303_SEE_OTHER)
    state = request.app.state
    page = await collect(state.link.js, interval_s=interval_of(state))
    page.message = message
    return Template("executors_live.html", context=live_context(page), headers=NO_STORE)


def _plain(status: int, text: str) -> Response[str]:
    return Response(text, status_code=status, media_type="text/plain")


# --- routes --------------------------------------------------------------------------------------


@get("/executors", name="executors")
async def executors_page(state: State) -> Template:
    page = await collect(state.link.js, interval_s=interval_of(state))
    return Template(
        "executors.html", context={**live_context(page), "nav": "executors"}, headers=NO_STORE
    )


@get("/executors/live", name="executors_live")
async def executors_live(state: State) -> Template:
    page = await collect(state.link.js, interval_s=interval_of(state))
    return Template("executors_live.html", context=live_context(page), headers=NO_STORE)


@post("/executors/{executor_id:str}/cordon", guards=[operator_only])
async def cordon(request: Request[Any, Any, Any], executor_id: FromPath[str]) -> Response[Any]:
    return await _change(request, executor_id, "cordon")


@post("/executors/{executor_id:str}/uncordon", guards=[operator_only])
async def uncordon(request: Request[Any, Any, Any], executor_id: FromPath[str]) -> Response[Any]:
    return await _change(request, executor_id, "uncordon")


@post("/executors/{executor_id:str}/drain", guards=[operator_only])
async def drain(request: Request[Any, Any, Any], executor_id: FromPath[str]) -> Response[Any]:
    return await _change(request, executor_id, "drain")


ROUTES: list[ControllerRouterHandler] = [executors_page, executors_live, cordon, uncordon, drain]
