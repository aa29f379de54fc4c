"""Message dead letters: a message a stage cannot process is set aside once, with its reason.

They live on the bus (the `TG_DEAD` stream), not in PostgreSQL: poison must be settable aside
while the database is down, and a stage that sets a message aside must never wait on it.

A dead letter keeps the raw payload and the original headers (under `Tidegate-Orig-`), so
`redrive` can publish the very message again to its original subject. Its own `Nats-Msg-Id`
is the origin (`<stream>:<seq>`): two drivers, or one retrying after a lost PubAck, store the
same message once. The original is settled (`term`) only after the dead letter's PubAck; when
the publish fails, the original is handed back for later (`nak` with a delay), never dropped.

Counting is the caller's: the bus does not import metrics, so `set_aside` takes a callback.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from msgspec import Struct
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tidegate import names
from tidegate.bus.stored import get_stored
from tidegate.errors import DeadLetterNotFound, RedriveRefused

log = logging.getLogger(__name__)

STAGE_HEADER = "Tidegate-Stage"
REASON_HEADER = "Tidegate-Reason"
SUBJECT_HEADER = "Tidegate-Subject"
ORIGIN_HEADER = "Tidegate-Origin"  # `<stream>:<stream seq>`, or a bucket key's revision
STREAM_SEQ_HEADER = "Tidegate-Stream-Seq"
AT_HEADER = "Tidegate-At"
ORIG_PREFIX = "Tidegate-Orig-"  # the original message's headers, kept for a redrive
MSG_ID_HEADER = "Nats-Msg-Id"

REASON_MAX = 1000  # characters of a reason kept in a header
NAK_DELAY_S = 5.0  # the dead-letter stream refused: hand the original back, try again later
PUBLISH_TIMEOUT_S = 5.0

# Headers a stream sets or interprets on publish: never copied back onto a redriven message.
_SERVER_HEADERS = ("Nats-Expected-", "Nats-Rollup", "Nats-TTL", "Status", "Description")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")

Counter = Callable[[str, str | None], None]  # (stage, client) of a message just set aside


class MessageDeadLetter(Struct, frozen=True, kw_only=True):
    """One message set aside: what it was, where it came from, and why."""

    seq: int  # its sequence in the dead-letter stream: the id to show or re-drive it by
    stage: str  # which stage set it aside (submit, route, ready, work, event, heartbeat, notify)
    client: str | None  # None when the message did not tell
    subject: str  # where it was published; a redrive publishes it there again
    reason: str
    at: datetime
    origin: str  # `<stream>:<seq>` of the original (or `<bucket>/<key>@<revision>`)
    payload: bytes
    headers: dict[str, str]  # the original message's headers


class MessageDeadLetterJson(Struct, frozen=True, kw_only=True):
    """A message dead letter as the CLI and the console's API show it: the payload as text
    (UTF-8, undecodable bytes as U+FFFD) and, exactly, in base64."""

    seq: int
    stage: str
    client: str | None
    subject: str
    reason: str
    at: datetime
    origin: str
    payload: str
    payload_base64: str
    headers: dict[str, str]

    @classmethod
    def of(cls, dead: MessageDeadLetter) -> MessageDeadLetterJson:
        return cls(
            seq=dead.seq,
            stage=dead.stage,
            client=dead.client,
            subject=dead.subject,
            reason=dead.reason,
            at=dead.at,
            origin=dead.origin,
            payload=dead.payload.decode(errors="replace"),
            payload_base64=base64.b64encode(dead.payload).decode(),
            headers=dead.headers,
        )


class Redriven(Struct, frozen=True, kw_only=True):
    """A dead letter published again: where it went, and its new place in that stream."""

    seq: int
    subject: str
    stream: str
    stream_seq: int


def header_value(text: str, limit: int = REASON_MAX) -> str:
    """A header-safe form of free text: no control characters (a newline would end the header,
    a NUL would break parsers), non-ASCII escaped, bounded."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = _UNSAFE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dead_headers(
    *,
    subject: str,
    headers: Mapping[str, str] | None,
    stage: str,
    reason: str,
    origin_id: str,
    stream_seq: int | None,
) -> dict[str, str]:
    out = {
        MSG_ID_HEADER: header_value(f"dead:{origin_id}", 500),
        STAGE_HEADER: stage,
        REASON_HEADER: header_value(reason) or "unknown",
        SUBJECT_HEADER: subject,
        ORIGIN_HEADER: header_value(origin_id, 500),
        AT_HEADER: datetime.now(UTC).isoformat(),
    }
    if stream_seq is not None:
        out[STREAM_SEQ_HEADER] = str(stream_seq)
    for name, value in (headers or {}).items():
        out[ORIG_PREFIX + name] = value
    return out


async def set_aside_raw(
    js: JetStreamContext,
    *,
    subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    stage: str,
    reason: str,
    client: str | None,
    origin_id: str,
    stream_seq: int | None = None,
    count: Counter | None = None,
) -> bool:
    """Store one dead letter; True if it is new (False: the same origin was set aside before).

    Raises what the publish raised (no stream, stream full, timeout): the caller keeps the
    original meanwhile.
    """
    ack = await js.publish(
        names.dead_subject(stage, client),
        data,
        timeout=PUBLISH_TIMEOUT_S,
        headers=_dead_headers(
            subject=subject,
            headers=headers,
            stage=stage,
            reason=reason,
            origin_id=origin_id,
            stream_seq=stream_seq,
        ),
    )
    if ack.duplicate:
        return False
    log.warning(
        "set aside a %s message of client %s from %s as dead letter %d: %s",
        stage,
        client,
        subject,
        ack.seq,
        header_value(reason, 300),
    )
    if count is not None:
        count(stage, client)
    return True


async def set_aside(
    js: JetStreamContext,
    msg: Msg,
    *,
    stage: str,
    reason: str,
    client: str | None,
    count: Counter | None = None,
    nak_delay: float = NAK_DELAY_S,
) -> bool:
    """Set a JetStream message aside as a dead letter, then terminate it.

    True once the original is settled; False when the dead letter could not be stored: the
    original was handed back (`nak` with `nak_delay`) and comes again later.
    """
    meta = msg.metadata
    stream, stream_seq = meta.stream, meta.sequence.stream
    try:
        await set_aside_raw(
            js,
            subject=msg.subject,
            data=msg.data,
            headers=msg.headers,
            stage=stage,
            reason=reason,
            client=client,
            origin_id=f"{stream}:{stream_seq}",
            stream_seq=stream_seq,
            count=count,
        )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
        log.error(
            "cannot set aside %s message %s:%d (%s); handing it back for %.0fs",
            stage,
            stream,
            stream_seq,
            exc,
            nak_delay,
        )
        try:
            await msg.nak(delay=nak_delay)
        except Exception as nak_exc:  # it comes back after its ack wait anyway
            log.warning("nak of %s:%d failed: %s", stream, stream_seq, nak_exc)
        return False
    try:
        await msg.term()
    except Exception as exc:  # stored: a redelivery is set aside again, as a duplicate
        log.warning("term of %s:%d failed: %s", stream, stream_seq, exc)
    return True


def _decode(
    seq: int,
    subject: str,
    data: bytes | None,
    headers: Mapping[str, str] | None,
    time: datetime | None,
) -> MessageDeadLetter:
    h = dict(headers or {})
    parsed = names.parse_dead_subject(subject)
    stage, client = parsed if parsed is not None else (h.get(STAGE_HEADER, "?"), None)
    at = time or datetime.now(UTC)
    if AT_HEADER in h:
        try:
            at = datetime.fromisoformat(h[AT_HEADER])
        except ValueError:
            pass
    original = {k[len(ORIG_PREFIX) :]: v for k, v in h.items() if k.startswith(ORIG_PREFIX)}
    return MessageDeadLetter(
        seq=seq,
        stage=stage,
        client=client,
        subject=h.get(SUBJECT_HEADER, ""),
        reason=h.get(REASON_HEADER, ""),
        at=at,
        origin=h.get(ORIGIN_HEADER, ""),
        payload=data or b"",
        headers=original,
    )


async def show_dead(js: JetStreamContext, seq: int) -> MessageDeadLetter | None:
    """One dead letter by its sequence, None if there is none (never was, or re-driven)."""
    if seq < 1:
        return None
    try:
        raw = await get_stored(js, names.DEAD_STREAM, seq)
    except nats.js.errors.NotFoundError:
        return None
    if raw.subject is None or raw.seq is None:
        return None
    return _decode(raw.seq, raw.subject, raw.data, raw.headers, raw.time)


async def _next(js: JetStreamContext, seq: int, subject: str) -> MessageDeadLetter | None:
    """The first dead letter at or after `seq` on `subject` (a filter), None past the end."""
    try:
        raw = await get_stored(js, names.DEAD_STREAM, seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if raw.subject is None or raw.seq is None:
        return None
    return _decode(raw.seq, raw.subject, raw.data, raw.headers, raw.time)


async def list_dead(
    js: JetStreamContext,
    *,
    stage: str | None = None,
    client: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[MessageDeadLetter]:
    """The newest dead letters first (of a stage and/or client), at most `limit`; `before`
    pages on: only sequences below it.

    Scans backwards in windows of sequences, each read forward with the server skipping what
    the filter does not match: a listing costs about one request per dead letter it returns.
    """
    try:
        info = await js.stream_info(names.DEAD_STREAM)
    except nats.js.errors.NotFoundError:
        return []  # no component has made the topology yet: nothing set aside
    first, last = info.state.first_seq, info.state.last_seq
    if before is not None:
        last = min(last, before - 1)
    subject = names.dead_filter(stage, client)
    found: list[MessageDeadLetter] = []
    window = max(4 * limit, 256)
    end = last
    while end >= max(first, 1) and len(found) < limit:
        start = max(first, end - window + 1, 1)
        chunk: list[MessageDeadLetter] = []
        seq = start
        while seq <= end:
            dead = await _next(js, seq, subject)
            if dead is None or dead.seq > end:
                break
            chunk.append(dead)
            seq = dead.seq + 1
        found.extend(reversed(chunk))
        end = start - 1
        window *= 2
    return found[:limit]


async def count_dead(js: JetStreamContext) -> int:
    """How many message dead letters there are now."""
    try:
        info = await js.stream_info(names.DEAD_STREAM)
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.state.messages)


def _redrive_headers(original: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in original.items() if not k.startswith(_SERVER_HEADERS)}


async def redrive(js: JetStreamContext, seq: int, *, new_id: bool = False) -> Redriven:
    """Publish a dead letter again to its original subject, then remove it.

    The original headers go with it, its `Nats-Msg-Id` too (a submission's id names its task).
    If that id is still in the original stream's dedup window, the stream drops the publish as
    a duplicate: the dead letter is kept and `RedriveRefused` says so. With `new_id` the
    message goes under a new id instead (the original's with a retry mark, which routing
    accepts as the same task's).
    """
    dead = await show_dead(js, seq)
    if dead is None:
        raise DeadLetterNotFound(
            f"no message dead letter {seq}: see `tidegate dead-letters list --kind message`"
        )
    if not dead.subject:
        raise RedriveRefused(f"dead letter {seq} has no original subject to re-drive it to")
    headers = _redrive_headers(dead.headers)
    if new_id:
        headers[MSG_ID_HEADER] = names.redrive_msg_id(headers.get(MSG_ID_HEADER), seq)
    try:
        ack = await js.publish(
            dead.subject, dead.payload, timeout=PUBLISH_TIMEOUT_S, headers=headers
        )
    except nats.js.errors.NoStreamResponseError as exc:
        raise RedriveRefused(
            f"no stream takes {dead.subject!r} any more; dead letter {seq} is kept"
        ) from exc
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise RedriveRefused(f"re-driving dead letter {seq} failed ({exc}); it is kept") from exc
    if ack.duplicate:
        raise RedriveRefused(
            f"{ack.stream} still holds the message id {dead.headers.get(MSG_ID_HEADER)!r} in its "
            f"dedup window and dropped the re-drive as a duplicate; dead letter {seq} is kept: "
            "re-drive it with a new id (--new-id), or after the window "
            "(TIDEGATE_DUPLICATE_WINDOW_S)"
        )
    try:
        await js.delete_msg(names.DEAD_STREAM, seq)
    except nats.js.errors.NotFoundError:
        pass  # re-driven at the same time by someone else: the stream's dedup kept one
    log.info("re-drove dead letter %d to %s (%s:%d)", seq, dead.subject, ack.stream, ack.seq)
    return Redriven(seq=seq, subject=dead.subject, stream=ack.stream, stream_seq=ack.seq)
