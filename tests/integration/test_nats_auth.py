"""Who may do what on the bus: a real nats-server with the users and permissions Tidegate
renders (embedded/natsauth.py), each identity trying what it must not do.

A refused publish is silent on the wire (the server drops it and tells the publisher through an
asynchronous error): each test shows the refusal both ways, by the error the publisher gets and
by its absence where an allowed subscriber would have seen it (an allowed publish after the
refused one, on the same connection, arrives after it would have).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from harness import wait_for
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from upharness import Up, new_up

from tidegate import names
from tidegate.bus.lease import Leases
from tidegate.bus.natsconn import round_trip
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.embedded.natsauth import AuthFiles, ClientCredentials, client_user
from tidegate.embedded.servers import EmbeddedNats
from tidegate.wire import TERMINAL_STATES, ClientRecord, TaskSpec

REFUSED_S = 1.0  # a refused request never gets an answer: it times out after this


@dataclass
class Session:
    """A connection as one user, with the errors the server sent it."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def refused(self, what: str) -> None:
        """The server told this connection that `what` (a subject) was not allowed."""

        async def seen() -> bool:
            return any("permissions violation" in e and what.lower() in e for e in self.errors)

        await wait_for(seen, timeout=15, what=f"a permissions violation for {what}")


@dataclass
class Secured:
    server: EmbeddedNats
    auth: AuthFiles
    url: str
    passwords: dict[str, str]  # component user -> password
    alpha: ClientCredentials
    beta: ClientCredentials
    sessions: list[Session] = field(default_factory=list)

    async def session(self, user: str, password: str) -> Session:
        s = Session(nc=NATS())

        async def on_error(exc: Exception) -> None:
            s.errors.append(str(exc).lower())

        await s.nc.connect(
            self.url,
            user=user,
            password=password,
            inbox_prefix=names.inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )
        self.sessions.append(s)
        return s

    async def component(self, kind: str) -> Session:
        return await self.session(kind, self.passwords[kind])

    async def client(self, creds: ClientCredentials) -> Session:
        return await self.session(creds.user, creds.password)


@pytest.fixture
def secured_server(
    tmp_path: Path,
) -> Iterator[tuple[EmbeddedNats, AuthFiles, ClientCredentials, ClientCredentials]]:
    auth = AuthFiles(tmp_path / "nats")
    auth.ensure()
    alpha, beta = auth.add_client("alpha"), auth.add_client("beta")
    server = EmbeddedNats(tmp_path / "nats", config_file=auth.conf)
    server.start()
    yield server, auth, alpha, beta
    server.stop()


@pytest.fixture
async def secured(
    secured_server: tuple[EmbeddedNats, AuthFiles, ClientCredentials, ClientCredentials],
) -> AsyncIterator[Secured]:
    server, auth, alpha, beta = secured_server
    s = Secured(server, auth, server.url, auth.credentials(), alpha, beta)
    operator = await s.component("operator")
    buckets = await ensure_all(operator.nc.jetstream(), Limits())
    for name in ("alpha", "beta"):
        record = ClientRecord(name=name, callback_url=f"https://{name}.example/cb")
        await buckets.clients.put(name, msgspec.json.encode(record))
    try:
        yield s
    finally:
        for one in s.sessions:
            if not one.nc.is_closed:
                await one.nc.close()


async def _accepts(url: str, creds: ClientCredentials) -> bool:
    try:
        nc = await nats.connect(
            url,
            user=creds.user,
            password=creds.password,
            allow_reconnect=False,
            connect_timeout=2,
        )
    except Exception:
        return False
    await nc.close()
    return True


async def _stored(operator: Session, subject: str) -> int:
    info = await operator.nc.jetstream().stream_info(
        names.TASKS_STREAM if subject.startswith("tg.submit.") else names.EVENTS_STREAM,
        subjects_filter=subject,
    )
    return sum((info.state.subjects or {}).values())


async def _collect(operator: Session, *subjects: str) -> list[Msg]:
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    for subject in subjects:
        await operator.nc.subscribe(subject, cb=on_msg)
    await round_trip(operator.nc, 5)
    return got


async def test_an_anonymous_connection_is_refused(secured: Secured) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured.url, allow_reconnect=False, connect_timeout=2)
    wrong = ClientCredentials("alpha", secured.alpha.user, "not-its-password", "")
    assert not await _accepts(secured.url, wrong)


async def test_a_client_submits_as_itself(secured: Secured) -> None:
    operator = await secured.component("operator")
    async with await TidegateClient.connect(
        secured.url,
        "alpha",
        user=secured.alpha.user,
        password=secured.alpha.password,
        inbox_prefix=secured.alpha.inbox_prefix,
    ) as tg:
        receipt = await tg.submit(TaskSpec(key="k1", argv=["true"]))
    assert receipt.task_id == "alpha:k1" and receipt.seq > 0 and not receipt.duplicate
    assert await _stored(operator, names.submit_subject("alpha")) == 1


async def test_a_client_with_credentials_in_the_url_submits_as_itself(secured: Secured) -> None:
    host = secured.url.removeprefix("nats://")
    url = f"nats://{secured.alpha.user}:{secured.alpha.password}@{host}"
    async with await TidegateClient.connect(url, "alpha") as tg:  # the inbox from the user
        receipt = await tg.submit(TaskSpec(key="k2", argv=["true"]))
    assert receipt.seq > 0


async def test_a_client_cannot_submit_as_another(secured: Secured) -> None:
    operator = await secured.component("operator")
    alpha = await secured.client(secured.alpha)
    with pytest.raises(nats.errors.TimeoutError):  # no PubAck: the server dropped it
        await alpha.nc.jetstream().publish(
            names.submit_subject("beta"),
            b'{"key": "k", "argv": ["true"]}',
            headers={"Nats-Msg-Id": "beta:k"},
            timeout=REFUSED_S,
        )
    await alpha.refused(names.submit_subject("beta"))
    assert await _stored(operator, names.submit_subject("beta")) == 0


async def test_a_client_cannot_receive_another_clients_callbacks(secured: Secured) -> None:
    operator = await secured.component("operator")
    alpha = await secured.client(secured.alpha)

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    await alpha.nc.subscribe(names.callback_subject("beta"), cb=answer)
    await alpha.nc.subscribe(names.callback_subject("alpha"), cb=answer)
    await round_trip(alpha.nc, 5)
    await alpha.refused(f'subscription to "{names.callback_subject("beta")}"')
    # Its own callbacks reach it and it may answer them; B's have nobody to go to.
    own = await operator.nc.request(names.callback_subject("alpha"), b"{}", timeout=5)
    assert own.data == b"ok"
    with pytest.raises(nats.errors.NoRespondersError):
        await operator.nc.request(names.callback_subject("beta"), b"{}", timeout=5)


async def test_a_client_cannot_publish_work_or_events(secured: Secured) -> None:
    operator = await secured.component("operator")
    alpha = await secured.client(secured.alpha)
    marker = names.submit_subject("alpha")
    got = await _collect(operator, names.WORK_ALL, names.EVENT_ALL, marker)
    forged_work = names.work_subject("default", "short", "alpha")
    forged_event = names.event_subject("alpha")
    await alpha.nc.publish(forged_work, b'{"argv": ["/bin/sh", "-c", "id"]}')
    await alpha.nc.publish(forged_event, b'{"state": "succeeded"}')
    await alpha.nc.publish(marker, b"after the forged ones")
    await round_trip(alpha.nc, 5)

    async def marker_seen() -> bool:
        return any(m.subject == marker for m in got)

    await wait_for(marker_seen, timeout=15, what="the allowed publish after the forged ones")
    assert [m.subject for m in got] == [marker]
    await alpha.refused(forged_work)
    await alpha.refused(forged_event)


async def test_a_client_cannot_read_the_clients_bucket(secured: Secured) -> None:
    alpha = await secured.client(secured.alpha)
    kv = names.kv_stream(names.CLIENTS_BUCKET)
    reads = {
        f"$JS.API.STREAM.INFO.{kv}": b"",
        f"$JS.API.STREAM.MSG.GET.{kv}": json.dumps(
            {"last_by_subj": names.kv_subject(names.CLIENTS_BUCKET, "beta")}
        ).encode(),
        f"$JS.API.DIRECT.GET.{kv}.{names.kv_subject(names.CLIENTS_BUCKET, 'beta')}": b"",
        f"$JS.API.DIRECT.GET.{kv}.{names.kv_subject(names.CLIENTS_BUCKET, 'alpha')}": b"",
        f"$JS.API.CONSUMER.CREATE.{kv}": b"{}",  # a watch
    }
    for subject, body in reads.items():
        with pytest.raises(nats.errors.TimeoutError):
            await alpha.nc.request(subject, body, timeout=REFUSED_S)
        await alpha.refused(subject)
    # Nor listen to the replies of anyone else's requests (its inbox is its own).
    await alpha.nc.subscribe("_INBOX.>")
    await round_trip(alpha.nc, 5)
    await alpha.refused('subscription to "_inbox.>"')


async def test_an_executor_cannot_submit_or_take_the_notifier_lease(secured: Secured) -> None:
    operator = await secured.component("operator")
    executor = await secured.component("executor")
    marker = names.event_subject("alpha")  # what an executor may publish
    got = await _collect(operator, names.SUBMIT_ALL, marker)
    await executor.nc.publish(names.submit_subject("alpha"), b'{"key": "x", "argv": ["id"]}')
    await executor.nc.publish(marker, b"after the forged submission")
    await round_trip(executor.nc, 5)

    async def marker_seen() -> bool:
        return any(m.subject == marker for m in got)

    await wait_for(marker_seen, timeout=15, what="the allowed publish after the forged one")
    assert [m.subject for m in got] == [marker]
    await executor.refused(names.submit_subject("alpha"))

    leases = await executor.nc.jetstream().key_value(names.LEASES_BUCKET)
    with pytest.raises(TimeoutError):  # no PubAck (nats-py's own timeout is one)
        await asyncio.wait_for(Leases(leases, "intruder").acquire(names.NOTIFIER_LEASE), 10)
    await executor.refused(names.kv_subject(names.LEASES_BUCKET, names.NOTIFIER_LEASE))
    with pytest.raises(nats.js.errors.KeyNotFoundError):  # nobody holds it
        await (await operator.nc.jetstream().key_value(names.LEASES_BUCKET)).get(
            names.NOTIFIER_LEASE
        )


async def test_an_executor_cannot_read_callback_secrets(secured: Secured) -> None:
    executor = await secured.component("executor")
    kv = names.kv_stream(names.CLIENT_SECRETS_BUCKET)
    key = names.kv_subject(names.CLIENT_SECRETS_BUCKET, "alpha")
    for subject, body in {
        f"$JS.API.DIRECT.GET.{kv}.{key}": b"",
        f"$JS.API.STREAM.MSG.GET.{kv}": json.dumps({"last_by_subj": key}).encode(),
        f"$JS.API.CONSUMER.CREATE.{kv}": b"{}",
    }.items():
        with pytest.raises(nats.errors.TimeoutError):
            await executor.nc.request(subject, body, timeout=REFUSED_S)
        await executor.refused(subject)


async def test_adding_and_removing_a_client_takes_effect_without_a_restart(
    secured: Secured,
) -> None:
    pid = secured.server.proc.pid  # type: ignore[union-attr]
    gamma = secured.auth.add_client("gamma")
    assert gamma.user == client_user("gamma") and gamma.inbox_prefix == "_INBOX_client-gamma"
    assert gamma.password not in secured.auth.conf.read_text()  # only its hash is kept
    assert secured.auth.reload() == pid
    await wait_for(lambda: _accepts(secured.url, gamma), timeout=10, what="gamma accepted")
    session = await secured.client(gamma)
    await session.nc.jetstream().publish(names.submit_subject("gamma"), b"{}", timeout=5)

    assert secured.auth.remove_client("gamma")
    assert secured.auth.reload() == pid

    async def refused() -> bool:
        return not await _accepts(secured.url, gamma)

    await wait_for(refused, timeout=10, what="gamma refused")

    async def cut_off() -> bool:  # its open connection is closed by the reload too
        return session.nc.is_closed

    await wait_for(cut_off, timeout=10, what="gamma's connection closed")
    assert secured.server.proc is not None and secured.server.proc.pid == pid
    assert secured.server.proc.poll() is None


def test_up_with_users_runs_a_clients_task_and_refuses_nothing_it_needs(
    ups: list[Up], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    up = new_up(ups, tmp_path, data).start()
    endpoints = up.wait_endpoints()
    assert endpoints["nats_auth"]["user"] == "operator"
    host = endpoints["nats_url"].rsplit("@", 1)[1]
    added = up.tidegate("client", "add", "alpha", "--callback-nats", "--json")
    assert added.returncode == 0, added.stderr
    creds = json.loads(added.stdout)
    assert creds["user"] == "client-alpha" and creds["inbox_prefix"] == "_INBOX_client-alpha"
    assert creds["password"] not in (data / "nats" / "auth.conf").read_text()

    async def submit_and_follow() -> dict[str, str]:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(f"nats://{host}", allow_reconnect=False, connect_timeout=2)
        async with (
            await TidegateClient.connect(
                f"nats://{host}",
                "alpha",
                user=creds["user"],
                password=creds["password"],
                inbox_prefix=creds["inbox_prefix"],
            ) as tg,
            tg.callbacks() as callbacks,
        ):
            await tg.submit(TaskSpec(key="hello", argv=["echo", "hi"]))
            await tg.submit(TaskSpec(key="nap", argv=["sleep", "600"]))
            await tg.cancel("nap")  # the client API, as itself
            ended: dict[str, str] = {}
            async with asyncio.timeout(60):
                async for cb in callbacks:  # its NATS callbacks, answered as it handles them
                    if cb.state in TERMINAL_STATES:
                        ended[cb.key] = cb.state
                    if len(ended) == 2:
                        break

            async def projected() -> str | None:
                task = await tg.get("hello")
                return task.state if task and task.state == "succeeded" else None

            await wait_for(projected, timeout=60, what="alpha:hello in the database")
            return ended

    assert asyncio.run(submit_and_follow()) == {"hello": "succeeded", "nap": "cancelled"}
    # The demo client's task too (`up`'s own credentials for it), through the command line.
    record = up.submit_and_wait("echo", "hi")
    assert record["exit_code"] == 0
    # (The anonymous attempt above is an "Authorization Violation": not a permission's.)
    refused = [
        line
        for line in (data / "nats" / "nats-server.log").read_text().splitlines()
        if "Publish Violation" in line or "Subscription Violation" in line
    ]
    assert not refused, "a component was refused something it needs:\n" + "\n".join(refused)
    revoked = up.tidegate("client", "credentials", "alpha", "--revoke", "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"client": "alpha", "revoked": True}
    assert up.interrupt() == 0
