"""`tidegate submit` and `tidegate task cancel`: they need NATS only (the base distribution)."""

from __future__ import annotations

import argparse
import asyncio
import uuid

from tidegate.bus.buckets import ensure_buckets
from tidegate.bus.cancel import request_cancel
from tidegate.bus.natsconn import connect
from tidegate.bus.submit import check_registered, url_id_secret
from tidegate.cli.commands import Command
from tidegate.cli.options import settings_from
from tidegate.client import TidegateClient
from tidegate.endpoints import resolve_connection
from tidegate.errors import InvalidTask
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


def submit(args: argparse.Namespace, command: Command) -> int:
    specs = _specs(args)
    conn = resolve_connection(settings_from(args, command.options))

    async def main() -> int:
        nc = await connect(conn.nats_url, f"tidegate-submit-{args.client}")
        try:
            await check_registered(nc.jetstream(), args.client)
            # The ids keyed with this connection's password (the URL's), as the SDK's are.
            tg = TidegateClient(nc, args.client, id_secret=url_id_secret(conn.nats_url))
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
            await request_cancel(buckets.cancel, args.id, args.run)
        finally:
            await nc.drain()
        which = "every run so far" if args.run is None else f"run {args.run}"
        print(f"cancel requested for {args.id} ({which})")
        return 0

    return asyncio.run(main())
