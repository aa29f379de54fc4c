"""`tidegate dead-letters list|show|redrive --kind callback|message`.

Two kinds: *callback* dead letters (a callback that exhausted its retries, in PostgreSQL, by
id) and *message* dead letters (a message a stage could not process, on the bus, by its
sequence in the dead-letter stream). `--json` prints a stable shape:
`{"kind": …, "dead_letters": […]}`, `{"kind": …, "dead_letter": {…}}`, `{"kind": …,
"redriven": {…}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.js import JetStreamContext

from tidegate.bus import deadletters as bus
from tidegate.bus.natsconn import connect
from tidegate.cli.commands import Command
from tidegate.cli.operators import run_with_store
from tidegate.cli.options import settings_from
from tidegate.endpoints import resolve_connection
from tidegate.errors import DeadLetterNotFound
from tidegate.store import callbacks as cb
from tidegate.store.store import Store

PREVIEW = 120  # characters of a payload in the table


def _json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value)).decode() + "\n")


def _with_js(
    args: argparse.Namespace, command: Command, work: Callable[[JetStreamContext], Awaitable[int]]
) -> int:
    url = resolve_connection(settings_from(args, command.options)).nats_url

    async def main() -> int:
        nc = await connect(url, "tidegate-cli")
        try:
            return await work(nc.jetstream())
        finally:
            await nc.drain()

    return asyncio.run(main())


def _one_line(text: str, width: int = PREVIEW) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def list_(args: argparse.Namespace, command: Command) -> int:
    if args.kind == "message":

        async def messages(js: JetStreamContext) -> int:
            found = await bus.list_dead(
                js, stage=args.stage, client=args.client, limit=args.limit, before=args.before
            )
            if args.json:
                _json(
                    {
                        "kind": "message",
                        "dead_letters": [bus.MessageDeadLetterJson.of(d) for d in found],
                    }
                )
                return 0
            for d in found:
                print(
                    f"{d.seq}  {d.at:%Y-%m-%d %H:%M:%S}  {d.stage}  {d.client or '-'}  "
                    f"{d.subject}  {_one_line(d.reason, 80)}\n"
                    f"    {_one_line(d.payload.decode(errors='replace'))}"
                )
            if not found:
                print("no message dead letters")
            return 0

        return _with_js(args, command, messages)

    async def callbacks(store: Store) -> int:
        found = await cb.list_dead_letters(
            store, client=args.client, before_id=args.before, limit=args.limit
        )
        if args.json:
            _json({"kind": "callback", "dead_letters": found})
            return 0
        for d in found:
            print(
                f"{d.id}  {d.dead_at:%Y-%m-%d %H:%M:%S}  {d.client}  {d.task_id}  {d.state}  "
                f"{d.attempts} attempts  {_one_line(d.last_error or '', 80)}"
            )
        if not found:
            print("no callback dead letters")
        return 0

    return run_with_store(args, command, callbacks)


def show(args: argparse.Namespace, command: Command) -> int:
    if args.kind == "message":

        async def message(js: JetStreamContext) -> int:
            dead = await bus.show_dead(js, args.id)
            if dead is None:
                raise DeadLetterNotFound(
                    f"no message dead letter {args.id} (re-driven, aged out, or never was): "
                    "see `tidegate dead-letters list --kind message`"
                )
            if args.json:
                _json({"kind": "message", "dead_letter": bus.MessageDeadLetterJson.of(dead)})
                return 0
            for name in ("seq", "stage", "client", "subject", "origin", "at", "reason"):
                print(f"{name + ':':9} {getattr(dead, name)}")
            for name, value in dead.headers.items():
                print(f"header:   {name}: {value}")
            print("payload:")
            print(dead.payload.decode(errors="replace"))
            return 0

        return _with_js(args, command, message)

    async def callback(store: Store) -> int:
        found = await cb.show_dead_letter(store, args.id)
        if found is None:
            raise DeadLetterNotFound(
                f"no callback dead letter {args.id} (re-driven, or never was): "
                "see `tidegate dead-letters list --kind callback`"
            )
        entry, payload = found
        if args.json:
            _json(
                {
                    "kind": "callback",
                    "dead_letter": {**msgspec.structs.asdict(entry), "payload": payload},
                }
            )
            return 0
        for name, value in msgspec.structs.asdict(entry).items():
            print(f"{name + ':':12} {value}")
        print("payload:")
        print(msgspec.json.format(msgspec.json.encode(payload)).decode())
        return 0

    return run_with_store(args, command, callback)


def redrive(args: argparse.Namespace, command: Command) -> int:
    if args.kind == "message":

        async def message(js: JetStreamContext) -> int:
            done = await bus.redrive(js, args.id, new_id=args.new_id)
            if args.json:
                _json({"kind": "message", "redriven": done})
            else:
                print(
                    f"re-drove message dead letter {done.seq} to {done.subject} "
                    f"({done.stream} #{done.stream_seq})"
                )
            return 0

        return _with_js(args, command, message)

    async def callback(store: Store) -> int:
        done = await cb.redrive_dead_letter(store, args.id)
        if args.json:
            _json({"kind": "callback", "redriven": done})
        else:
            print(
                f"re-drove callback dead letter {args.id} ({done.event_id}) into "
                f"{done.client}'s outbox"
            )
        return 0

    return run_with_store(args, command, callback)
