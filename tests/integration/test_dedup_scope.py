"""The submission dedup cannot be hijacked: on a real nats-server with Tidegate's users and
permissions, one client publishing another's dedup id on its own subject does not make the
other's task a "duplicate" (keyed ids, names.msg_id), while a client's own resubmission still
is one. A real driver and executor run the task the forgery aimed at."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import pytest
from harness import Cluster, register, wait_for
from nats.aio.client import Client as NATS

from tidegate import names
from tidegate.bus.topology import ensure_all
from tidegate.client import TidegateClient
from tidegate.config import Limits
from tidegate.embedded.natsauth import AuthFiles, ClientCredentials, url_with_credentials
from tidegate.embedded.servers import EmbeddedNats
from tidegate.errors import ApiUnavailable
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord, TaskSpec


@dataclass
class Secured:
    """A nats-server with Tidegate's users: component passwords and two clients'."""

    server: EmbeddedNats
    passwords: dict[str, str]  # component user -> password
    alpha: ClientCredentials
    beta: ClientCredentials

    def component_url(self, kind: str) -> str:
        return url_with_credentials(self.server.url, kind, self.passwords[kind])


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    auth = AuthFiles(tmp_path / "nats")
    auth.ensure()
    alpha, beta = auth.add_client("alpha"), auth.add_client("beta")
    server = EmbeddedNats(tmp_path / "nats", config_file=auth.conf)
    server.start()
    yield Secured(server, auth.credentials(), alpha, beta)
    server.stop()


@pytest.fixture
async def streams(secured: Secured) -> Secured:
    """The streams and buckets exist (as the operator makes them)."""
    nc = await nats.connect(secured.component_url("operator"), connect_timeout=5)
    try:
        await ensure_all(nc.jetstream(), Limits())
    finally:
        await nc.close()
    return secured


@pytest.fixture
async def registered(streams: Secured, database_url: str) -> Secured:
    await migrate(database_url)
    await register(
        streams.component_url("operator"),
        database_url,
        ClientRecord(name="alpha"),
        ClientRecord(name="beta"),
    )
    return streams


@pytest.fixture
def engine(registered: Secured, database_url: str, tmp_path: Path) -> Iterator[Secured]:
    """A driver and an executor, each connected as its own NATS user."""
    cluster = Cluster(
        nats_url=registered.component_url("driver"),
        database_url=database_url,
        workdir=tmp_path / "run",
    )
    try:
        cluster.driver()
        cluster.executor(TIDEGATE_NATS_URL=registered.component_url("executor"))
        yield registered
    finally:
        cluster.stop_all()


async def connect_as(secured: Secured, creds: ClientCredentials) -> NATS:
    return await nats.connect(
        secured.server.url,
        user=creds.user,
        password=creds.password,
        inbox_prefix=creds.inbox_prefix,
        allow_reconnect=False,
        connect_timeout=5,
    )


async def sdk_as(secured: Secured, creds: ClientCredentials, client: str) -> TidegateClient:
    return await TidegateClient.connect(
        secured.server.url,
        client,
        user=creds.user,
        password=creds.password,
        inbox_prefix=creds.inbox_prefix,
    )


@pytest.fixture
async def forger(streams: Secured) -> AsyncIterator[NATS]:
    """Client alpha's own connection, with its own credentials."""
    nc = await connect_as(streams, streams.alpha)
    try:
        yield nc
    finally:
        await nc.close()


async def test_another_clients_forged_id_does_not_make_a_task_a_duplicate(
    engine: Secured, forger: NATS
) -> None:
    key = "k"
    js = forger.jetstream()
    body = msgspec.json.encode({"key": key, "argv": ["/bin/true"]})
    # Alpha, on its own subject (all its permissions allow), with beta's ids: the plain one
    # and a keyed one with a guessed tag.
    forged = [names.msg_id("beta", key), f"beta:{key}{names.KEYED_MARK}{secrets.token_hex(10)}"]
    for header in forged:
        ack = await js.publish(
            names.submit_subject("alpha"), body, headers={"Nats-Msg-Id": header}, timeout=5
        )
        assert not ack.duplicate  # stored: each one's id now sits in the dedup window

    async with await sdk_as(engine, engine.beta, "beta") as beta:
        receipt = await beta.submit(TaskSpec(key=key, argv=["/bin/true"]))
        assert receipt.task_id == "beta:k"
        assert not receipt.duplicate

        async def succeeded() -> bool:
            try:
                task = await beta.get(key)
            except ApiUnavailable:  # the driver is still starting
                return False
            return task is not None and task.state == "succeeded"

        await wait_for(succeeded, timeout=60, what="beta:k succeeded")
        task = await beta.get(key)
        assert task is not None and task.run == receipt.seq  # the run beta submitted


async def test_a_clients_own_resubmission_within_the_window_is_a_duplicate(
    streams: Secured,
) -> None:
    spec = TaskSpec(key="twice", argv=["/bin/true"])
    async with await sdk_as(streams, streams.beta, "beta") as beta:
        first = await beta.submit(spec)
        again = await beta.submit(spec)
        many = await beta.submit_many([spec])
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert many[0].duplicate and many[0].seq == first.seq


async def test_a_client_with_credentials_in_the_url_keys_its_ids_the_same(
    streams: Secured,
) -> None:
    """The password in the URL keys the ids as the `password` argument does: the same client's
    submission through either is one task."""
    beta = streams.beta
    url = url_with_credentials(streams.server.url, beta.user, beta.password)
    spec = TaskSpec(key="either-way", argv=["/bin/true"])
    async with await sdk_as(streams, beta, "beta") as by_argument:
        first = await by_argument.submit(spec)
    async with await TidegateClient.connect(url, "beta") as by_url:
        again = await by_url.submit(spec)
    assert not first.duplicate and again.duplicate and again.seq == first.seq
