"""The JSON API's errors: always `{"error": "<a reason a person can act on>"}` with a 4xx for
what the caller can fix and a 5xx only for what the servers failed at, never a 500 for input.

- Litestar's own refusals (a parameter or body it could not read, a wrong method) keep their
  status and get their details spelled out: which field, where, and what was wrong.
- Our errors (`TidegateError`) map by kind: the caller's mistakes (`exit_code` 2) are 422, a
  missing client or task 404, and a server that did not answer (NATS, PostgreSQL) 503.
- Anything else is a bug: logged with its traceback, answered 500 without details.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.responses import create_exception_response
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ExceptionHandlersMap

from tidegate.console.security import api_error, is_api_v1
from tidegate.errors import TaskNotFound, TidegateError, UnknownClient

log = logging.getLogger(__name__)

NOT_FOUND: Final[tuple[type[TidegateError], ...]] = (UnknownClient, TaskNotFound)


class ErrorOut(msgspec.Struct, frozen=True):
    """Every error answer of the API."""

    error: str


class ApiError(TidegateError):
    """A request the API refuses with `status`; the message says why, and that nothing was done
    unless it says otherwise."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_of(exc: TidegateError) -> int:
    status = getattr(exc, "status", None)  # ApiError, and the pages' own `Refused`
    if isinstance(status, int):
        return status
    if isinstance(exc, NOT_FOUND):
        return HTTP_404_NOT_FOUND
    if exc.exit_code == 2:
        return HTTP_422_UNPROCESSABLE_ENTITY
    return HTTP_503_SERVICE_UNAVAILABLE


def _where(source: Any, key: Any) -> str:
    kind = str(getattr(source, "value", source) or "")  # a ParamType, or "body"
    if kind == "body":
        return "body" if key in (None, "", "data") else f"body field `{key}`"
    if kind and key:
        return f"{kind} parameter `{key}`"
    return str(key or kind)


def _details(exc: ValidationException) -> str:
    # Litestar puts the specifics in `extra`: [{"message": ..., "key": ..., "source": ...}].
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in extra:
        if isinstance(item, dict) and item.get("message"):
            where = _where(item.get("source"), item.get("key"))
            parts.append(f"{where}: {item['message']}" if where else str(item["message"]))
    if not parts:
        return str(exc.detail)
    return "; ".join(parts)


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    message = _details(exc) if isinstance(exc, ValidationException) else str(exc.detail)
    return api_error(message, exc.status_code, headers=exc.headers)


def on_tidegate_error(request: Request[Any, Any, Any], exc: TidegateError) -> Response[Any]:
    return api_error(str(exc), status_of(exc))


def on_bug(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("the API failed on %s %s", request.method, request.url.path, exc_info=exc)
    return api_error(
        "internal error: the console logged it; nothing may have been done",
        HTTP_500_INTERNAL_SERVER_ERROR,
    )


def on_no_route(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """App-wide, for a path or method no route serves (404, 405): the API's shape under
    /api/v1, Litestar's usual answer elsewhere."""
    if is_api_v1(request.url.path):
        return on_http_error(request, exc)
    return create_exception_response(request, exc)


HANDLERS: Final[ExceptionHandlersMap] = {
    HTTPException: on_http_error,
    TidegateError: on_tidegate_error,
    Exception: on_bug,
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The OpenAPI description of a route's error answers."""
    return {
        status: ResponseSpec(
            data_container=ErrorOut, generate_examples=False, description=DESCRIBED[status]
        )
        for status in statuses
    }


DESCRIBED: Final = {
    400: "The body or a parameter could not be read (malformed JSON, a wrong type, an "
    "unknown field)",
    401: "No valid API token (or session)",
    403: "Not allowed for this token or role (or, for a session, no CSRF token)",
    404: "No such thing",
    409: "Refused in the state things are in",
    413: "The body is larger than the limit",
    422: "Readable, but refused by a rule (the reason says which)",
    503: "NATS or PostgreSQL did not answer: nothing was done (unless the reason says otherwise)",
}
