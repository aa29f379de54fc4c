"""HTTP submission's parts (the route is in api_tasks.py): the body read within the size limit
and decoded as the bus does, the publish on the console's NATS connection, the receipt, and the
OpenAPI operation that names the wire's `TaskSpec` as the body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from litestar import Request
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from nats.aio.client import Client as NATS

from tidegate.bus.publish import Publisher
from tidegate.bus.quota import QuotaGate
from tidegate.bus.submit import check_registered, task_message, url_id_secret
from tidegate.console.api_errors import ApiError
from tidegate.console.link import BusLink
from tidegate.errors import BufferFull, TidegateError
from tidegate.wire import TaskSpec, decode_spec, task_id

PUBLISH_TIMEOUT_S: Final = 2.0
PUBLISH_RETRIES: Final = 2
REGISTERED_FOR_S: Final = 5.0  # how long a client found in the mirror is not looked up again
NATS_DOWN: Final = (
    "NATS is unreachable: the task was not accepted; submit it again later (the same key is safe)"
)


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """The acceptance of a task: JetStream stored it (or already held its key)."""

    task_id: str
    seq: int  # the submission's sequence in TG_TASKS
    duplicate: bool  # JetStream already held this key: it runs once, not twice


class Submitter:
    """Publishes HTTP submissions as the SDK does, on the console's own NATS connection: one
    pipelined publisher (one inbox) for every client."""

    def __init__(self, link: BusLink) -> None:
        self._link = link
        self._publisher: Publisher | None = None
        self._registered: dict[str, float] = {}  # client -> when the mirror last had it
        self._quota: QuotaGate | None = None  # each client's own buffer quota (`buffer_max`)

    def publisher(self, nc: NATS) -> Publisher:
        """The one publisher of `nc` (an operator's retry publishes with it too)."""
        return self._publisher_of(nc)

    def _publisher_of(self, nc: NATS) -> Publisher:
        # The link's connection is made once and reconnects in place, so one publisher (and
        # its inbox subscription, which nats-py restores on reconnect) serves for good.
        if self._publisher is None:
            self._publisher = Publisher(nc, timeout=PUBLISH_TIMEOUT_S, retries=PUBLISH_RETRIES)
        return self._publisher

    async def _check_registered(self, client: str) -> None:
        js = self._link.js
        if js is None:
            raise ApiError(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
        seen = self._registered.get(client)
        if seen is not None and time.monotonic() - seen < REGISTERED_FOR_S:
            return
        try:
            await asyncio.wait_for(check_registered(js, client), PUBLISH_TIMEOUT_S)
        except TidegateError:
            raise
        except Exception as exc:
            raise ApiError(
                HTTP_503_SERVICE_UNAVAILABLE, f"{NATS_DOWN} ({exc or 'timeout'})"
            ) from None
        self._registered[client] = time.monotonic()

    async def submit(self, client: str, spec: TaskSpec, *, max_task_bytes: int) -> Receipt:
        """Raises `UnknownClient`, `InvalidTask`, or `SubmitError` (no PubAck: it may be stored;
        the same key again is safe)."""
        await self._check_registered(client)
        # Keyed with the console's own NATS password (in its URL, when the server has users):
        # its ids, like a client's, are then none that another client can publish first.
        secret = url_id_secret(self._link.url)
        out = task_message(client, spec, max_task_bytes=max_task_bytes, secret=secret)
        nc = self._link.nc
        if nc is None or not nc.is_connected:
            raise ApiError(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
        gate = self._quota_gate()
        grant = await gate.take(client, 1)
        if not grant.allowed:
            raise BufferFull(grant.reason)
        try:
            ack = await self._publisher_of(nc).publish(out)
        except Exception:
            gate.give_back(client, grant, 1)
            raise
        if ack.duplicate:
            gate.give_back(client, grant, 1)
        return Receipt(task_id=task_id(client, spec.key), seq=ack.seq, duplicate=ack.duplicate)

    def _quota_gate(self) -> QuotaGate:
        js = self._link.js
        if js is None:
            raise ApiError(HTTP_503_SERVICE_UNAVAILABLE, NATS_DOWN)
        if self._quota is None:
            self._quota = QuotaGate(js)
        return self._quota

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()


async def read_limited(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: never read whole."""
    too_large = ApiError(
        HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        f"the task is larger than {limit} bytes, the limit (TIDEGATE_MAX_TASK_BYTES); "
        "nothing was accepted",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_SCHEMA_KEYS: Final = {
    "title": "title",
    "description": "description",
    "pattern": "pattern",
    "minimum": "minimum",
    "maximum": "maximum",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "default": "default",
    "required": "required",
}


def openapi_schema(json_schema: Mapping[str, Any]) -> Schema:
    """msgspec's JSON Schema of a flat struct as an OpenAPI schema object."""
    kwargs: dict[str, Any] = {
        _SCHEMA_KEYS[k]: v for k, v in json_schema.items() if k in _SCHEMA_KEYS
    }
    if "type" in json_schema:
        kwargs["type"] = OpenAPIType(json_schema["type"])
    if "properties" in json_schema:
        kwargs["properties"] = {k: openapi_schema(v) for k, v in json_schema["properties"].items()}
    if "items" in json_schema:
        kwargs["items"] = openapi_schema(json_schema["items"])
    if "anyOf" in json_schema:
        kwargs["any_of"] = [openapi_schema(v) for v in json_schema["anyOf"]]
    extra = json_schema.get("additionalProperties")
    if extra is not None:
        kwargs["additional_properties"] = (
            extra if isinstance(extra, bool) else openapi_schema(extra)
        )
    return Schema(**kwargs)


@dataclass
class SubmitOperation(Operation):
    """The submit route reads its body itself (the bus's decoding, within the size limit), so
    Litestar cannot see it: its OpenAPI operation names the wire's `TaskSpec` as the body."""

    def __post_init__(self) -> None:
        schema = msgspec.json.schema(TaskSpec)["$defs"]["TaskSpec"]
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=openapi_schema(schema))},
            description="the wire's task spec, as published to `tg.submit.<client>`",
            required=True,
        )


def decode_task(body: bytes) -> TaskSpec:
    """The bus's decoding (`InvalidTask`, 422, with the driver's reason), after telling a body
    that is not JSON at all (400) from a task that breaks a rule."""
    if not body.strip():
        raise ApiError(HTTP_400_BAD_REQUEST, "the body is empty: send the task spec as JSON")
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(HTTP_400_BAD_REQUEST, f"malformed JSON: {exc}") from None
    return decode_spec(body)
