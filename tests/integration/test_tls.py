"""TLS against real servers: a nats-server with `tls { … }` (and one that also verifies client
certificates), the components and the SDK across it, and the console serving HTTPS itself."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import psycopg
import pytest
import trustme
from harness import CLIENTS, Cluster, register, wait_for

from tidegate.bus.natsconn import connect
from tidegate.client import TaskSpec, TidegateClient
from tidegate.embedded.servers import EmbeddedNats, free_port
from tidegate.errors import ConfigError
from tidegate.store.migrate import migrate
from tidegate.wire import ClientRecord

PASSWORD = "correct horse battery staple"


class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    all as PEM files."""

    def __init__(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("tidegate-test-client@example.org")
        self.ca_file = where / "ca.pem"
        self.cert_file, self.key_file = where / "server.pem", where / "server.key"
        self.client_cert, self.client_key = where / "client.pem", where / "client.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server.cert_chain_pems[0].write_to_path(str(self.cert_file))
        server.private_key_pem.write_to_path(str(self.key_file))
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_nats(tmp_path: Path, pki: Pki, *, verify_clients: bool = False) -> EmbeddedNats:
    verify = f'  ca_file: "{pki.ca_file}"\n  verify: true\n' if verify_clients else ""
    config = tmp_path / "nats-tls.conf"
    config.write_text(
        f'tls {{\n  cert_file: "{pki.cert_file}"\n  key_file: "{pki.key_file}"\n{verify}}}\n'
    )
    return EmbeddedNats(tmp_path / "nats-tls", config_file=config)


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[EmbeddedNats]:
    server = tls_nats(tmp_path, pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mtls_server(tmp_path: Path, pki: Pki) -> Iterator[EmbeddedNats]:
    server = tls_nats(tmp_path, pki, verify_clients=True)
    server.start()
    yield server
    server.stop()


async def round_trip(nc: Any) -> bytes:
    sub = await nc.subscribe("tls.test")
    await nc.publish("tls.test", b"over tls")
    msg = await sub.next_msg(timeout=5)
    return bytes(msg.data)


async def test_a_component_connects_with_the_ca_setting_and_publishes_and_subscribes(
    tls_server: EmbeddedNats, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDEGATE_NATS_TLS_CA", str(pki.ca_file))
    nc = await connect(tls_server.url, "tls-test")
    try:
        assert nc._server_info["tls_required"]
        assert await round_trip(nc) == b"over tls"
    finally:
        await nc.close()


async def refused(url: str, **options: Any) -> list[Exception]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    # nats-py raises ssl's error, or its own when the server closed first.
    with pytest.raises((OSError, nats.errors.Error)):
        await nats.connect(
            url, allow_reconnect=False, connect_timeout=5, error_cb=on_error, **options
        )
    return errors


async def test_a_connection_without_the_ca_is_refused_its_certificate_unverified(
    tls_server: EmbeddedNats,
) -> None:
    errors = await refused(tls_server.url)
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in errors), errors


async def test_the_ca_setting_refuses_a_server_without_tls(
    nats_url: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDEGATE_NATS_TLS_CA", str(pki.ca_file))
    with pytest.raises(ConfigError, match="did not offer it"):
        await connect(nats_url, "tls-test")


async def test_mutual_tls_needs_the_client_certificate_settings(
    mtls_server: EmbeddedNats, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CA alone: the server asks for a certificate we do not have.
    errors = await refused(mtls_server.url, tls=pki.client_context())
    assert errors, "the server accepted a client without a certificate"
    monkeypatch.setenv("TIDEGATE_NATS_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("TIDEGATE_NATS_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("TIDEGATE_NATS_TLS_KEY", str(pki.client_key))
    nc = await connect(mtls_server.url, "mtls-test")
    try:
        assert await round_trip(nc) == b"over tls"
    finally:
        await nc.close()


async def test_a_driver_and_an_executor_run_a_task_over_tls(
    tls_server: EmbeddedNats,
    pki: Pki,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDEGATE_NATS_TLS_CA", str(pki.ca_file))  # register() connects from here
    await migrate(database_url)
    await register(tls_server.url, database_url, *(ClientRecord(name=n) for n in CLIENTS))
    cluster = Cluster(
        nats_url=tls_server.url,
        database_url=database_url,
        workdir=tmp_path / "run",
        extra_env={"TIDEGATE_NATS_TLS_CA": str(pki.ca_file)},
    )
    try:
        cluster.driver()
        cluster.executor(slots=2)
        monkeypatch.delenv("TIDEGATE_NATS_TLS_CA")  # the SDK's own context, below
        async with await TidegateClient.connect(
            tls_server.url, CLIENTS[0], tls=pki.client_context()
        ) as tg:
            await tg.submit(TaskSpec(key="over-tls", argv=["/bin/true"]))

        async def succeeded() -> bool:
            async with await psycopg.AsyncConnection.connect(database_url) as db:
                cur = await db.execute("SELECT state FROM tasks WHERE key = 'over-tls'")
                row = await cur.fetchone()
            return row is not None and row[0] == "succeeded"

        await wait_for(succeeded, timeout=60, what="the task run over TLS")
    finally:
        cluster.stop_all()


# --- the console over HTTPS ---------------------------------------------------------------------


def console_env(nats_url: str, database_url: str, data_dir: Path, pki: Pki) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env.update(
        TIDEGATE_NATS_URL=nats_url,
        TIDEGATE_DATABASE_URL=database_url,
        TIDEGATE_DATA_DIR=str(data_dir),
        TIDEGATE_CONSOLE_TLS_CERT=str(pki.cert_file),
        TIDEGATE_CONSOLE_TLS_KEY=str(pki.key_file),
    )
    return env


@pytest.fixture
def https_console(
    nats_url: str, engine_db: str, tmp_path: Path, pki: Pki
) -> Iterator[tuple[str, dict[str, str]]]:
    env = console_env(nats_url, engine_db, tmp_path, pki)
    port = free_port()
    log = (tmp_path / "console.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidegate", "console", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"https://127.0.0.1:{port}", env
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


async def test_the_console_serves_https_and_marks_its_cookies_secure(
    https_console: tuple[str, dict[str, str]], pki: Pki
) -> None:
    base, env = https_console
    added = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidegate", "operator", "add", "ana", "--password-stdin"],
        env=env,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    async with httpx.AsyncClient(base_url=base, verify=pki.client_context()) as http:

        async def healthy() -> bool:
            try:
                return (await http.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(healthy, timeout=30, what="GET /health over https")
        page = await http.get("/login")
        found = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
        assert found and page.status_code == 200, page.text
        token = found.group(1)
        answer = await http.post(
            "/login",
            data={"username": "ana", "password": PASSWORD, "next": "/", "_csrf_token": token},
            follow_redirects=False,
        )
        assert answer.status_code in (302, 303), answer.text
        cookies = [*page.headers.get_list("set-cookie"), *answer.headers.get_list("set-cookie")]
        assert cookies and all("secure" in c.lower() for c in cookies), cookies
    # Plain HTTP on the same port is not served.
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(base_url=base.replace("https", "http")) as plain:
            await plain.get("/health")


def test_a_console_certificate_without_its_key_stops_the_start(
    nats_url: str, database_url: str, tmp_path: Path, pki: Pki
) -> None:
    env = console_env(nats_url, database_url, tmp_path, pki)
    del env["TIDEGATE_CONSOLE_TLS_KEY"]
    done = subprocess.run(
        [sys.executable, "-m", "tidegate", "console", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "TIDEGATE_CONSOLE_TLS_KEY" in done.stderr and "give both" in done.stderr
