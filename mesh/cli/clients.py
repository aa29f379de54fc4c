"""`tidegate client add | list | set`: the registry in PostgreSQL, mirrored to the KV bucket."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import msgspec

from tidegate import registry
from tidegate.bus.buckets import ensure_buckets
from tidegate.bus.clients import RegistryBuckets
from tidegate.bus.natsconn import connect
from tidegate.bus.quota import stream_ceiling
from tidegate.cli import natsusers
from tidegate.cli.commands import Command
from tidegate.cli.options import BUFFER_MAX_DEFAULT, settings_from
from tidegate.endpoints import callback_nets, resolve_connection
from tidegate.errors import InvalidTask, UsageError
from tidegate.registry import add_client, change_client
from tidegate.signing import new_secret
from tidegate.store.store import ClientChanges, Store
from tidegate.wire import (
    DEFAULT_CALLBACK_HELD_MAX,
    NAME_RE,
    ClientRecord,
    check_command_lists,
    command_list,
)

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
    "callback_held_max",
    "buffer_max",
)

# (store, mirror, the stream-wide buffer quota as the server has it)
Work = Callable[[Store, RegistryBuckets, int], Awaitable[int]]


def _registry(args: argparse.Namespace, command: Command, work: Work) -> int:
    settings = settings_from(args, command.options)
    conn = resolve_connection(settings)

    async def main() -> int:
        nc = await connect(conn.nats_url, "tidegate-cli")
        try:
            js = nc.jetstream()
            buckets = await ensure_buckets(js, settings.limits)
            ceiling = await stream_ceiling(js, settings.limits.client_buffer_max)
            async with Store(conn.database_url, min_size=1, max_size=2) as store:
                return await work(store, buckets.registry, ceiling)
        finally:
            await nc.drain()

    return asyncio.run(main())


def _command_policy(args: argparse.Namespace) -> ClientChanges:
    """The command policy the options give (only what they name), checked before connecting."""
    for listed, anything, flags in (
        ("allowed_executables", "any_executable", "--allow-executable or --any-executable"),
        ("allowed_cwds", "any_cwd", "--allow-cwd or --any-cwd"),
    ):
        if getattr(args, listed) and getattr(args, anything):
            raise UsageError(f"give {flags}, not both")
    changes = ClientChanges()
    if args.any_executable:
        changes["allowed_executables"] = None
    elif args.allowed_executables:
        changes["allowed_executables"] = command_list(args.allowed_executables)
    if args.any_cwd:
        changes["allowed_cwds"] = None
    elif args.allowed_cwds:
        changes["allowed_cwds"] = command_list(args.allowed_cwds)
    if args.allow_shell is not None:
        changes["allow_shell"] = args.allow_shell
    check_command_lists(changes.get("allowed_executables"), changes.get("allowed_cwds"))
    return changes


def policy_text(r: ClientRecord) -> str:
    """A client's command policy in one phrase of `client list`."""

    def shown(entries: tuple[str, ...] | None) -> str:
        return "any" if entries is None else ",".join(entries) or "none"

    return (
        f"executables={shown(r.allowed_executables)} cwds={shown(r.allowed_cwds)} "
        f"shell={'yes' if r.allow_shell else 'no'}"
    )


def add(args: argparse.Namespace, command: Command) -> int:
    if not re.match(NAME_RE, args.name):
        raise InvalidTask(f"client name {args.name!r} must match {NAME_RE}")
    if args.callback_url and args.callback_nats:
        raise InvalidTask("give --callback-url or --callback-nats, not both")
    secret = args.callback_secret
    if args.callback_url and not secret:
        secret = new_secret()
    policy = _command_policy(args)
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
        callback_held_max=args.callback_held_max or DEFAULT_CALLBACK_HELD_MAX,
        buffer_max=args.buffer_max or None,  # absent or `default`: the stream-wide quota
        allowed_executables=policy.get("allowed_executables"),
        allowed_cwds=policy.get("allowed_cwds"),
        allow_shell=policy.get("allow_shell", True),
    )

    allowed = callback_nets(settings_from(args, command.options))

    async def work(store: Store, kv: RegistryBuckets, ceiling: int) -> int:
        await add_client(store, kv, record, allowed_nets=allowed, ceiling=ceiling)
        # Its own NATS user (beside a `tidegate up` with users): shown once, like the secret.
        creds = await natsusers.issue(settings_from(args, command.options), args.name)
        if args.json:
            generated = secret if secret and not args.callback_secret else None
            shown = natsusers.credentials_json(creds, args.name)
            print(json.dumps(shown | {"callback_secret": generated}))
            return 0
        print(f"client {args.name} added")
        if secret and not args.callback_secret:
            print(f"callback secret (verify the webhook-signature header with it): {secret}")
        natsusers.print_credentials(creds)
        return 0

    return _registry(args, command, work)


def list_(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store, kv: RegistryBuckets, ceiling: int) -> int:
        records = await store.list_clients()
        if args.json:
            # Never the secrets: whoever reads a listing (or its log) must not be able to
            # sign callbacks. Whether a client has one is enough to see.
            shown = [
                msgspec.structs.asdict(r)
                | {
                    "callback_secret": None,
                    "callback_secret_previous": None,
                    "has_callback_secret": bool(r.callback_secret),
                }
                # buffer_max null: the stream-wide quota, per buffer; never above the ceiling
                | {"buffer_ceiling": ceiling}
                for r in records
            ]
            print(msgspec.json.encode(shown).decode())
            return 0
        for r in records:
            how = r.callback_url or ("nats" if r.callback_nats else "-")
            mode = "sensitive" if r.sensitive else "non-sensitive"
            quota = r.buffer_max if r.buffer_max is not None else f"default({ceiling})"
            print(
                f"{r.name:<24} {mode:<14} callback={how} paused={r.paused} buffer_max={quota} "
                + policy_text(r)
            )
        return 0

    return _registry(args, command, work)


def set_(args: argparse.Namespace, command: Command) -> int:
    if args.callback_url and args.callback_nats:
        raise InvalidTask("give --callback-url or --callback-nats, not both")
    changes = {k: getattr(args, k) for k in SETTABLE if getattr(args, k) is not None}
    changes |= _command_policy(args)
    if not changes:
        raise InvalidTask("nothing to change: give at least one option")
    if changes.get("buffer_max") == BUFFER_MAX_DEFAULT:
        changes["buffer_max"] = None  # back to the stream-wide quota

    allowed = callback_nets(settings_from(args, command.options))

    async def work(store: Store, kv: RegistryBuckets, ceiling: int) -> int:
        await change_client(store, kv, args.name, allowed_nets=allowed, ceiling=ceiling, **changes)
        shown = {k: ("***" if k == "callback_secret" else v) for k, v in changes.items()}
        if "buffer_max" in shown and shown["buffer_max"] is None:
            shown["buffer_max"] = f"default({ceiling})"
        for listed in ("allowed_executables", "allowed_cwds"):
            if listed in shown:
                shown[listed] = "any" if shown[listed] is None else ",".join(shown[listed])
        print(f"client {args.name} updated: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return 0

    return _registry(args, command, work)


def rotate_secret(args: argparse.Namespace, command: Command) -> int:
    async def work(store: Store, kv: RegistryBuckets, _ceiling: int) -> int:
        record, secret = await registry.rotate_secret(
            store, kv, args.name, overlap_s=args.overlap, secret=args.secret
        )
        until = record.callback_secret_previous_until
        if args.json:
            shown = {"client": args.name, "callback_secret": secret, "previous_until": until}
            print(msgspec.json.encode(shown).decode())
            return 0
        if args.secret:
            print(f"client {args.name}: callback secret replaced by the one given")
        else:
            print(f"client {args.name}: new callback secret (shown once): {secret}")
        if not record.callback_secret_previous:
            print("it had no secret before: callbacks are signed from now on")
        elif args.overlap > 0 and until is not None:
            print(f"the previous one also signs until {until:%Y-%m-%d %H:%M:%S} UTC")
        else:
            print("the previous one no longer signs (no overlap)")
        return 0

    return _registry(args, command, work)
