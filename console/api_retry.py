"""The JSON API's retries: a finished task's next run, one at a time or by filter
(`console.retry` does the work, for the pages too)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_422_UNPROCESSABLE_ENTITY
from litestar.types import ControllerRouterHandler

from tidegate.console import tasks
from tidegate.console.api_auth import cancellers, check_own_task, own_client
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.auth import actor_of
from tidegate.console.retry import (
    RETRY_BULK_MAX,
    BulkRetryOut,
    RetryOut,
    finished_task_ids,
    retry_many,
    start_next_run,
)
from tidegate.errors import StoreError


@post(
    "/tasks/retry",
    guards=[cancellers],
    status_code=HTTP_200_OK,
    summary="Retry a finished task as its next run (?id=CLIENT:KEY)",
    description=(
        "Submits the spec of the task's latest run again; `run` in the answer is the new run's "
        "id. Refused (409) while the latest run has not ended. Each call starts one more run."
    ),
    responses=errors(401, 403, 404, 409, 503),
)
async def retry_task(
    request: Request[Any, Any, Any],
    task: Annotated[str, QueryParameter(name="id", description="the task id, CLIENT:KEY")],
) -> RetryOut:
    check_own_task(request.user, task)
    return await start_next_run(request.app.state, task, actor=actor_of(request))


class RetryMatching(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every finished task of a filter. Without `confirm` nothing is retried: the answer says
    how many match; send again with `confirm` set to that count to retry them."""

    client: str | None = None
    state: str | None = None
    pool: str | None = None
    key: str | None = None
    since: str | None = None
    until: str | None = None
    confirm: int | None = None


@post(
    "/tasks/retry-matching",
    guards=[cancellers],
    status_code=HTTP_200_OK,
    summary="Retry every finished task of a filter, after a confirmation with the count",
    responses=errors(400, 401, 403, 422, 503),
)
async def retry_matching(
    request: Request[Any, Any, Any], data: JSONBody[RetryMatching]
) -> BulkRetryOut:
    filters = msgspec.structs.asdict(data)
    confirm = filters.pop("confirm")
    filters["client"] = own_client(request.user, data.client)
    search = tasks.parse_filters({k: v for k, v in filters.items() if v is not None})
    try:
        task_ids = await finished_task_ids(request.app.state, search)
    except (TimeoutError, StoreError, OSError) as exc:
        raise ApiError(503, f"the database did not answer ({exc or 'timeout'})") from None
    n = len(task_ids)
    if n > RETRY_BULK_MAX:
        raise ApiError(
            HTTP_422_UNPROCESSABLE_ENTITY,
            f"more than {RETRY_BULK_MAX} finished tasks match: narrow the filter",
        )
    if confirm != n:
        # The count confirmed must still be the count: a changed set is asked about again.
        return BulkRetryOut(
            matched=n,
            retried=0,
            skipped=0,
            message=f"{n} finished tasks match; nothing was retried: send again with "
            f'"confirm": {n} to retry them',
        )
    return await retry_many(
        request.app.state, task_ids, actor=actor_of(request), what=tasks.describe_search(search)
    )


ROUTES: list[ControllerRouterHandler] = [retry_task, retry_matching]
