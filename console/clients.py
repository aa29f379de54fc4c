"""The Clients page: one row per client system, and the changes an operator makes to them.

A change goes to PostgreSQL (the source of truth) and then to the KV mirror that every driver
and executor watches (`tidegate.registry`), so it takes effect within a second, as
`tidegate client set` does. Both servers must answer for a change: one written to the database
but not to the mirror would reach the drivers only at their next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery
from litestar.response import Redirect, Response, Template
from litestar.status_codes import (
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ControllerRouterHandler
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.clients import RegistryBuckets, decode_client
from tidegate.bus.quota import stream_ceiling
from tidegate.console.auth import actor_of, operator_only
from tidegate.console.backlog import (
    ready_by_client,
    running_by_client,
    submitted_by_client,
    work_by_client,
)
from tidegate.console.clientform import ClientForm, FormError, changes_of, parse_form
from tidegate.console.link import BusLink
from tidegate.console.natscreds import CredentialsFailed, issue_or_fail, no_users_note, plain, users
from tidegate.console.sources import kv_values, subject_totals
from tidegate.embedded.natsauth import ClientCredentials
from tidegate.endpoints import callback_nets
from tidegate.errors import StoreError, TidegateError, UnknownClient
from tidegate.registry import add_client, change_client
from tidegate.store.operators import record_action
from tidegate.store.rows import ClientHealth
from tidegate.store.store import ClientChanges, Store, permanent
from tidegate.wire import ClientRecord, decode_heartbeat

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


@dataclass
class ClientView:
    record: ClientRecord
    submitted: int = 0  # published, not routed yet
    waiting: int = 0  # routed, waiting for its turn, cap, rate or resume
    in_flight: int = 0  # dispatched to a work queue, not finished
    running: int = 0  # in an executor's heartbeat
    health: ClientHealth | None = None  # None: the database did not answer

    @property
    def backlog(self) -> int:
        return self.submitted + self.waiting


@dataclass
class ClientsPage:
    rows: list[ClientView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, in words


# --- reading -------------------------------------------------------------------------------------


async def _bus_counts(js: JetStreamContext) -> dict[str, dict[str, int]]:
    """Per client: submitted, waiting, in flight and running, from stream totals and heartbeats."""
    submitted, ready, work, heartbeats = await asyncio.gather(
        subject_totals(js, names.TASKS_STREAM, names.SUBMIT_ALL),
        subject_totals(js, names.READY_STREAM, names.READY_ALL),
        subject_totals(js, names.WORK_STREAM, names.WORK_ALL),
        kv_values(js, names.EXECUTORS_BUCKET, decode_heartbeat),
    )
    counts: dict[str, dict[str, int]] = {}
    for what, per_client in (
        ("submitted", submitted_by_client(submitted)),
        ("waiting", ready_by_client(ready)),
        ("in_flight", work_by_client(work)),
        ("running", running_by_client(heartbeats.values())),
    ):
        for client, n in per_client.items():
            counts.setdefault(client, {})[what] = n
    return counts


async def _mirrored_clients(js: JetStreamContext) -> list[ClientRecord]:
    """The clients as the drivers see them: the page's fallback while PostgreSQL is down."""
    records = await kv_values(js, names.CLIENTS_BUCKET, decode_client)
    return sorted(records.values(), key=lambda r: r.name)


async def load_page(store: Store, link: BusLink) -> ClientsPage:
    page = ClientsPage()
    records: list[ClientRecord] | None = None
    health: dict[str, ClientHealth] = {}
    try:
        records, health = await asyncio.wait_for(
            asyncio.gather(store.list_clients(), store.client_health()), READ_TIMEOUT_S
        )
    except (TimeoutError, StoreError, OSError) as exc:
        page.problems.append(f"PostgreSQL did not answer ({exc or 'timeout'}): health unknown")
    counts: dict[str, dict[str, int]] = {}
    js = link.js
    if js is None:
        page.problems.append("NATS is unreachable: backlog, in flight and running unknown")
    else:
        try:
            counts = await asyncio.wait_for(_bus_counts(js), READ_TIMEOUT_S)
            if records is None:
                records = await asyncio.wait_for(_mirrored_clients(js), READ_TIMEOUT_S)
                page.problems.append("clients shown from the drivers' mirror (KV)")
        except Exception as exc:
            page.problems.append(f"NATS did not answer ({exc or 'timeout'}): figures unknown")
    for record in records or []:
        per = counts.get(record.name, {})
        page.rows.append(
            ClientView(
                record=record,
                submitted=per.get("submitted", 0),
                waiting=per.get("waiting", 0),
                in_flight=per.get("in_flight", 0),
                running=per.get("running", 0),
                health=health.get(record.name),
            )
        )
    return page


# --- changing ------------------------------------------------------------------------------------


def _kv_or_refuse(link: BusLink) -> JetStreamContext:
    js = link.js
    if js is None:
        raise ServiceDown(
            "NATS is unreachable: the change could not reach the drivers. Nothing was changed; "
            "try again when it is back"
        )
    return js


class ServiceDown(TidegateError):
    """A change needs a server that does not answer; nothing was changed."""


async def apply_change(
    request: Request[Any, Any, Any], name: str, changes: ClientChanges, action: str
) -> ClientRecord:
    """Change a client in the database and its mirror, and audit it (secrets masked)."""
    state = request.app.state
    js = _kv_or_refuse(state.link)
    try:
        kv = await RegistryBuckets.of(js)
        record = await change_client(
            state.store,
            kv,
            name,
            allowed_nets=callback_nets(state.settings),
            ceiling=await _ceiling(state, js, changes.get("buffer_max")),
            **changes,
        )
    except StoreError as exc:
        raise _refused(exc) from None
    except TidegateError:  # an unknown client, a refused callback URL: said as it is
        raise
    except Exception as exc:  # NATS failed between the check and the mirror write
        raise ServiceDown(
            f"saved in the database, but the drivers could not be told (NATS: {exc}); "
            "save again once NATS answers"
        ) from None
    shown = {k: ("***" if k == "callback_secret" else v) for k, v in changes.items()}
    await _audit(state.store, request, action, name, shown)
    return record


async def _ceiling(state: State, js: JetStreamContext, buffer_max: int | None) -> int | None:
    """The stream-wide buffer quota a client's own must stay within, read only when one is
    being set."""
    if buffer_max is None:
        return None
    return await stream_ceiling(js, state.settings.limits.client_buffer_max)


def _refused(exc: StoreError) -> TidegateError:
    if permanent(exc):  # a constraint of the clients table: the input, not the database
        return FormError(str(exc))
    return ServiceDown(f"PostgreSQL did not take the change ({exc}); nothing was changed")


async def _audit(
    store: Store, request: Request[Any, Any, Any], action: str, target: str, details: Any
) -> None:
    try:
        await record_action(
            store, actor=actor_of(request), action=action, target=target, details=details
        )
    except Exception as exc:  # the change is made; a lost audit line is logged, not hidden
        log.warning("audit of %s on %s not recorded: %s", action, target, exc)


def _row(view: ClientView) -> Template:
    return Template(template_name="clients_row.html", context={"c": view})


async def client_view(state: State, record: ClientRecord) -> ClientView:
    page = await load_page(state.store, state.link)
    for view in page.rows:
        if view.record.name == record.name:
            return view
    return ClientView(record=record)


def _failure(exc: TidegateError) -> Response[str]:
    status = HTTP_422_UNPROCESSABLE_ENTITY if exc.exit_code == 2 else HTTP_503_SERVICE_UNAVAILABLE
    if isinstance(exc, UnknownClient):
        status = 404
    return Response(
        f'<p class="error" role="alert">{_escape(str(exc))}</p>',
        status_code=status,
        media_type="text/html",
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- routes --------------------------------------------------------------------------------------


@get("/clients", name="clients")
async def clients_page(state: State) -> Template:
    page = await load_page(state.store, state.link)
    return Template(template_name="clients.html", context={"page": page, "nav": "clients"})


@get("/clients/rows")
async def clients_rows(state: State) -> Template:
    page = await load_page(state.store, state.link)
    return Template(template_name="clients_rows.html", context={"page": page})


async def _switch(
    request: Request[Any, Any, Any], name: str, changes: ClientChanges, action: str
) -> Template | Response[str]:
    """One flag flipped from a row's button; the answer is the row, swapped in place."""
    try:
        record = await apply_change(request, name, changes, action)
    except TidegateError as exc:
        return _failure(exc)
    return _row(await client_view(request.app.state, record))


def _on(data: Mapping[str, str], field: str) -> bool:
    return data.get(field) in ("true", "on", "1")


@post("/clients/{name:str}/sensitive", guards=[operator_only])
async def set_sensitive(
    request: Request[Any, Any, Any], name: FromPath[str], data: Form
) -> Template | Response[str]:
    on = _on(data, "sensitive")
    action = "client.sensitive" if on else "client.non-sensitive"
    return await _switch(request, name, ClientChanges(sensitive=on), action)


@post("/clients/{name:str}/paused", guards=[operator_only])
async def set_paused(
    request: Request[Any, Any, Any], name: FromPath[str], data: Form
) -> Template | Response[str]:
    on = _on(data, "paused")
    action = "client.pause" if on else "client.resume"
    return await _switch(request, name, ClientChanges(paused=on), action)


@get("/clients/new")
async def new_client_form() -> Template:
    return Template(
        template_name="client_form.html", context={"record": None, "error": "", "nav": "clients"}
    )


async def _stored(state: State, name: str) -> ClientRecord | Response[str]:
    """The client as stored, or the page's answer why not."""
    try:
        record = await asyncio.wait_for(state.store.get_client(name), READ_TIMEOUT_S)
    except (TimeoutError, StoreError, OSError) as exc:
        return _failure(ServiceDown(f"PostgreSQL did not answer ({exc or 'timeout'})"))
    return record or _failure(UnknownClient(f"no client {name!r}"))


def _client_page(
    state: State,
    record: ClientRecord,
    *,
    creds: ClientCredentials | None = None,
    error: str = "",
    added: bool = False,
    status: int = 200,
) -> Template:
    """A client's page (its form), with the NATS credentials just issued shown this once."""
    context = {
        "record": record,
        "error": error,
        "added": added,
        "nats_creds": creds,
        "nats_kept": users(state.settings) is not None,
        "nats_note": no_users_note(record.name),
        "nats_url": plain(state.settings.connection.nats_url or "nats://HOST:4222"),
        "nav": "clients",
    }
    # A password on the page: no cache may keep it (the page is shown once).
    headers = {"Cache-Control": "no-store"} if creds else None
    return Template("client_form.html", context=context, status_code=status, headers=headers)


@get("/clients/{name:str}/edit")
async def edit_client_form(
    state: State, name: FromPath[str], added: FromQuery[bool] = False
) -> Template | Response[str]:
    found = await _stored(state, name)
    return found if isinstance(found, Response) else _client_page(state, found, added=added)


async def issue_credentials(
    request: Request[Any, Any, Any], record: ClientRecord, on: str
) -> ClientCredentials | None:
    """The client's NATS credentials (new ones), audited without the password; None where
    this console does not keep the server's users. Raises CredentialsFailed."""
    creds = await issue_or_fail(request.app.state.settings, record.name)
    if creds is not None:
        details = {"user": creds.user, "on": on}
        await _audit(
            request.app.state.store, request, "client.nats-credentials", record.name, details
        )
    return creds


@post("/clients/{name:str}/nats-credentials", guards=[operator_only])
async def new_nats_credentials(
    request: Request[Any, Any, Any], name: FromPath[str]
) -> Template | Response[str]:
    """New credentials (rotation: the old password is refused once the server reloaded)."""
    state = request.app.state
    found = await _stored(state, name)
    if isinstance(found, Response):
        return found
    try:
        creds = await issue_credentials(request, found, "rotate")
    except CredentialsFailed as exc:
        return _client_page(state, found, error=str(exc), status=HTTP_503_SERVICE_UNAVAILABLE)
    if creds is None:
        return _client_page(state, found, error=no_users_note(name), status=HTTP_409_CONFLICT)
    return _client_page(state, found, creds=creds)


async def add_from_form(request: Request[Any, Any, Any], form: ClientForm) -> ClientRecord:
    """Register the client a checked form describes, in the database and its mirror, and
    audit it; returns it as stored (with a generated callback secret, if one was needed)."""
    state = request.app.state
    if not form.name:
        raise FormError("name: a client needs a name (letters, digits, '_' or '-')")
    record = ClientRecord(name=form.name, **changes_of(form, None))
    js = _kv_or_refuse(state.link)
    try:
        kv = await RegistryBuckets.of(js)
        stored = await add_client(
            state.store,
            kv,
            record,
            allowed_nets=callback_nets(state.settings),
            ceiling=await _ceiling(state, js, record.buffer_max),
        )
    except StoreError as exc:
        raise _refused(exc) from None
    except TidegateError:
        raise
    except Exception as exc:  # NATS failed between the check and the mirror write
        raise ServiceDown(
            f"NATS did not answer ({exc or 'timeout'}): the client may be saved but not yet "
            "known to the drivers; look at the clients list, and save it once NATS answers"
        ) from None
    await _audit(state.store, request, "client.add", form.name, {"sensitive": form.sensitive})
    return stored


@post("/clients", guards=[operator_only])
async def create_client(request: Request[Any, Any, Any], data: Form) -> Response[Any]:
    try:
        record = await add_from_form(request, parse_form(data))
    except TidegateError as exc:
        return _form_again(None, data, exc)
    state = request.app.state
    try:
        creds = await issue_credentials(request, record, "add")
    except CredentialsFailed as exc:
        error = f"client {record.name} was added, but {exc} (New NATS credentials, below)"
        return _client_page(
            state, record, error=error, added=True, status=HTTP_503_SERVICE_UNAVAILABLE
        )
    if creds is None:  # the client's page says how to get them
        return Redirect(f"/clients/{record.name}/edit?added=1")
    return _client_page(state, record, creds=creds, added=True)


@post("/clients/{name:str}", guards=[operator_only])
async def update_client(
    request: Request[Any, Any, Any], name: FromPath[str], data: Form
) -> Response[Any]:
    state = request.app.state
    current: ClientRecord | None = None
    try:
        current = await asyncio.wait_for(state.store.get_client(name), READ_TIMEOUT_S)
        if current is None:
            raise UnknownClient(f"no client {name!r}")
        form = parse_form(data)
        await apply_change(request, name, changes_of(form, current), "client.edit")
    except TimeoutError:
        return _form_again(None, data, ServiceDown("PostgreSQL did not answer in time"))
    except TidegateError as exc:
        return _form_again(current, data, exc)
    return Redirect(f"/clients#client-{name}")


def _form_again(
    record: ClientRecord | None, data: Mapping[str, str], exc: TidegateError
) -> Template:
    status = HTTP_422_UNPROCESSABLE_ENTITY if exc.exit_code == 2 else HTTP_503_SERVICE_UNAVAILABLE
    return Template(
        template_name="client_form.html",
        context={"record": record, "error": str(exc), "values": data, "nav": "clients"},
        status_code=status,
    )


ROUTES: list[ControllerRouterHandler] = [
    clients_page,
    clients_rows,
    set_sensitive,
    set_paused,
    new_client_form,
    edit_client_form,
    create_client,
    update_client,
    new_nats_credentials,
]
