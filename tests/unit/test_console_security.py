"""The console's access rules as pure logic: throttling, redirects, headers, CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from tidegate.console.security import (
    CONTENT_SECURITY_POLICY,
    LoginThrottle,
    csrf_cookie_valid,
    csrf_secret,
    safe_next,
    security_headers,
    too_many_message,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_blocks_after_the_limit_for_the_rest_of_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=clock)
    assert throttle.fail("user:a", "addr:x") == 0
    clock.now += 10
    assert throttle.fail("user:a", "addr:x") == 0
    clock.now += 10
    assert throttle.fail("user:a", "addr:x") == pytest.approx(40)  # the first ages out at 60
    assert throttle.wait_s("user:a") == pytest.approx(40)
    assert throttle.wait_s("addr:x", "user:other") == pytest.approx(40)  # either key blocks
    assert throttle.wait_s("user:other", "addr:y") == 0
    clock.now += 40
    assert throttle.wait_s("user:a", "addr:x") == 0


def test_a_right_password_forgives_the_username_not_the_address() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, window_s=60, clock=clock)
    throttle.fail("user:a", "addr:x")
    throttle.forgive("user:a")
    throttle.fail("user:a", "addr:x")
    assert throttle.wait_s("user:a") == 0
    assert throttle.wait_s("addr:x") == pytest.approx(60)


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(max_failures=5, window_s=60, max_keys=100, clock=Clock())
    for i in range(1000):
        throttle.fail(f"user:{i}")
    assert len(throttle._failures) == 100


def test_the_throttle_message() -> None:
    assert too_many_message(299.4) == "too many failed logins, try again in 299 s"
    assert too_many_message(0.2) == "too many failed logins, try again in 1 s"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/tasks?state=failed", "/tasks?state=failed"),
        ("/", "/"),
        (None, "/"),
        ("", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/login?next=/x", "/"),
        ("/a b", "/"),
    ],
)
def test_login_only_leads_to_this_console(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def _token(secret: str, raw: str = "ab" * 32) -> str:
    return raw + hmac.new(secret.encode(), raw.encode(), hashlib.sha256).hexdigest()


def test_csrf_cookie_signature() -> None:
    assert csrf_cookie_valid(_token("s1"), "s1")
    assert not csrf_cookie_valid(_token("s1"), "s2")
    assert not csrf_cookie_valid("short", "s1")


def test_the_csrf_secret_is_kept_in_the_data_dir(tmp_path: Any) -> None:
    first = csrf_secret(tmp_path)
    assert csrf_secret(tmp_path) == first and len(first) == 64
    assert (tmp_path / "console-secret").stat().st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [tmp_path / "console-secret"]  # no temporary left


def _start(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": 200, "headers": headers}


async def _send(
    message: dict[str, Any], *, path: str = "/", scheme: str = "http"
) -> dict[str, str]:
    await security_headers(message, {"path": path, "scheme": scheme})  # type: ignore[arg-type]
    return {k.decode(): v.decode() for k, v in message["headers"]}


async def test_security_headers_and_secure_cookies() -> None:
    plain = await _send(_start([(b"set-cookie", b"tg_session=1; HttpOnly; Path=/")]))
    assert plain["x-frame-options"] == "DENY"
    assert plain["x-content-type-options"] == "nosniff"
    assert plain["referrer-policy"] == "same-origin"
    assert plain["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert plain["cache-control"] == "no-store"
    assert "Secure" not in plain["set-cookie"]

    message = _start([(b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Secure")])
    await security_headers(message, {"path": "/", "scheme": "https"})  # type: ignore[arg-type]
    cookies = [v.decode() for k, v in message["headers"] if k == b"set-cookie"]
    assert sorted(cookies) == ["a=1; Path=/; Secure", "b=2; Secure"]

    static = await _send(_start([]), path="/static/console.css")
    assert "cache-control" not in static
    own = await _send(_start([(b"x-frame-options", b"SAMEORIGIN")]))
    assert own["x-frame-options"] == "SAMEORIGIN"  # a route that says otherwise is obeyed


async def test_other_messages_are_left_alone() -> None:
    body = {"type": "http.response.body", "body": b"x"}
    await security_headers(body, {"path": "/", "scheme": "http"})  # type: ignore[arg-type]
    assert body == {"type": "http.response.body", "body": b"x"}
