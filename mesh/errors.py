"""One exception root for Tidegate; every message says what to do about it."""

from __future__ import annotations


class TidegateError(Exception):
    """Root of every error Tidegate raises on purpose."""


class ConfigError(TidegateError):
    """A setting is missing or malformed; fix the environment variable or flag it names."""


class InvalidTask(TidegateError):
    """A submitted task breaks the schema; the message is the reason sent back to the client."""


class UnknownClient(TidegateError):
    """A task or command names an unregistered client (register: `tidegate client add NAME`)."""


class SubmitError(TidegateError):
    """No PubAck for a task: it may or may not be stored; resubmit the same key (it is safe)."""


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


class UsageError(TidegateError):
    """A command or query was given a value it cannot use; the message says which."""
