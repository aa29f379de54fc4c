"""The JSON API's clients: the Clients page's list and changes, as JSON.

A change goes the pages' way (`tidegate.console.clients`): checked as the form is, written to
PostgreSQL and then to the KV mirror every driver and executor watches, audited. A PATCH names
only what changes; it is applied over the client as stored, so the rules across fields (an HTTP
callback needs a URL, one transport at a time) hold as in the form.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, get, patch, post
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_409_CONFLICT,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler
from msgspec import UNSET, UnsetType

from tidegate.console import clientform, clients
from tidegate.console.api_auth import staff_only
from tidegate.console.api_errors import ApiError, errors
from tidegate.console.auth import operator_only
from tidegate.console.natscreds import CredentialsFailed, no_users_note
from tidegate.embedded.natsauth import ClientCredentials
from tidegate.errors import StoreError, UnknownClient
from tidegate.store.rows import ClientHealth
from tidegate.store.store import ClientChanges
from tidegate.wire import DEFAULT_CALLBACK_HELD_MAX, ClientRecord

Transport = Literal["none", "http", "nats"]


class ClientOut(msgspec.Struct, frozen=True, kw_only=True):
    """A client as the Clients page shows it (its callback secret is never shown)."""

    name: str
    sensitive: bool
    paused: bool
    transport: Transport
    callback_url: str | None
    callback_batch_max: int
    callback_held_max: int
    buffer_max: int | None  # its own quota of waiting tasks; null: TIDEGATE_CLIENT_BUFFER_MAX
    # Its command policy, checked where its tasks are routed; null lists: any.
    allowed_executables: list[str] | None
    allowed_cwds: list[str] | None
    allow_shell: bool
    max_running: int | None
    max_submit_per_s: float | None
    default_pool: str
    submitted: int  # published, not routed yet
    waiting: int  # routed, waiting for its turn, cap, rate or resume
    in_flight: int  # dispatched to a work queue, not finished
    running: int  # in an executor's heartbeat
    backlog: int  # submitted + waiting
    health: ClientHealth | None  # null: the database did not answer
    created_at: datetime | None
    updated_at: datetime | None


class ClientList(msgspec.Struct, frozen=True, kw_only=True):
    clients: list[ClientOut]
    problems: list[str]  # what could not be read (figures shown as 0 there), in words


class NatsCredentialsOut(msgspec.Struct, frozen=True, kw_only=True):
    """What the client system connects to NATS with (`TidegateClient.connect(url, name,
    user=…, password=…, inbox_prefix=…)`); the password is shown this once."""

    user: str
    password: str
    inbox_prefix: str


class ClientSaved(msgspec.Struct, frozen=True, kw_only=True):
    client: ClientOut
    # The HTTP callback secret, when this request set or generated it: shown this once.
    callback_secret: str | None = None
    # Its NATS credentials, when this request issued them (an add): shown this once.
    nats_credentials: NatsCredentialsOut | None = None
    # Why an add issued none, and how to get them (this console does not keep the users).
    nats_credentials_note: str | None = None


class NatsCredentialsIssued(msgspec.Struct, frozen=True, kw_only=True):
    client: str
    nats_credentials: NatsCredentialsOut


class ClientNew(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A client to register (as the Clients page's form); limits absent mean none."""

    name: str
    sensitive: bool = False
    transport: Transport = "none"
    callback_url: str | None = None
    callback_secret: str | None = None  # http without one: generated, and answered once
    max_running: int | None = None
    max_submit_per_s: float | None = None
    default_pool: str = "default"
    callback_batch_max: int = 1
    callback_held_max: int = DEFAULT_CALLBACK_HELD_MAX
    buffer_max: int | None = None  # its own quota of waiting tasks; null: the stream-wide one
    # Absolute paths or globs argv[0] must match, directories cwd must be under; null: any.
    allowed_executables: list[str] | None = None
    allowed_cwds: list[str] | None = None
    allow_shell: bool = True


class ClientPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What changes; a field left out stays as it is (`null` clears a limit)."""

    sensitive: bool | UnsetType = UNSET
    paused: bool | UnsetType = UNSET
    transport: Transport | UnsetType = UNSET
    callback_url: str | UnsetType | None = UNSET  # given alone: switches to HTTP callbacks
    callback_secret: str | UnsetType | None = UNSET
    new_secret: bool | UnsetType = UNSET  # generate a new HTTP callback secret
    max_running: int | UnsetType | None = UNSET
    max_submit_per_s: float | UnsetType | None = UNSET
    default_pool: str | UnsetType = UNSET
    callback_batch_max: int | UnsetType = UNSET
    callback_held_max: int | UnsetType = UNSET
    buffer_max: int | UnsetType | None = UNSET  # null: back to the stream-wide quota
    allowed_executables: list[str] | UnsetType | None = UNSET  # replaces the list; null: any
    allowed_cwds: list[str] | UnsetType | None = UNSET  # replaces the list; null: any
    allow_shell: bool | UnsetType = UNSET


def transport_of(record: ClientRecord) -> Transport:
    if record.callback_url:
        return "http"
    return "nats" if record.callback_nats else "none"


def client_out(view: clients.ClientView) -> ClientOut:
    r = view.record
    return ClientOut(
        name=r.name,
        sensitive=r.sensitive,
        paused=r.paused,
        transport=transport_of(r),
        callback_url=r.callback_url,
        callback_batch_max=r.callback_batch_max,
        callback_held_max=r.callback_held_max,
        buffer_max=r.buffer_max,
        allowed_executables=_listed(r.allowed_executables),
        allowed_cwds=_listed(r.allowed_cwds),
        allow_shell=r.allow_shell,
        max_running=r.max_running,
        max_submit_per_s=r.max_submit_per_s,
        default_pool=r.default_pool,
        submitted=view.submitted,
        waiting=view.waiting,
        in_flight=view.in_flight,
        running=view.running,
        backlog=view.backlog,
        health=view.health,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def form_values(record: ClientRecord) -> dict[str, Any]:
    """The Clients page's form as it would open for `record` (its secret stays unsaid: an
    empty secret field keeps the stored one)."""
    return {
        "name": record.name,
        "sensitive": record.sensitive,
        "transport": transport_of(record),
        "callback_url": record.callback_url,
        "max_running": record.max_running,
        "max_submit_per_s": record.max_submit_per_s,
        "default_pool": record.default_pool,
        "callback_batch_max": record.callback_batch_max,
        "callback_held_max": record.callback_held_max,
        "buffer_max": record.buffer_max,
        "allowed_executables": _listed(record.allowed_executables),
        "allowed_cwds": _listed(record.allowed_cwds),
        "allow_shell": record.allow_shell,
    }


def _listed(entries: tuple[str, ...] | None) -> list[str] | None:
    return None if entries is None else list(entries)


def action_of(changes: msgspec.Struct) -> str:
    """The audit action the pages would write: one flag flipped has its own name."""
    given = {k: v for k, v in msgspec.structs.asdict(changes).items() if v is not UNSET}
    if given.keys() == {"sensitive"}:
        return "client.sensitive" if given["sensitive"] else "client.non-sensitive"
    if given.keys() == {"paused"}:
        return "client.pause" if given["paused"] else "client.resume"
    return "client.edit"


async def _saved(
    request: Request[Any, Any, Any],
    record: ClientRecord,
    secret: str | None,
    creds: ClientCredentials | None = None,
    note: str | None = None,
) -> ClientSaved:
    view = await clients.client_view(request.app.state, record)
    return ClientSaved(
        client=client_out(view),
        callback_secret=secret,
        nats_credentials=None if creds is None else _creds_out(creds),
        nats_credentials_note=note,
    )


def _creds_out(creds: ClientCredentials) -> NatsCredentialsOut:
    return NatsCredentialsOut(
        user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix
    )


async def _issue(
    request: Request[Any, Any, Any], record: ClientRecord, on: str
) -> ClientCredentials | None:
    """As the pages issue them; a failure is a 503 saying what was done already."""
    try:
        return await clients.issue_credentials(request, record, on)
    except CredentialsFailed as exc:
        done = f"client {record.name} was added, but " if on == "add" else ""
        raise ApiError(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"{done}{exc} (POST /api/v1/clients/{record.name}/nats-credentials)",
        ) from None


@get(
    "/clients",
    guards=[staff_only],
    summary="Client systems, as the Clients page shows them",
    responses=errors(401, 403),
)
async def list_clients(request: Request[Any, Any, Any]) -> ClientList:
    state = request.app.state
    page = await clients.load_page(state.store, state.link)
    return ClientList(clients=[client_out(v) for v in page.rows], problems=page.problems)


@post(
    "/clients",
    guards=[operator_only],
    status_code=HTTP_201_CREATED,
    summary="Register a client system",
    responses=errors(400, 401, 403, 422, 503),
)
async def add_client(request: Request[Any, Any, Any], data: JSONBody[ClientNew]) -> ClientSaved:
    form = clientform.form_from(msgspec.structs.asdict(data))
    record = await clients.add_from_form(request, form)
    shown = record.callback_secret if record.callback_url else None
    creds = await _issue(request, record, "add")
    note = None if creds is not None else no_users_note(record.name)
    return await _saved(request, record, shown, creds, note)


async def _current(request: Request[Any, Any, Any], name: str) -> ClientRecord:
    try:
        current: ClientRecord | None = await asyncio.wait_for(
            request.app.state.store.get_client(name), clients.READ_TIMEOUT_S
        )
    except (TimeoutError, StoreError, OSError) as exc:
        raise ApiError(
            HTTP_503_SERVICE_UNAVAILABLE,
            f"PostgreSQL did not answer ({exc or 'timeout'}); nothing was changed",
        ) from None
    if current is None:
        raise UnknownClient(f"no client {name!r}; see GET /api/v1/clients")
    return current


@patch(
    "/clients/{name:str}",
    guards=[operator_only],
    summary="Change a client: sensitive, paused, callbacks, limits (live within a second)",
    responses=errors(400, 401, 403, 404, 422, 503),
)
async def change_client(
    request: Request[Any, Any, Any],
    name: Annotated[str, PathParameter(description="the client's name")],
    data: JSONBody[ClientPatch],
) -> ClientSaved:
    current = await _current(request, name)
    given = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not UNSET}
    paused = given.pop("paused", None)
    if given.get("callback_url") and "transport" not in given:
        given["transport"] = "http"
    form = clientform.form_from({**form_values(current), **given})
    # Only what differs from the stored client: the audit line then says what changed.
    changes = ClientChanges()
    for column, value in clientform.changes_of(form, current).items():
        if getattr(current, column) != value:
            changes[column] = value  # type: ignore[literal-required]
    if paused is not None and paused != current.paused:
        changes["paused"] = paused
    record = await clients.apply_change(request, name, changes, action_of(data))
    secret = changes.get("callback_secret")
    return await _saved(request, record, secret if secret != current.callback_secret else None)


@post(
    "/clients/{name:str}/nats-credentials",
    guards=[operator_only],
    status_code=HTTP_200_OK,
    summary="New NATS credentials for a client (the old password is refused from then on)",
    responses=errors(401, 403, 404, 409, 503),
)
async def new_nats_credentials(
    request: Request[Any, Any, Any],
    name: Annotated[str, PathParameter(description="the client's name")],
) -> NatsCredentialsIssued:
    current = await _current(request, name)
    creds = await _issue(request, current, "rotate")
    if creds is None:
        raise ApiError(HTTP_409_CONFLICT, no_users_note(name))
    return NatsCredentialsIssued(client=name, nats_credentials=_creds_out(creds))


ROUTES: list[ControllerRouterHandler] = [
    list_clients,
    add_client,
    change_client,
    new_nats_credentials,
]
