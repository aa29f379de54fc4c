"""The TLS settings: a certificate needs its key, and unreadable files are refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidegate.bus.natstls import from_env, tls_context, wants_tls
from tidegate.config import Settings
from tidegate.console.app import check_tls_files
from tidegate.errors import ConfigError


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ("TIDEGATE_CONSOLE_TLS_CERT", "TIDEGATE_CONSOLE_TLS_KEY"),
        ("TIDEGATE_CONSOLE_TLS_KEY", "TIDEGATE_CONSOLE_TLS_CERT"),
        ("TIDEGATE_NATS_TLS_CERT", "TIDEGATE_NATS_TLS_KEY"),
        ("TIDEGATE_NATS_TLS_KEY", "TIDEGATE_NATS_TLS_CERT"),
    ],
)
def test_a_certificate_without_its_key_is_a_config_error_naming_both(
    given: str, missing: str
) -> None:
    with pytest.raises(ConfigError, match=f"{given} is set but {missing} is not: give both"):
        Settings.from_env({given: "/etc/some.pem"})


def test_no_tls_settings_mean_no_context() -> None:
    assert from_env({}) is None
    assert not wants_tls("nats://127.0.0.1:4222", None)
    assert wants_tls("nats://a:4222,tls://b:4222", None)


def test_unreadable_tls_files_are_refused_with_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TIDEGATE_NATS_TLS_CA=.*readable PEM"):
        tls_context(str(tmp_path / "no-such-ca.pem"))
    with pytest.raises(ConfigError, match=r"TIDEGATE_CONSOLE_TLS_CERT=.*readable PEM"):
        check_tls_files(str(tmp_path / "no.pem"), str(tmp_path / "no.key"))
