"""What a database error means: a message an operator can act on, and whether retrying can
ever help (the database away or not migrated yet) or never (the data itself refused)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tidegate.errors import StoreError

# The clients table's CHECK constraints, in words an operator can act on.
_CLIENT_CHECKS = {
    "clients_name_valid": "a client name is 1-64 letters, digits, '_' or '-'",
    "clients_default_pool_valid": "default_pool is 1-64 letters, digits, '_' or '-'",
    "clients_one_callback": "give a callback URL or NATS callbacks, not both",
    "clients_callback_url_http": "callback_url must start with http:// or https://",
    "clients_max_running_positive": "max_running must be 0 or more",
    "clients_max_submit_positive": "max_submit_per_s must be greater than 0",
    "clients_callback_batch_max_valid": "callback_batch_max must be 1 to 1000",
    "clients_callback_held_max_valid": "callback_held_max must be 1 to 1000000",
    "clients_buffer_max_valid": "buffer_max must be 1 or more (unset: TIDEGATE_CLIENT_BUFFER_MAX)",
    "clients_allowed_executables_valid": "allowed_executables: at most 256 absolute paths, "
    "without '..' or newlines",
    "clients_allowed_cwds_valid": "allowed_cwds: at most 256 absolute paths, without '..' or "
    "newlines",
}


@contextmanager
def failing(what: str | None) -> Iterator[None]:
    """With `what`, a database error becomes a StoreError naming it; without, it propagates as
    psycopg raised it, for a caller that tells transient errors from permanent ones."""
    if what is None:
        yield
        return
    try:
        yield
    except psycopg.errors.CheckViolation as exc:
        hint = _CLIENT_CHECKS.get(exc.diag.constraint_name or "")
        raise StoreError(f"{what}: {hint or exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"{what} failed: {exc}") from exc


def missing_partition(exc: psycopg.errors.CheckViolation) -> bool:
    return (exc.diag.message_primary or "").startswith("no partition of relation")


class RowRefused(StoreError):
    """The database refuses a row for what it holds; retrying cannot help."""


def permanent(exc: BaseException) -> bool:
    """Errors about the data (bad value, constraint, size limit), not about the database
    being unreachable or not migrated yet: those are worth retrying until they pass."""
    cause = exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else exc
    sqlstate = getattr(cause, "sqlstate", None) or ""
    return sqlstate[:2] in {"22", "23", "54"}


# Raised on our side for values that can never be sent: a NUL byte in text (psycopg's DataError
# without a SQLSTATE), a date or number out of range (OverflowError, ValueError, TypeError).
_UNSENDABLE = (psycopg.DataError, OverflowError, ValueError, TypeError, UnicodeError)


def unwritable(exc: BaseException) -> bool:
    """A row the database or the driver can never take (`permanent`, or a value refused before
    it reaches the server), as opposed to the database being away: give up, do not retry."""
    return permanent(exc) or isinstance(exc, _UNSENDABLE) or isinstance(exc.__cause__, _UNSENDABLE)


# What the server says when it refuses a login for a reason only an operator can fix. psycopg
# gives these no SQLSTATE (the refusal comes before a session exists), hence the words.
_MISCONFIGURED = (
    ("password authentication failed", "the database refused the password"),
    ("no pg_hba.conf entry", "the database's pg_hba.conf refuses this host or user"),
    ("does not exist", "the database or role named in the URL does not exist"),
)


def misconfigured(exc: BaseException) -> str | None:
    """Why connecting can never succeed as configured (a wrong password, database or role), as
    advice; None for errors worth retrying, such as a database that is down or starting up."""
    for error in (exc, exc.__cause__):
        if not isinstance(error, psycopg.OperationalError):
            continue
        text = str(error)
        for words, meaning in _MISCONFIGURED:
            if words in text:
                return (
                    f"{meaning}: fix TIDEGATE_DATABASE_URL (or the database) and the driver "
                    "tries again by itself"
                )
    return None
