"""A client's signing secrets: which sign when (rotation's overlap), and the record every
component may read carries none."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from tidegate.cli.options import duration_s
from tidegate.wire import ClientRecord
from tidegate.wire.clients import ClientSecrets, without_secrets

NOW = datetime(2026, 12, 2, 0, 5, tzinfo=UTC)


def test_the_previous_secret_signs_only_during_its_overlap() -> None:
    secrets = ClientSecrets(current="new", previous="old", previous_until=NOW + timedelta(hours=1))
    assert secrets.signing(NOW) == ["new", "old"]  # the current one first
    assert secrets.signing(NOW + timedelta(hours=1)) == ["new"]
    assert ClientSecrets(current="new", previous="old").signing(NOW) == ["new"]  # no end: none
    assert ClientSecrets().signing(NOW) == []


def test_the_shared_record_has_no_secret_and_the_secrets_record_has_them() -> None:
    record = ClientRecord(
        name="alpha",
        callback_url="http://127.0.0.1:9/hook",
        callback_secret="new",
        callback_secret_previous="old",
        callback_secret_previous_until=NOW,
    )
    shared = without_secrets(record)
    assert (shared.callback_secret, shared.callback_secret_previous) == (None, None)
    assert shared.callback_secret_previous_until is None
    assert shared.callback_url == record.callback_url
    assert ClientSecrets.of(record) == ClientSecrets(
        current="new", previous="old", previous_until=NOW
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("0", 0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert duration_s(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10y", "-5s", "-1", ""])
def test_bad_durations_say_what_to_give(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration_s(text)
