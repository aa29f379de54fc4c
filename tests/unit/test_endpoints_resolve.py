"""A command beside `tidegate up` takes the servers' URLs from endpoints.json and keeps every
other connection setting it was given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tidegate.config import Connection, Settings
from tidegate.endpoints import endpoints_path, resolve_connection
from tidegate.errors import ConfigError


def test_urls_come_from_the_file_and_the_other_settings_stay(tmp_path: Path) -> None:
    endpoints_path(tmp_path).write_text(
        json.dumps({"nats_url": "nats://op:pw@127.0.0.1:4333", "database_url": "postgresql://x"})
    )
    given = Connection(data_dir=tmp_path, nats_tls_ca="/etc/ca.pem", database_url="postgresql://y")
    found = resolve_connection(Settings(connection=given))
    assert found.nats_url == "nats://op:pw@127.0.0.1:4333"
    assert found.database_url == "postgresql://y"  # the environment's wins
    assert found.nats_tls_ca == "/etc/ca.pem"
    assert found.data_dir == tmp_path


def test_without_urls_or_a_running_up_it_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TIDEGATE_NATS_URL"):
        resolve_connection(Settings(connection=Connection(data_dir=tmp_path)))
