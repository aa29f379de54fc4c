"""A client system's NATS credentials: issued, rotated and revoked by the command line.

Beside a running `tidegate up` the users live in its `DATA_DIR/nats` (endpoints.json says
where): a change is written there, the server is told to reload, and the command returns once
the server accepts (or refuses) the credentials. For an existing cluster an operator may keep
the users in `DATA_DIR/nats` too and put `tidegate nats-config`'s output into the servers'
configuration (then reload them: `nats-server --signal reload`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import bcrypt  # noqa: F401  (natsauth hashes with it: the `server` extra, named if missing)

from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.config import Settings

# Shared with the web console (which may not import the command line).
from tidegate.console.natscreds import RELOAD_S, issue, plain, users, wait_applied
from tidegate.embedded.natsauth import (
    COMPONENTS,
    AuthFiles,
    ClientCredentials,
    client_user,
    render_authorization,
    url_with_credentials,
)
from tidegate.endpoints import nats_users_dir, resolve_connection
from tidegate.errors import ConfigError

__all__ = ["RELOAD_S", "credentials_json", "issue", "print_credentials", "users", "wait_applied"]


def credentials_json(creds: ClientCredentials | None, name: str) -> dict[str, str | None]:
    """`client`, `user`, `password`, `inbox_prefix` (null when none were issued)."""
    if creds is None:
        return {"client": name, "user": None, "password": None, "inbox_prefix": None}
    return {**creds.as_json()}


def print_credentials(creds: ClientCredentials | None) -> None:
    """The text form, shown once; nothing when none were issued (a server whose users, if
    any, are configured on the server: README, "Who may do what on the bus")."""
    if creds is None:
        return
    print(
        f"NATS credentials (shown once): user {creds.user} password {creds.password} "
        f"inbox_prefix {creds.inbox_prefix}"
    )


def credentials(args: argparse.Namespace, command: Command) -> int:
    """`tidegate client credentials NAME [--revoke] [--json]`."""
    settings = settings_from(args, command.options)
    found = users(settings)
    if found is None:
        raise ConfigError(
            "this deployment's NATS users are not kept by Tidegate: no running `tidegate up` "
            f"with users beside {settings.connection.data_dir}, and no "
            f"{settings.connection.data_dir / 'nats' / 'users.json'}; configure the client on "
            "the NATS servers (README: Who may do what on the bus)"
        )
    if args.revoke:
        return asyncio.run(_revoke(settings, found, args.name, as_json=args.json))
    creds = asyncio.run(issue(settings, args.name))
    if args.json:
        print(json.dumps(credentials_json(creds, args.name)))
    else:
        print_credentials(creds)
    return 0


async def _revoke(settings: Settings, found: AuthFiles, name: str, *, as_json: bool) -> int:
    had = await asyncio.to_thread(found.remove_client, name)
    if had and found.reload() is not None:
        user = client_user(name)
        url = plain(resolve_connection(settings).nats_url)
        # A wrong password is refused as well: what is checked is that the user is gone.
        await wait_applied(url, user, "-", accepted=False)
    if as_json:
        print(json.dumps({"client": name, "revoked": had}))
    else:
        print(f"client {name}: NATS credentials {'revoked' if had else 'were not issued'}")
    return 0


def nats_config(args: argparse.Namespace, command: Command) -> int:
    """`tidegate nats-config`: the `authorization` block for the users of DATA_DIR/nats."""
    settings = settings_from(args, command.options)
    found = AuthFiles(nats_users_dir(settings) or settings.connection.data_dir / "nats")
    if args.from_env:
        given: dict[str, str] = {
            kind: os.environ[var]
            for kind in COMPONENTS
            if os.environ.get(var := f"TIDEGATE_NATS_{kind.upper()}_PASSWORD")
        }
        if not given:
            raise ConfigError("--from-env: no TIDEGATE_NATS_<USER>_PASSWORD variable is set")
        changed = found.set_components(given)
        print(
            f"component users from the environment: {', '.join(given)} (new hashes: "
            f"{', '.join(changed) or 'none'})",
            file=sys.stderr,
        )
    if args.init:
        made = found.ensure()
        print(
            f"component passwords in {found.credentials_path} (give each component its own "
            f"URL, nats://USER:PASSWORD@host): {', '.join(made)}",
            file=sys.stderr,
        )
    if args.url_for:
        password = found.credentials().get(args.url_for)
        if password is None or not settings.connection.nats_url:
            raise ConfigError(
                f"no password for {args.url_for!r} in {found.credentials_path} (run with "
                "--init first), or no --nats-url / TIDEGATE_NATS_URL to put it in"
            )
        print(url_with_credentials(settings.connection.nats_url, args.url_for, password))
        return 0
    hashes = found.hashes()
    if not hashes:
        raise ConfigError(
            f"no NATS users in {found.users_path}: run `tidegate nats-config --init` first"
        )
    print(render_authorization(hashes), end="")
    return 0
