"""Every SQL statement Tidegate sends, loaded by name from this package's `.sql` files.

Each statement is a `-- name: <name>` block, the layout of procrastinate's `sql/queries.sql`;
the files are parsed once, at import. The names are the fields of `Queries`, so a typo in
Python is a type error, and a block that is missing, extra, empty or defined twice (in one file
or across files) fails at import, not at the first call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Final

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")

# The projection, clients and migrations; then the callback outbox, which only the driver's
# callback stages use but which lives in the same database and pool; then the console's
# operator accounts and audit log, and the API tokens of its JSON API.
FILES: Final = ("queries.sql", "outbox.sql", "console.sql", "tokens.sql")


@dataclass(frozen=True, slots=True)
class Queries:
    # queries.sql
    lock_migrations: str
    unlock_migrations: str
    create_schema_migrations: str
    applied_migrations: str
    record_migration: str
    ensure_partitions: str
    upsert_tasks: str
    drop_partitions_before: str
    get_task: str
    list_tasks: str
    list_tasks_by_client: str
    list_tasks_by_state: str
    list_tasks_by_client_state: str
    count_tasks_by_state: str
    add_client: str
    get_client: str
    list_clients: str
    update_client: str
    rotate_client_secret: str
    client_health: str
    search_tasks: str
    task_runs: str
    task_spec: str
    stranded_tasks: str
    # outbox.sql
    outbox_enqueue: str
    notify_term_begin: str
    notify_term_share: str
    outbox_pending_clients: str
    outbox_due_clients: str
    outbox_lock_client: str
    outbox_claim_rows: str
    outbox_delete_delivered: str
    outbox_savepoint: str
    outbox_rollback_savepoint: str
    outbox_fail_one: str
    outbox_bury: str
    outbox_count_all: str
    outbox_count_client: str
    outbox_count_failing: str
    dead_letters_count: str
    dead_letters_all: str
    dead_letters_client: str
    callbacks_summary: str
    callbacks_outbox_page: str
    callbacks_ping: str
    callbacks_outbox_row: str
    callbacks_outbox_scope: str
    callbacks_lock_timeout: str
    callbacks_lock_clients: str
    callbacks_retry_now: str
    callbacks_dead_page: str
    callbacks_dead_row: str
    callbacks_dead_one: str
    callbacks_dead_scope: str
    callbacks_redrive: str
    # console.sql
    operator_add: str
    operator_add_first: str
    operator_get: str
    operator_list: str
    operator_roster: str
    operator_set_password: str
    operator_remove: str
    audit_record: str
    audit_list: str
    audit_list_before: str
    # tokens.sql
    token_client_exists: str
    token_add: str
    token_list: str
    token_revoke: str
    token_find: str


def parse(text: str, source: str = "<sql>") -> dict[str, str]:
    """Split `-- name:` blocks; full-line comments are dropped so they never travel the wire."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"{source}: query {name!r} is defined twice")
            current = blocks[name] = []
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in blocks.items()}


def load(texts: Mapping[str, str]) -> Queries:
    """`texts` maps a file name (for messages) to its contents."""
    parsed: dict[str, str] = {}
    origin: dict[str, str] = {}
    for source, text in texts.items():
        for name, sql in parse(text, source).items():
            if name in parsed:
                raise ValueError(f"{source}: query {name!r} is also defined in {origin[name]}")
            if not sql:
                raise ValueError(f"{source}: query {name!r} is empty")
            parsed[name], origin[name] = sql, source
    expected = {f.name for f in fields(Queries)}
    missing, extra = expected - parsed.keys(), parsed.keys() - expected
    if missing or extra:
        raise ValueError(
            f"{', '.join(texts)} do not match Queries: "
            f"missing {sorted(missing)}, extra {sorted(extra)}"
        )
    return Queries(**parsed)


def _read(names: tuple[str, ...]) -> dict[str, str]:
    here = files("tidegate.store")
    return {name: here.joinpath(name).read_text(encoding="utf-8") for name in names}


Q: Final = load(_read(FILES))
