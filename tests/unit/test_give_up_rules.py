"""Every retry has a give-up rule: errors that retrying cannot fix end the retry at once."""

from __future__ import annotations

import psycopg
import pytest

from tidegate.bus.publish import unsendable
from tidegate.errors import BufferFull, SubmitError, Unsendable
from tidegate.store.failures import misconfigured
from tidegate.supervise import until_done

_PREFIX = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '


@pytest.mark.parametrize(
    ("text", "meaning"),
    [
        ('FATAL:  database "tg_x" does not exist', "does not exist"),
        ('FATAL:  role "nobody" does not exist', "does not exist"),
        ('FATAL:  password authentication failed for user "tidegate"', "refused the password"),
        ('FATAL:  no pg_hba.conf entry for host "127.0.0.1"', "pg_hba.conf"),
    ],
)
def test_a_login_only_an_operator_can_fix_is_named(text: str, meaning: str) -> None:
    advice = misconfigured(psycopg.OperationalError(_PREFIX + text))
    assert advice is not None and meaning in advice and "TIDEGATE_DATABASE_URL" in advice
    wrapped = RuntimeError("setup")
    wrapped.__cause__ = psycopg.OperationalError(_PREFIX + text)
    assert misconfigured(wrapped) == advice


@pytest.mark.parametrize(
    "text",
    [
        "Connection refused\n\tIs the server running on that host?",
        "FATAL:  the database system is starting up",
        "FATAL:  the database system is shutting down",
    ],
)
def test_a_database_that_is_away_is_retried(text: str) -> None:
    assert misconfigured(psycopg.OperationalError(_PREFIX + text)) is None
    assert misconfigured(ValueError("does not exist")) is None  # not a login refusal


def test_only_a_message_that_can_never_be_sent_stops_a_publish_retry() -> None:
    assert unsendable(Unsendable("too large"))
    assert not unsendable(BufferFull("full for now"))
    assert not unsendable(SubmitError("no PubAck within 5s"))


async def test_until_done_raises_at_once_when_the_rule_says_so() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise Unsendable("a message id cannot hold a line break")

    with pytest.raises(Unsendable):
        await until_done(attempt, what="publish", give_up=unsendable)
    assert calls == 1
