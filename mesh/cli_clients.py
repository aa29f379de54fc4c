"""`tidegate client add | list | set`: the registry in PostgreSQL, mirrored to the KV bucket."""

from __future__ import annotations

import argparse
import asyncio
import secrets
from typing import Any

import msgspec

from mesh.clients import publish_client
from mesh.errors import InvalidTask
from mesh.wire import NAME_RE


def add_client_commands(sub: Any) -> None:
    c = sub.add_parser("client", help="manage client systems")
    csub = c.add_subparsers(dest="client_command", required=True)

    add = csub.add_parser("add", help="register a client system")
    add.add_argument("name")
    add.add_argument(
        "--sensitive", action="store_true", help="persist every transition before its callback"
    )
    how = add.add_mutually_exclusive_group()
    how.add_argument("--callback-url", help="HTTP webhook for state callbacks")
    how.add_argument(
        "--callback-nats",
        action="store_true",
        help="callbacks as NATS requests on tg.callback.NAME",
    )
    add.add_argument(
        "--callback-secret",
        help="HMAC secret for X-Tidegate-Signature (default: a random one, printed)",
    )
    _limits(add)
    add.set_defaults(func=cmd_client_add)

    ls = csub.add_parser("list", help="list client systems")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_client_list)

    st = csub.add_parser("set", help="change a client system (takes effect within a second)")
    st.add_argument("name")
    st.add_argument("--sensitive", dest="sensitive", action="store_true", default=None)
    st.add_argument("--no-sensitive", dest="sensitive", action="store_false")
    st.add_argument("--callback-url", help="switch to HTTP callbacks at this URL")
    st.add_argument(
        "--callback-nats",
        action="store_true",
        default=None,
        help="switch to NATS request callbacks",
    )
    st.add_argument("--callback-secret", help="new HMAC secret for X-Tidegate-Signature")
    st.add_argument("--pause", dest="paused", action="store_true", default=None)
    st.add_argument("--resume", dest="paused", action="store_false")
    _limits(st)
    st.set_defaults(func=cmd_client_set)


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-running", type=int, help="cap on this client's running tasks")
    p.add_argument(
        "--max-submit-rate",
        dest="max_submit_per_s",
        type=float,
        help="tasks per second started from its backlog",
    )
    p.add_argument("--default-pool")
    p.add_argument(
        "--callback-batch-max",
        type=int,
        help="callbacks per request, as a JSON array, when above 1",
    )


async def _registry(args: argparse.Namespace, work: Any) -> int:
    from mesh.cli import _settings, resolve_connection
    from mesh.natsconn import connect
    from mesh.store.store import Store
    from mesh.topology import ensure_buckets

    settings = _settings(args)
    conn = resolve_connection(settings)
    nc = await connect(conn.nats_url, "tidegate-cli")
    try:
        buckets = await ensure_buckets(nc.jetstream(), settings.limits)
        async with Store(conn.database_url, min_size=1, max_size=2) as store:
            return int(await work(store, buckets.clients))
    finally:
        await nc.drain()


def cmd_client_add(args: argparse.Namespace) -> int:
    import re

    from mesh.store.rows import ClientRecord

    if not re.match(NAME_RE, args.name):
        raise InvalidTask(f"client name {args.name!r} must match {NAME_RE}")
    secret = args.callback_secret
    if args.callback_url and not secret:
        secret = secrets.token_urlsafe(32)
    record = ClientRecord(
        name=args.name, sensitive=args.sensitive, callback_url=args.callback_url,
        callback_nats=args.callback_nats, callback_secret=secret,
        max_running=args.max_running, max_submit_per_s=args.max_submit_per_s,
        default_pool=args.default_pool or "default",
        callback_batch_max=args.callback_batch_max or 1,
    )  # fmt: skip

    async def work(store: Any, kv: Any) -> int:
        stored = await store.add_client(record)
        await publish_client(kv, stored)
        print(f"client {args.name} added")
        if secret and not args.callback_secret:
            print(f"callback secret (verify X-Tidegate-Signature with it): {secret}")
        return 0

    return asyncio.run(_registry(args, work))


def cmd_client_list(args: argparse.Namespace) -> int:
    async def work(store: Any, kv: Any) -> int:
        records = await store.list_clients()
        if args.json:
            print(msgspec.json.encode(records).decode())
            return 0
        for r in records:
            how = r.callback_url or ("nats" if r.callback_nats else "-")
            mode = "sensitive" if r.sensitive else "non-sensitive"
            print(f"{r.name:<24} {mode:<14} callback={how} paused={r.paused}")
        return 0

    return asyncio.run(_registry(args, work))


def cmd_client_set(args: argparse.Namespace) -> int:
    fields = (
        "sensitive", "callback_url", "callback_nats", "callback_secret", "paused",
        "max_running", "max_submit_per_s", "default_pool", "callback_batch_max",
    )  # fmt: skip
    changes = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if not changes:
        raise InvalidTask("nothing to change: give at least one option")

    async def work(store: Any, kv: Any) -> int:
        record = await store.update_client(args.name, **changes)
        await publish_client(kv, record)
        shown = {k: ("***" if k == "callback_secret" else v) for k, v in changes.items()}
        print(f"client {args.name} updated: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return 0

    return asyncio.run(_registry(args, work))
