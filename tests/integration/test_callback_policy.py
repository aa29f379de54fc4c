"""Callback URLs cannot reach internal addresses: refused when set (command line) and on every
connection the driver opens, also when a DNS name leads there. Tests allow loopback only
where they say so (harness.LOOPBACK)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import LOOPBACK, Cluster, cli
from nats.aio.client import Client as NATS
from receiver import Receiver
from test_callbacks import make_callbacks

from tidegate.driver.callbacks.transport import CallbackFailed, Transports
from tidegate.store.store import Store
from tidegate.wire import ClientRecord


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_callback_to_loopback_is_refused_at_send_time_by_default(host: str) -> None:
    async with Receiver() as rx:
        url = rx.url().replace("127.0.0.1", host)
        client = ClientRecord(name="c1", callback_url=url, callback_secret="s")
        strict = Transports(NATS(), timeout_s=2.0)  # production's default: nothing allowed
        try:
            with pytest.raises(CallbackFailed, match="loopback") as caught:
                await strict.send(client, make_callbacks("c1", 1))
        finally:
            await strict.close()
        assert rx.hits == [], "the refused request reached the receiver"
        if host == "localhost":
            assert "localhost resolves to" in str(caught.value)
        # The same receiver, with loopback allowed explicitly, is called.
        allowed = Transports(NATS(), timeout_s=2.0, allowed_nets=LOOPBACK)
        try:
            await allowed.send(client, make_callbacks("c1", 1))
        finally:
            await allowed.close()
        assert len(rx.hits) == 1


async def test_the_command_line_refuses_internal_callback_urls(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    env = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run").env()
    env.pop("TIDEGATE_CALLBACK_ALLOW_NETS")  # production's default
    for url, kind in (
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://localhost:9/hook", "loopback"),
        ("http://10.0.0.7/hook", "private"),
    ):
        refused = cli(env, "client", "add", "meta", "--callback-url", url)
        assert refused.returncode != 0 and kind in refused.stderr, refused.stderr
    async with Store(engine_db) as store:
        assert await store.get_client("meta") is None
    done = cli(env, "client", "add", "meta", "--callback-nats")
    assert done.returncode == 0, done.stderr
    refused = cli(env, "client", "set", "meta", "--callback-url", "http://[::1]:9/hook")
    assert refused.returncode != 0 and "loopback" in refused.stderr, refused.stderr
    # An operator who allows a range can use it.
    env["TIDEGATE_CALLBACK_ALLOW_NETS"] = "10.0.0.0/8"
    done = cli(env, "client", "set", "meta", "--callback-url", "http://10.0.0.7/hook")
    assert done.returncode == 0, done.stderr


async def test_client_list_never_prints_a_secret(
    nats_url: str, engine_db: str, tmp_path: Path
) -> None:
    env = Cluster(nats_url=nats_url, database_url=engine_db, workdir=tmp_path / "run").env()
    added = cli(env, "client", "add", "signed", "--callback-url", "http://127.0.0.1:9/hook")
    assert added.returncode == 0, added.stderr
    secret = next(line.rsplit(" ", 1)[1] for line in added.stdout.splitlines() if "secret" in line)
    assert secret.startswith("whsec_")
    for argv in (("client", "list"), ("client", "list", "--json")):
        listed = cli(env, *argv)
        assert listed.returncode == 0, listed.stderr
        assert secret not in listed.stdout
    listing = json.loads(cli(env, "client", "list", "--json").stdout)
    (row,) = [r for r in listing if r["name"] == "signed"]
    assert row["has_callback_secret"] is True and row["callback_secret"] is None
