"""The NATS users' permission templates and the files `tidegate up` keeps them in."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tidegate import names
from tidegate.bus.natsconn import url_user
from tidegate.config import Connection, Settings
from tidegate.embedded.natsauth import (
    COMPONENTS,
    AuthFiles,
    client_permissions,
    render_authorization,
    url_with_credentials,
    user_permissions,
)
from tidegate.endpoints import nats_users_dir
from tidegate.errors import ConfigError


def test_a_client_may_publish_only_its_own_submissions_and_api_requests() -> None:
    p = client_permissions("billing")
    assert p.publish == ("tg.submit.billing", "tg.api.billing.>")
    assert p.subscribe == ("tg.callback.billing", "_INBOX_client-billing.>")
    assert p.allow_responses  # it answers its NATS callbacks


def test_an_executor_may_not_submit_take_leases_or_read_secrets() -> None:
    p = user_permissions("executor")
    published = " ".join(p.publish)
    assert not any(s.startswith(("tg.submit", "tg.api", "tg.work", "tg.>")) for s in p.publish)
    assert names.kv_subject(names.LEASES_BUCKET, ">") not in p.publish
    assert names.kv_subject(names.CLIENTS_BUCKET, ">") not in p.publish
    secrets = names.kv_stream(names.CLIENT_SECRETS_BUCKET)
    assert f"DIRECT.GET.{secrets}" not in published and f"MSG.GET.{secrets}" not in published
    assert f"CONSUMER.CREATE.{secrets}" not in published
    assert names.EVENT_ALL in p.publish and "$JS.ACK.TG_WORK.>" in p.publish
    assert p.subscribe == ("tg.exec.>", "_INBOX_executor.>")


def test_components_listen_only_on_their_own_inbox() -> None:
    for kind in ("driver", "console", "executor"):
        subscribe = user_permissions(kind).subscribe
        assert f"_INBOX_{kind}.>" in subscribe and "_INBOX.>" not in subscribe
        assert ">" not in subscribe
    assert user_permissions("operator").publish == (">",)  # the operator may do anything


def test_unknown_users_are_refused() -> None:
    with pytest.raises(ConfigError):
        user_permissions("mallory")


def test_the_rendered_block_names_each_user_with_its_hash_and_no_anonymous_user() -> None:
    text = render_authorization({"driver": "$2b$10$d", "client-a": "$2b$10$a"})
    assert text.count("{user: ") == 2
    assert '{user: "client-a", password: "$2b$10$a"' in text
    assert 'allow: ["tg.submit.a", "tg.api.a.>"]' in text
    assert "no_auth_user" not in text
    assert text.index('"client-a"') < text.index('"driver"')  # stable order


def test_credentials_go_into_every_server_of_a_url() -> None:
    url = url_with_credentials("nats://a:1, nats://old:pw@b:2", "driver", "p-w_x")
    assert url == "nats://driver:p-w_x@a:1,nats://driver:p-w_x@b:2"
    assert url_user(url) == "driver"
    assert url_user("nats://a:1") is None
    assert url_user("nats://sometoken@a:1") is None  # a token is no user: no inbox from it


def test_inbox_prefixes_of_clients_and_components_never_meet() -> None:
    # A client named like a component gets another inbox than that component.
    assert names.inbox_prefix("client-driver") != names.inbox_prefix("driver")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_keep_passwords_private_and_hashes_only_in_the_config(tmp_path: Path) -> None:
    auth = AuthFiles(tmp_path / "nats")
    first = auth.ensure(("demo",))
    assert set(first) == {*COMPONENTS, "client-demo"}
    assert auth.ensure(("demo",)) == first  # kept across runs
    conf = auth.conf.read_text()
    for password in first.values():
        assert password not in conf
    for path in (auth.conf, auth.users_path, auth.credentials_path):
        assert _mode(path) == 0o600, path

    creds = auth.add_client("billing")
    assert creds.user == "client-billing" and creds.inbox_prefix == "_INBOX_client-billing"
    assert '"client-billing"' in auth.conf.read_text()
    assert "client-billing" not in auth.credentials()  # shown once, kept by its holder only
    rotated = auth.add_client("billing")
    assert rotated.password != creds.password
    assert auth.hashes()["client-billing"] not in conf

    assert auth.remove_client("billing")
    assert '"client-billing"' not in auth.conf.read_text()
    assert not auth.remove_client("billing")
    with pytest.raises(ConfigError):
        auth.add_client("bad.name")


def test_a_reload_without_a_running_server_does_nothing(tmp_path: Path) -> None:
    auth = AuthFiles(tmp_path / "nats")
    assert auth.reload() is None
    (tmp_path / "nats").mkdir()
    auth.pid_file.write_text("1\n")  # pid 1 is no nats-server
    assert auth.reload() is None


def test_the_users_kept_are_those_of_the_running_up_else_the_data_dirs(tmp_path: Path) -> None:
    settings = Settings(connection=Connection(data_dir=tmp_path))
    assert nats_users_dir(settings) is None  # nothing kept: the server's users are not ours
    AuthFiles(tmp_path / "nats").ensure()
    assert nats_users_dir(settings) == tmp_path / "nats"
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps({"nats_auth": {"auth_conf": "/elsewhere/nats/auth.conf"}}))
    assert nats_users_dir(settings) == Path("/elsewhere/nats")
    endpoints.write_text(json.dumps({"nats_auth": None}))  # `up --no-nats-auth`
    assert nats_users_dir(settings) is None
