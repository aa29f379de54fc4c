"""Callback signatures.

Standard Webhooks (https://www.standardwebhooks.com): the id, the timestamp and the body are
signed together, so a captured request replayed later fails a receiver's timestamp check, and
one whose id was changed fails the signature. The older body-only `X-Tidegate-Signature` is
sent beside it during its deprecation period (see the README), signed with the current secret.

Secrets made by Tidegate have the scheme's form, `whsec_<base64 of 32 random bytes>`, and sign
with the decoded bytes, as every Standard Webhooks library expects. A free-form secret (set by
an operator, or made before this form) signs with its UTF-8 bytes: give a receiver library
those bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from standardwebhooks import Webhook

SECRET_PREFIX: Final = "whsec_"
WEBHOOK_ID_HEADER: Final = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER: Final = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER: Final = "webhook-signature"
LEGACY_SIGNATURE_HEADER: Final = "X-Tidegate-Signature"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signing_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error:
            key = b""
        if key:
            return key
    return secret.encode()


def legacy_signature(secret: str, body: bytes) -> str:
    """`X-Tidegate-Signature`: the body alone (no replay protection; deprecated)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_legacy(secret: str, body: bytes, signature: str) -> bool:
    # compare_digest on bytes: a str holding non-ASCII would raise instead of answering False.
    return hmac.compare_digest(legacy_signature(secret, body).encode(), signature.encode())


def signed_headers(keys: Sequence[str], msg_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The signature headers of one request. Every secret in `keys` signs (the current one
    first; during a rotation's overlap also the previous one), so a receiver holding either
    verifies it."""
    if not keys:
        return {}
    text = body.decode()  # our own JSON: always UTF-8
    signatures = " ".join(Webhook(signing_key(k)).sign(msg_id, at, text) for k in keys)
    return {
        WEBHOOK_ID_HEADER: msg_id,
        WEBHOOK_TIMESTAMP_HEADER: str(int(at.timestamp())),
        WEBHOOK_SIGNATURE_HEADER: signatures,
        LEGACY_SIGNATURE_HEADER: legacy_signature(keys[0], body),
    }
