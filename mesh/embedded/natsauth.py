"""Who may do what on the bus: NATS users, their permissions, and the server's `auth.conf`.

Every connection authenticates as one identity: a component kind (`driver`, `executor`,
`console`, `operator`: the command line) or one client system (`client-<name>`). Each is
allowed only the subjects and JetStream API calls its code makes (`permissions`); the
templates are the ones an operator puts into an existing cluster's configuration too
(`render_authorization`, `tidegate nats-config`).

For `tidegate up` the files live in `DATA_DIR/nats/`, all private to their user:

- `users.json`: every user's bcrypt hash (the server never sees a password);
- `credentials.json`: the passwords of the identities `up` itself starts processes as
  (components, and the `demo` client), which it must hand to them;
- `auth.conf`: rendered from `users.json`, included by nats-server (`-c`). Changing it is
  followed by a reload (SIGHUP): connected clients stay connected, a removed user's
  connections are closed by the server.

A client's password is printed once, by `tidegate client add NAME --json` (or `client
credentials NAME`), and kept nowhere but by its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from tidegate import names
from tidegate.errors import ConfigError
from tidegate.wire import NAME_RE

log = logging.getLogger(__name__)

Kind = Literal["driver", "executor", "console", "operator"]
COMPONENTS: Final[tuple[Kind, ...]] = ("driver", "executor", "console", "operator")
CLIENT_USER_PREFIX: Final = "client-"
BCRYPT_COST: Final = 10  # checked at every connect (and reconnect): ~50 ms here

AUTH_CONF: Final = "auth.conf"
USERS_FILE: Final = "users.json"
CREDENTIALS_FILE: Final = "credentials.json"
LOCK_FILE: Final = "auth.lock"

# Every stream and bucket a component makes or binds at start (topology.ensure_all): the
# executors run it too, so they may create (a no-op when it exists as configured) and read
# the configuration of these, and of nothing else.
_STREAMS: Final = (
    names.TASKS_STREAM,
    names.READY_STREAM,
    names.WORK_STREAM,
    names.EVENTS_STREAM,
    names.STATS_STREAM,
    names.DEAD_STREAM,
)
_BUCKETS: Final = (
    names.EXECUTORS_BUCKET,
    names.CLIENTS_BUCKET,
    names.CLIENT_SECRETS_BUCKET,
    names.CANCEL_BUCKET,
    names.LEASES_BUCKET,
    names.DISPATCH_BUCKET,
    names.EXECUTOR_CONTROL_BUCKET,
    names.HANDBACKS_BUCKET,
    names.NOTIFY_FENCE_BUCKET,
)
# The buckets an executor reads (gets and watches); it writes only heartbeats, its own
# control entry (drained) and hand-back counts.
_EXECUTOR_READS: Final = (
    names.CLIENTS_BUCKET,
    names.CANCEL_BUCKET,
    names.EXECUTOR_CONTROL_BUCKET,
    names.HANDBACKS_BUCKET,
)
_EXECUTOR_WRITES: Final = (
    names.EXECUTORS_BUCKET,
    names.EXECUTOR_CONTROL_BUCKET,
    names.HANDBACKS_BUCKET,
)


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # May answer requests it received (on whatever reply subject they name) once each.
    allow_responses: bool = False


def client_user(client: str) -> str:
    return CLIENT_USER_PREFIX + client


def user_inbox_prefix(user: str) -> str:
    return names.inbox_prefix(user)


def _api(*parts: str) -> str:
    return "$JS.API." + ".".join(parts)


def client_permissions(client: str) -> Permissions:
    """A client system: submit as itself, ask the API about its own tasks, receive its own
    callbacks and the replies on its own inbox (PubAcks among them). No JetStream API at
    all: a JetStream publish is a plain publish whose reply is the PubAck, and the SDK does
    not read the registry when it connects as a client (the router holds its quota)."""
    user = client_user(client)
    return Permissions(
        publish=(names.submit_subject(client), names.client_api_filter(client)),
        subscribe=(
            names.callback_subject(client),
            user_inbox_prefix(user) + ".>",
        ),
        allow_responses=True,  # the answer to a NATS callback
    )


def _executor() -> Permissions:
    kv = names.kv_stream
    work = names.WORK_STREAM
    publish = [
        names.EVENT_ALL,
        names.dead_filter("work"),  # an unreadable work message, set aside
        _api("CONSUMER", "MSG", "NEXT", work, "*"),
        _api("CONSUMER", "INFO", work, "*"),
        _api("CONSUMER", "CREATE", work, ">"),
        _api("CONSUMER", "DURABLE", "CREATE", work, "*"),
        f"$JS.ACK.{work}.>",
        # ensure_all at start: the streams and buckets exist as configured (no-ops), the
        # events stream's consumers are there, the legacy route consumer is gone.
        *(
            _api("STREAM", verb, s)
            for s in (*_STREAMS, *map(kv, _BUCKETS))
            for verb in ("CREATE", "INFO")
        ),
        _api("INFO"),  # the account's limits: making a bucket asks
        _api("CONSUMER", "INFO", names.EVENTS_STREAM, "*"),
        _api("CONSUMER", "DELETE", names.TASKS_STREAM, names.LEGACY_ROUTE_CONSUMER),
    ]
    for bucket in _EXECUTOR_READS:
        stream = kv(bucket)
        publish += [
            _api("DIRECT", "GET", stream, ">"),
            _api("STREAM", "MSG", "GET", stream),
            _api("CONSUMER", "CREATE", stream),  # watches: ordered consumers
            _api("CONSUMER", "CREATE", stream, ">"),
            _api("CONSUMER", "INFO", stream, "*"),
            _api("CONSUMER", "DELETE", stream, "*"),
            f"$JS.FC.{stream}.>",
        ]
    publish += [names.kv_subject(b, ">") for b in _EXECUTOR_WRITES]
    return Permissions(
        publish=tuple(publish),
        subscribe=("tg.exec.>",),  # its task log server (executor_log_subject)
        allow_responses=True,
    )


def _trusted() -> Permissions:
    """Drivers and the console: the engine itself, and the operators' web console acting on
    their behalf (retries, cancels, the registry, dead letters, sessions). Everything of
    Tidegate's; nobody's inbox but their own."""
    return Permissions(
        publish=("tg.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>"),
        subscribe=("tg.>", "$JS.EVENT.>"),
        allow_responses=True,
    )


def permissions(kind: Kind) -> Permissions:
    if kind == "executor":
        return _executor()
    if kind == "operator":
        return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
    return _trusted()


def _with_inbox(user: str, perms: Permissions) -> Permissions:
    if ">" in perms.subscribe:
        return perms
    return Permissions(
        publish=perms.publish,
        subscribe=(*perms.subscribe, user_inbox_prefix(user) + ".>"),
        allow_responses=perms.allow_responses,
    )


def user_permissions(user: str) -> Permissions:
    """The permissions of a user of `users.json` (a component kind or `client-<name>`)."""
    if user.startswith(CLIENT_USER_PREFIX):
        return client_permissions(user.removeprefix(CLIENT_USER_PREFIX))
    if user in COMPONENTS:
        return _with_inbox(user, permissions(user))
    raise ConfigError(f"unknown NATS user {user!r} in {USERS_FILE}")


# --- rendering --------------------------------------------------------------------------------


def _list(subjects: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in subjects) + "]"


def render_user(user: str, password_hash: str) -> str:
    p = user_permissions(user)
    return (
        f"    {{user: {json.dumps(user)}, password: {json.dumps(password_hash)}, permissions: {{\n"
        f"      publish: {{allow: {_list(p.publish)}}}\n"
        f"      subscribe: {{allow: {_list(p.subscribe)}}}\n"
        f"      allow_responses: {'true' if p.allow_responses else 'false'}\n"
        "    }}"
    )


def render_authorization(hashes: Mapping[str, str]) -> str:
    """The `authorization` block of a nats-server configuration: one user per entry of
    `hashes` (user → bcrypt hash), no anonymous access (no `no_auth_user`)."""
    users = "\n".join(render_user(u, hashes[u]) for u in sorted(hashes))
    return (
        "# Written by Tidegate (tidegate/embedded/natsauth.py); changes are overwritten.\n"
        "authorization {\n  users: [\n" + users + "\n  ]\n}\n"
    )


# --- passwords --------------------------------------------------------------------------------


def new_password() -> str:
    # URL-safe: it travels inside nats://user:password@host URLs.
    return secrets.token_urlsafe(24)


def hash_password(password: str) -> str:
    import bcrypt  # the `server` extra: only whoever writes users.json needs it

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def url_with_credentials(url: str, user: str, password: str) -> str:
    """Every server of `url` (comma-separated) with these credentials in it."""
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        out.append(urlunsplit(parts._replace(netloc=netloc)))
    return ",".join(out)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What a client system connects with, shown once."""

    client: str
    user: str
    password: str
    inbox_prefix: str

    def as_json(self) -> dict[str, str]:
        return {
            "client": self.client,
            "user": self.user,
            "password": self.password,
            "inbox_prefix": self.inbox_prefix,
        }


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _read_map(path: Path) -> dict[str, str]:
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConfigError(f"{path} is damaged ({exc}); restore it or remove it") from None
    if not isinstance(found, dict):
        raise ConfigError(f"{path} is damaged (not an object); restore it or remove it")
    return {str(k): str(v) for k, v in found.items()}


class AuthFiles:
    """The NATS users of one data directory (`DATA_DIR/nats`), read and written under a lock
    so that `up` and a command beside it never lose each other's change."""

    def __init__(self, nats_dir: Path) -> None:
        self.dir = nats_dir
        self.conf = nats_dir / AUTH_CONF
        self.users_path = nats_dir / USERS_FILE
        self.credentials_path = nats_dir / CREDENTIALS_FILE
        self.pid_file = nats_dir / "nats-server.pid"

    def exists(self) -> bool:
        return self.users_path.exists()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def hashes(self) -> dict[str, str]:
        return _read_map(self.users_path)

    def credentials(self) -> dict[str, str]:
        return _read_map(self.credentials_path)

    def _save(self, hashes: dict[str, str], credentials: dict[str, str] | None = None) -> None:
        if credentials is not None:
            _write_private(self.credentials_path, json.dumps(credentials, indent=2) + "\n")
        _write_private(self.users_path, json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        _write_private(self.conf, render_authorization(hashes))

    def ensure(self, clients: tuple[str, ...] = ()) -> dict[str, str]:
        """Every component identity, and the clients named (whose password `up` keeps: its
        own demo client), have a password and a hash; returns user → password of these."""
        with self._locked():
            hashes, creds = self.hashes(), self.credentials()
            wanted = [*COMPONENTS, *(client_user(c) for c in clients)]
            for user in wanted:
                if user not in creds or user not in hashes:
                    creds[user] = new_password()
                    hashes[user] = hash_password(creds[user])
            self._save(hashes, creds)
            return {u: creds[u] for u in wanted}

    def set_components(self, passwords: Mapping[str, str]) -> list[str]:
        """Component users with passwords chosen elsewhere (`compose.yaml`'s `.env`): a hash
        is made anew only where the password changed. Returns the users whose hash changed."""
        import bcrypt

        with self._locked():
            hashes = self.hashes()
            changed: list[str] = []
            for user, password in passwords.items():
                if user not in COMPONENTS:
                    raise ConfigError(f"{user!r} is no component user ({', '.join(COMPONENTS)})")
                known = hashes.get(user)
                if known is None or not bcrypt.checkpw(password.encode(), known.encode()):
                    hashes[user] = hash_password(password)
                    changed.append(user)
            self._save(hashes)
            return changed

    def add_client(self, client: str) -> ClientCredentials:
        """New credentials for `client` (a client that had some gets new ones: rotation)."""
        if not _is_name(client):
            raise ConfigError(f"client name {client!r} must match {NAME_RE}")
        password = new_password()
        user = client_user(client)
        with self._locked():
            hashes, creds = self.hashes(), self.credentials()
            hashes[user] = hash_password(password)
            kept = creds.pop(user, None) is not None
            if kept:  # `up`'s own (demo) client: it keeps using what it holds
                creds[user] = password
            self._save(hashes, creds if kept else None)
        return ClientCredentials(client, user, password, user_inbox_prefix(user))

    def remove_client(self, client: str) -> bool:
        """Revoke `client`'s credentials; False if it had none."""
        user = client_user(client)
        with self._locked():
            hashes, creds = self.hashes(), self.credentials()
            if hashes.pop(user, None) is None:
                return False
            had = creds.pop(user, None) is not None
            self._save(hashes, creds if had else None)
            return True

    def reload(self) -> int | None:
        """Tell the running nats-server of this directory to read `auth.conf` again (SIGHUP:
        no restart, connections stay); its pid, None when none runs."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if "nats-server" not in fh.read():
                    return None  # a stale pid file: the number belongs to something else
            os.kill(pid, signal.SIGHUP)
        except (OSError, ProcessLookupError):
            return None
        log.debug("nats-server (pid %d) told to reload %s", pid, self.conf)
        return pid


def _is_name(text: str) -> bool:
    return re.match(NAME_RE, text) is not None
