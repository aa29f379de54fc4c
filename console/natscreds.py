"""Issuing a client system's NATS credentials where Tidegate keeps the server's users.

Shared by the command line (`tidegate client add | credentials`) and the web console (a client
added on the Clients page or through the JSON API, and its "New NATS credentials" action). It
lives here, below the command line, because the console may not import `tidegate.cli`; it
needs neither Litestar nor the database, so the command line imports it without the console's
extra.

Beside a running `tidegate up` the users live in its `DATA_DIR/nats` (endpoints.json says
where): a change is written there, the server is told to reload, and `issue` returns once the
server accepts the new credentials (the old password is refused from then on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import nats

from tidegate.bus import natstls
from tidegate.bus.natsconn import servers
from tidegate.config import Settings
from tidegate.embedded.natsauth import AuthFiles, ClientCredentials
from tidegate.endpoints import nats_users_dir, resolve_connection
from tidegate.errors import ConfigError, TidegateError

log = logging.getLogger(__name__)

RELOAD_S: Final = 10.0  # how long the server may take to apply a reload


def users(settings: Settings) -> AuthFiles | None:
    """The NATS users Tidegate keeps for this deployment; None when it keeps none (a server
    without users, or a cluster whose users are configured on the servers)."""
    found = nats_users_dir(settings)
    return None if found is None else AuthFiles(found)


async def _quiet(exc: Exception) -> None:
    """A refusal is what is being waited for (or out): not worth a traceback."""


async def _accepted(url: str, user: str, password: str) -> bool:
    try:
        nc = await nats.connect(
            servers(url),
            user=user,
            password=password,
            allow_reconnect=False,
            connect_timeout=2,
            max_reconnect_attempts=0,
            error_cb=_quiet,
            tls=natstls.from_env(),  # a cluster with TLS (TIDEGATE_NATS_TLS_*)
        )
    except Exception:
        return False
    await nc.close()
    return True


async def wait_applied(url: str, user: str, password: str, *, accepted: bool) -> None:
    """Until the server accepts (or refuses) these credentials; ConfigError after RELOAD_S."""
    deadline = time.monotonic() + RELOAD_S
    while await _accepted(url, user, password) != accepted:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the NATS server did not {'accept' if accepted else 'refuse'} {user!r} within "
                f"{RELOAD_S:.0f}s of a reload; see its log (DATA_DIR/nats/nats-server.log)"
            )
        await asyncio.sleep(0.1)


def plain(url: str) -> str:
    """The servers of `url` without credentials in them (fit to show, and to connect as
    another user)."""
    out = []
    for one in servers(url):
        parts = urlsplit(one)
        out.append(urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])))
    return ",".join(out)


async def issue(settings: Settings, client: str) -> ClientCredentials | None:
    """New NATS credentials for `client`, in effect when this returns (beside a running
    `up`); None when this deployment's NATS users are not kept by Tidegate.

    Raises ConfigError (a bad name, a damaged users file, a reload the server did not apply
    in time), OSError (the users files cannot be written) or ImportError (no bcrypt: the
    `server` extra)."""
    found = users(settings)
    if found is None:
        return None
    creds = await asyncio.to_thread(found.add_client, client)
    if found.reload() is not None:
        url = plain(resolve_connection(settings).nats_url)
        await wait_applied(url, creds.user, creds.password, accepted=True)
    return creds


# --- for the console: what it says, and its one error ------------------------------------------


class CredentialsFailed(TidegateError):
    """A client's NATS credentials could not be issued (the message says why); the client
    itself is as it was."""


def no_users_note(client: str) -> str:
    """How to get credentials where this process does not keep the server's users."""
    return (
        "No NATS credentials were issued here: this console does not keep the NATS server's "
        "users (no running `tidegate up` with users beside its data directory, and no "
        "DATA_DIR/nats/users.json). A server without users needs none; on a cluster whose "
        "users are configured on the servers, the cluster's own authentication applies. Where "
        f"Tidegate keeps the users, run `tidegate client credentials {client}` beside them."
    )


async def issue_or_fail(settings: Settings, client: str) -> ClientCredentials | None:
    """`issue`, its failures as one CredentialsFailed naming the cause (for the console,
    which must answer, not crash)."""
    try:
        return await issue(settings, client)
    except ImportError:
        failure = "bcrypt is not installed here (the `server` extra) to hash the password"
    except (ConfigError, OSError) as exc:
        failure = str(exc) or type(exc).__name__
    except Exception as exc:  # a bug: logged with its traceback, answered in words
        log.exception("issuing NATS credentials for %s failed", client)
        failure = f"unexpected error ({type(exc).__name__}; the console logged it)"
    log.warning("NATS credentials for %s not issued: %s", client, failure)
    raise CredentialsFailed(
        f"the NATS credentials of client {client} were not issued: {failure} (a password "
        "issued before may no longer work); try again"
    )
