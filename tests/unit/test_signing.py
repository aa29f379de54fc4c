"""Callback signatures: Standard Webhooks, checked with the scheme's own library and with the
receiver code the README shows (run as it is printed there)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tidegate.signing import (
    LEGACY_SIGNATURE_HEADER,
    new_secret,
    signed_headers,
    verify_legacy,
)

BODY = b'{"event_id":"alpha:k@7/1/succeeded","state":"succeeded"}'
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_verify() -> Callable[..., bool]:
    text = README.read_text()
    block = re.search(r"<!-- receiver:start -->\n```python\n(.*?)```", text, re.S)
    assert block, "the README's receiver example is gone"
    scope: dict[str, Any] = {}
    exec(block.group(1), scope)  # the README's code, as a receiver would paste it
    fn: Callable[..., bool] = scope["verify"]
    return fn


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_the_schemes_own_library_verifies_what_tidegate_signs() -> None:
    secret = new_secret()
    headers = signed_headers([secret], "alpha:k@7/1/succeeded", BODY, datetime.now(UTC))
    assert Webhook(secret).verify(BODY, headers, json_parse=False) is None
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):  # the id is signed too
        Webhook(secret).verify(BODY, headers | {"webhook-id": "alpha:other"})


def test_the_readme_receiver_accepts_a_fresh_callback_and_refuses_a_replay() -> None:
    verify = readme_verify()
    secret = new_secret()
    fresh = lower(signed_headers([secret], "e1", BODY, datetime.now(UTC)))
    assert verify(secret, fresh, BODY)
    assert not verify(secret, fresh, BODY + b" ")
    assert not verify(new_secret(), fresh, BODY)
    # The same body and signature, captured and sent again ten minutes later.
    old = lower(signed_headers([secret], "e1", BODY, datetime.now(UTC) - timedelta(minutes=10)))
    assert not verify(secret, old, BODY)
    # Moving the timestamp forward breaks the signature instead.
    assert not verify(secret, old | {"webhook-timestamp": fresh["webhook-timestamp"]}, BODY)


def test_during_an_overlap_both_secrets_verify() -> None:
    verify = readme_verify()
    old_secret, new = new_secret(), new_secret()
    headers = lower(signed_headers([new, old_secret], "e2", BODY, datetime.now(UTC)))
    assert verify(new, headers, BODY) and verify(old_secret, headers, BODY)
    assert Webhook(old_secret).verify(BODY, headers, json_parse=False) is None
    after = lower(signed_headers([new], "e2", BODY, datetime.now(UTC)))
    assert verify(new, after, BODY) and not verify(old_secret, after, BODY)


def test_a_free_form_secret_signs_with_its_bytes_and_the_old_header_is_still_sent() -> None:
    headers = signed_headers(["s3cret"], "e3", BODY, datetime.now(UTC))
    assert Webhook(b"s3cret").verify(BODY, headers, json_parse=False) is None
    assert verify_legacy("s3cret", BODY, headers[LEGACY_SIGNATURE_HEADER])
