"""`tidegate submit` and `tidegate task cancel`: they need NATS only (the base distribution)."""

from __future__ import annotations

import argparse
import asyncio
import uuid

from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from tidegate import names
from tidegate.bus.natsconn import connect
from tidegate.bus.topology import ensure_buckets
from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.client import TidegateClient
from tidegate.endpoints import resolve_connection
from tidegate.errors import InvalidTask, UnknownClient
from tidegate.wire import TaskSpec, check_spec, decode_spec


def _specs(args: argparse.Namespace) -> list[TaskSpec]:
    if args.file:
        if args.argv or args.shell:
            raise InvalidTask("give --file, or a command: not both")
        specs = []
        with open(args.file, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        specs.append(decode_spec(line))
                    except InvalidTask as exc:
                        raise InvalidTask(f"{args.file}:{n}: {exc}") from None
        return specs
    if bool(args.argv) == bool(args.shell):
        raise InvalidTask("give a command after `--`, or --shell 'command line' (not both)")
    spec = TaskSpec(
        key=args.key or uuid.uuid4().hex,
        argv=args.argv or None,
        shell=args.shell,
        env=dict(_pair(e) for e in args.env),
        cwd=args.cwd,
        timeout_s=args.timeout,
        pool=args.pool,
        labels=dict(_pair(e) for e in args.label),
        priority=args.priority,
        max_attempts=args.max_attempts,
    )
    return [check_spec(spec)]


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise InvalidTask(f"{text!r} is not NAME=VALUE")
    return name, value


async def check_client(nc: NATS, client: str) -> None:
    """Refuse a client the drivers do not know: its task would only be rejected later."""
    try:
        kv = await nc.jetstream().key_value(names.CLIENTS_BUCKET)
        entry = await kv.get(client)
    except (BucketNotFoundError, KeyNotFoundError):
        entry = None
    if entry is None or entry.value is None:
        raise UnknownClient(
            f"no client {client!r} is registered: add it with `tidegate client add {client}`"
        )


def submit(args: argparse.Namespace, command: Command) -> int:
    specs = _specs(args)
    conn = resolve_connection(settings_from(args, command.options))

    async def main() -> int:
        nc = await connect(conn.nats_url, f"tidegate-submit-{args.client}")
        try:
            await check_client(nc, args.client)
            tg = TidegateClient(nc, args.client)
            receipts = await tg.submit_many(specs)
        finally:
            await nc.drain()
        for r in receipts:
            print(r.task_id + ("  (duplicate: already submitted)" if r.duplicate else ""))
        return 0

    return asyncio.run(main())


def cancel(args: argparse.Namespace, command: Command) -> int:
    settings = settings_from(args, command.options)
    conn = resolve_connection(settings)

    async def main() -> int:
        nc = await connect(conn.nats_url, "tidegate-cli")
        try:
            buckets = await ensure_buckets(nc.jetstream(), settings.limits)
            await buckets.cancel.put(names.kv_key(args.id), args.id.encode())
        finally:
            await nc.drain()
        print(f"cancel requested for {args.id}")
        return 0

    return asyncio.run(main())
