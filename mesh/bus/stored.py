"""Reading one stored message by sequence, with headers as plain text.

nats-py's `get_msg` parses headers with `email.parser.BytesParser`, which returns an
`email.header.Header` object (not a `str`) for a value holding bytes that are not ASCII. Any
connection can publish such a header, and code that treats it as text (`startswith`, `strip`)
then raises on every attempt: the message could never be set aside. Every read by sequence goes
through here instead.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg


async def get_stored(
    js: JetStreamContext,
    stream: str,
    seq: int,
    *,
    subject: str | None = None,
    next: bool = False,
) -> RawStreamMsg:
    """`js.get_msg`, with every header value as `str`; raises what `get_msg` raises."""
    raw = await js.get_msg(stream, seq, subject=subject, next=next)
    if raw.headers:
        raw.headers = {str(k): str(v) for k, v in raw.headers.items()}
    return raw
