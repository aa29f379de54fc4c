"""One exception root for Tidegate; every message says what to do about it.

Each class carries the command line's exit code for it (`exit_code`): 2 for bad usage or
invalid input (the caller can fix the call), 1 for everything else.
"""

from __future__ import annotations

from typing import ClassVar


class TidegateError(Exception):
    """Root of every error Tidegate raises on purpose."""

    exit_code: ClassVar[int] = 1


class BadInput(TidegateError):
    """The caller gave something Tidegate cannot use; fixing the call fixes it."""

    exit_code = 2


class ConfigError(BadInput):
    """A setting is missing or malformed; fix the environment variable or flag it names."""


class UsageError(BadInput):
    """A command or query was given a value it cannot use; the message says which."""


class InvalidTask(BadInput):
    """A submitted task breaks the schema; the message is the reason sent back to the client."""


class UnknownClient(BadInput):
    """A task or command names an unregistered client (register: `tidegate client add NAME`)."""


class MissingExtra(TidegateError):
    """A command needs an optional part of Tidegate that is not installed; install the extra."""


class SubmitError(TidegateError):
    """No PubAck for a task: it may or may not be stored; resubmit the same key (it is safe)."""


class BufferFull(SubmitError):
    """The stream is at its size limit (discard=new); back off and resubmit the same keys."""


class Unsendable(SubmitError):
    """This message can never be published as it is (larger than the server's max payload, a
    line break in its id): sending it again cannot help; shorten it or fix its id."""


class StoreError(TidegateError):
    """The database refused an operation; the message names the operation."""


class MigrationError(StoreError):
    """Applying the SQL migrations failed; nothing after the failing file was applied."""


class TaskNotFound(TidegateError):
    """No task with that id is in the database (yet: projection lags by at most a few seconds)."""


class EmbeddedServerError(TidegateError):
    """An embedded nats-server or PostgreSQL did not start; the message names its log file."""


class TopologyError(TidegateError):
    """A JetStream stream or consumer exists with settings that cannot be changed in place."""


class DeadLetterNotFound(BadInput):
    """No dead letter has that id or sequence (`tidegate dead-letters list` shows them)."""


class RedriveRefused(TidegateError):
    """A dead letter could not be re-driven; it stays a dead letter, and the message says why."""


class ClientApiError(TidegateError):
    """A client API request (read, list, cancel on `tg.api.<client>.…`) was not served; the
    message says why. `code` is the driver's reason code (wire.ErrorCode) or `no_driver`."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class ApiUnavailable(ClientApiError):
    """No driver answered, or the driver could not reach PostgreSQL or NATS: nothing was done
    (a cancel may have been; sending it again is safe). Retry later; operators: check that a
    driver runs and that its database is up."""


class ApiRefused(ClientApiError):
    """A driver refused the request: the client is not registered, the body is not what the
    operation takes, or the task is another client's. Fixing the call fixes it."""

    exit_code = 2
