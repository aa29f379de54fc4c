"""`tidegate client add | list | set`: the registry in PostgreSQL, mirrored to the KV bucket."""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.kv import KeyValue

from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_buckets
from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.endpoints import resolve_connection
from tidegate.errors import InvalidTask
from tidegate.registry import add_client, change_client
from tidegate.store.store import Store
from tidegate.wire import NAME_RE, ClientRecord

# What `client set` may change: the `ClientRecord` fields of its options.
SETTABLE = (
    "sensitive",
    "callback_url",
    "callback_nats",
    "callback_secret",
    "paused",
    "max_running",
    "max_submit_per_s",
    "default_pool",
    "callback_batch_max",
)

Work = Callable[[Store, KeyValue], Awaitable[int]]


def _registry(args: argparse.Namespace, command: Command, work: Work) -> int:
    settings = settings_from(args, command.options)
    conn = resolve_connection(settings)

    async def main() -> int:
        nc = await connect(conn.nats_url, "tidegate-cli")
        try:
            buckets = await ensure_buckets(nc.jetstream(), settings.limits)
            async with Store(conn.database_url, min_size=1, max_size=2) as store:
                return await work(store, buckets.clients)
        finally:
            await nc.drain()

    return asyncio.run(main())


def add(args: argparse.Namespace, command: Command) -> int:
    if not re.match(NAME_RE, args.name):
        raise InvalidTask(f"client name {args.name!r} must match {NAME_RE}")
    if args.callback_url and args.callback_nats:
        raise InvalidTask("give --callback-url or --callback-nats, not both")
    secret = args.callback_secret
    if args.callback_url and not secret:
        secret = secrets.token_urlsafe(32)
    record = ClientRecord(
        name=args.name,
        sensitive=args.sensitive,
        callback_url=args.callback_url,
        callback_nats=args.callback_nats,
        callback_secret=secret,
        max_running=args.max_running,
        max_submit_per_s=args.max_submit_per_s,
        default_pool=args.default_pool or "default",
        callback_batch_max=args.callback_batch_max or 1,
    )

    async def work(store: Store, kv: KeyValue) -> int:
        await add_client(store, kv, record)
        print(f"client {args.name} added")
        if secret and not args.callback_secret:
            print(f"callback secret (verify X-Tidegate-Signature with it): {secret}")
        return 0

    return _registry(args, command, work)


def list_(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store, kv: KeyValue) -> int:
        records = await store.list_clients()
        if args.json:
            print(msgspec.json.encode(records).decode())
            return 0
        for r in records:
            how = r.callback_url or ("nats" if r.callback_nats else "-")
            mode = "sensitive" if r.sensitive else "non-sensitive"
            print(f"{r.name:<24} {mode:<14} callback={how} paused={r.paused}")
        return 0

    return _registry(args, command, work)


def set_(args: argparse.Namespace, command: Command) -> int:
    if args.callback_url and args.callback_nats:
        raise InvalidTask("give --callback-url or --callback-nats, not both")
    changes = {k: getattr(args, k) for k in SETTABLE if getattr(args, k) is not None}
    if not changes:
        raise InvalidTask("nothing to change: give at least one option")

    async def work(store: Store, kv: KeyValue) -> int:
        await change_client(store, kv, args.name, **changes)
        shown = {k: ("***" if k == "callback_secret" else v) for k, v in changes.items()}
        print(f"client {args.name} updated: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return 0

    return _registry(args, command, work)
