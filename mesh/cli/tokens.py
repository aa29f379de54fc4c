"""`tidegate token add | list | revoke`: the API tokens of the console's JSON API.

Only PostgreSQL is needed. A token is printed once, when it is made: only its hash is stored.
Every change writes its audit line (actor "cli") in the same transaction as the change.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from tidegate.cli.commands import Command
from tidegate.cli.operators import ACTOR, run_with_store
from tidegate.errors import UsageError
from tidegate.store import tokens
from tidegate.store.store import Store
from tidegate.store.tokens import TokenRecord, TokenScope


def _scope(args: argparse.Namespace) -> tuple[TokenScope, str | None]:
    given = [args.client is not None, args.operator, args.viewer]
    if sum(given) != 1:
        raise UsageError("give exactly one of --client NAME, --operator or --viewer")
    if args.client is not None:
        return "client", args.client
    return ("operator" if args.operator else "viewer"), None


def _what(record: TokenRecord) -> str:
    return f"client {record.client}" if record.client else record.scope


def add(args: argparse.Namespace, command: Command) -> int:
    name = tokens.check_name(args.name)
    scope, client = _scope(args)

    async def work(store: Store) -> int:
        record, token = await tokens.add_token(
            store, name=name, scope=scope, client=client, actor=ACTOR
        )
        if args.json:
            shown = {**msgspec.structs.asdict(record), "token": token}
            print(msgspec.json.encode(shown).decode())
            return 0
        print(f"token {name} added (scope {_what(record)})")
        print(f"token (shown once; it cannot be recovered): {token}")
        return 0

    return run_with_store(args, command, work)


def list_(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store) -> int:
        records = await tokens.list_tokens(store)
        if args.json:
            print(msgspec.json.encode(records).decode())
            return 0
        if not records:
            print("no API tokens yet: add one with `tidegate token add NAME`", file=sys.stderr)
        for r in records:
            used = f"{r.last_used_at:%Y-%m-%d %H:%M}" if r.last_used_at else "never"
            state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "in use"
            print(
                f"{r.name:<24} {_what(r):<20} since {r.created_at:%Y-%m-%d %H:%M}  "
                f"last used {used}  {state}"
            )
        return 0

    return run_with_store(args, command, work)


def revoke(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store) -> int:
        await tokens.revoke_token(store, name=args.name, actor=ACTOR)
        print(f"token {args.name} revoked; the console refuses it within seconds")
        return 0

    return run_with_store(args, command, work)
