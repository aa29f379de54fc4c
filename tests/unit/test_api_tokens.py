"""The JSON API's pure parts: the token cache (through a database that answers, or not),
who a token speaks for, the bearer header, error statuses and the submit body's schema."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.exceptions import PermissionDeniedException
from litestar.openapi.spec import RequestBody

from tidegate.console.api_auth import (
    TokenCache,
    TokensUnavailable,
    bearer_token,
    caller_of,
    check_own_task,
    own_client,
)
from tidegate.console.api_errors import ApiError, status_of
from tidegate.console.auth import ClientCaller, Operator
from tidegate.console.security import TokenRefused
from tidegate.console.submitter import SubmitOperation
from tidegate.errors import InvalidTask, StoreError, SubmitError, TaskNotFound, UnknownClient
from tidegate.store.tokens import ApiToken, generate_token, token_hash

TOKEN = generate_token()


class FakeStore:
    """What `find_token` asks of a store: one row by hash, or a failure."""

    def __init__(self, row: dict[str, Any] | None) -> None:
        self.row = row
        self.failing = False
        self.reads = 0

    async def fetch_one(self, query: str, params: Any, *, what: str | None = None) -> Any:
        self.reads += 1
        if self.failing:
            raise StoreError("look up an API token failed: connection refused")
        assert params == {"token_hash": token_hash(TOKEN)}
        return self.row


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock) -> TokenCache:
    return TokenCache(ttl_s=5.0, grace_s=60.0, clock=clock)


ROW = {"name": "ops", "scope": "operator", "client": None}


async def test_a_lookup_is_trusted_for_its_ttl_then_read_again() -> None:
    clock, store = Clock(), FakeStore(ROW)
    tokens = cache(clock)
    found = await tokens.lookup(store, TOKEN)  # type: ignore[arg-type]
    assert found == ApiToken(name="ops", scope="operator", client=None)
    clock.now += 4.9
    assert await tokens.lookup(store, TOKEN) == found  # type: ignore[arg-type]
    assert store.reads == 1
    store.row = None  # revoked
    clock.now += 0.2
    assert await tokens.lookup(store, TOKEN) is None  # type: ignore[arg-type]
    assert store.reads == 2
    clock.now += 1
    assert await tokens.lookup(store, TOKEN) is None  # type: ignore[arg-type]
    assert store.reads == 2  # unknown tokens are remembered too


async def test_an_outage_keeps_tokens_seen_lately_and_refuses_the_others() -> None:
    clock, store = Clock(), FakeStore(ROW)
    tokens = cache(clock)
    assert await tokens.lookup(store, TOKEN) is not None  # type: ignore[arg-type]
    store.failing = True
    clock.now += 30
    assert await tokens.lookup(store, TOKEN) is not None  # type: ignore[arg-type]
    clock.now += 31  # past the grace
    with pytest.raises(TokensUnavailable, match="cannot be checked now"):
        await tokens.lookup(store, TOKEN)  # type: ignore[arg-type]
    with pytest.raises(TokensUnavailable):
        await cache(Clock()).lookup(store, TOKEN)  # type: ignore[arg-type]


async def test_a_token_not_of_ours_costs_no_query() -> None:
    store = FakeStore(ROW)
    assert await cache(Clock()).lookup(store, "not-a-tidegate-token") is None  # type: ignore[arg-type]
    assert store.reads == 0


def test_who_a_token_speaks_for() -> None:
    assert caller_of(ApiToken(name="ops", scope="operator", client=None)) == Operator(
        username="token:ops", role="operator"
    )
    assert caller_of(ApiToken(name="d", scope="viewer", client=None)).role == "viewer"  # type: ignore[union-attr]
    bot = caller_of(ApiToken(name="bot", scope="client", client="alpha"))
    assert bot == ClientCaller(username="token:bot", client="alpha")
    assert own_client(bot, None) == "alpha" and own_client(bot, "alpha") == "alpha"
    with pytest.raises(PermissionDeniedException, match="API token of client alpha"):
        own_client(bot, "beta")
    check_own_task(bot, "alpha:k/1")
    for other in ("beta:k", "alphabet:k", "alpha"):
        with pytest.raises(PermissionDeniedException):
            check_own_task(bot, other)
    viewer = Operator(username="v", role="viewer")
    assert own_client(viewer, "beta") == "beta"
    check_own_task(viewer, "beta:k")


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer tg_abc", "tg_abc"), ("bearer  tg_abc ", "tg_abc"), ("BEARER tg_abc", "tg_abc")],
)
def test_the_bearer_header(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer   ", "tg_abc", ""])
def test_a_header_that_is_no_bearer_token(header: str) -> None:
    with pytest.raises(TokenRefused, match="must be `Bearer <token>`"):
        bearer_token(header)


def test_error_statuses() -> None:
    assert status_of(ApiError(413, "too big")) == 413
    assert status_of(InvalidTask("bad")) == 422
    assert status_of(UnknownClient("who")) == 404
    assert status_of(TaskNotFound("where")) == 404
    assert status_of(SubmitError("no PubAck")) == 503
    assert status_of(StoreError("down")) == 503


def test_the_submit_body_is_documented_as_the_wire_task_spec() -> None:
    body = SubmitOperation().request_body
    assert isinstance(body, RequestBody) and body.required
    schema = body.content["application/json"].schema
    document = schema.to_schema()  # type: ignore[union-attr]
    assert document["required"] == ["key"] and document["additionalProperties"] is False
    props = document["properties"]
    assert props["timeout_s"]["exclusiveMinimum"] == 0 and props["timeout_s"]["type"] == "number"
    assert props["argv"]["anyOf"][0] == {"type": "array", "items": {"type": "string"}}
    assert props["env"]["additionalProperties"] == {"type": "string"}
