"""Where callbacks may go (mesh/urlpolicy.py): special addresses refused unless allowed."""

from __future__ import annotations

import ipaddress

import pytest

from tidegate.errors import ConfigError
from tidegate.urlpolicy import CallbackAddressRefused, check_url_now, parse_nets, refusal

NONE = parse_nets("")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "169.254.169.254",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.5",
        "224.0.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:169.254.169.254",
    ],
)
def test_special_addresses_are_refused_by_default(address: str) -> None:
    why = refusal(ipaddress.ip_address(address), NONE)
    assert why is not None and "TIDEGATE_CALLBACK_ALLOW_NETS" in why


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::6810:84e5"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), NONE) is None


def test_an_allowed_range_lets_its_addresses_through_and_no_other() -> None:
    allowed = parse_nets("127.0.0.0/8, 10.20.0.0/16")
    assert refusal(ipaddress.ip_address("127.0.0.1"), allowed) is None
    assert refusal(ipaddress.ip_address("10.20.3.4"), allowed) is None
    assert refusal(ipaddress.ip_address("10.21.0.1"), allowed) is not None
    assert refusal(ipaddress.ip_address("169.254.169.254"), allowed) is not None


def test_a_bad_range_is_a_config_error_that_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError, match="write it as"):
        parse_nets("10.0.0.0/8,localhost")


def test_setting_a_url_checks_the_literal_and_what_a_name_resolves_to() -> None:
    with pytest.raises(CallbackAddressRefused, match="link-local"):
        check_url_now("http://169.254.169.254/latest/meta-data", NONE)
    with pytest.raises(CallbackAddressRefused, match="localhost resolves to"):
        check_url_now("http://localhost:8080/hook", NONE)
    check_url_now("http://localhost:8080/hook", parse_nets("127.0.0.0/8,::1/128"))
