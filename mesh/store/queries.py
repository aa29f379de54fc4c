"""The store's SQL, loaded by name from `queries.sql`.

Each statement is a `-- name: <name>` block. The names are the fields of `Queries`, so a typo in
Python is a type error and a missing or extra block fails at import, not at the first call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Final

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$")


@dataclass(frozen=True, slots=True)
class Queries:
    session_setup: str
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


def parse(text: str) -> dict[str, str]:
    """Split `-- name:` blocks; full-line comments are dropped so they never travel the wire."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _NAME.match(line.strip())
        if match:
            name = match.group(1)
            if name in blocks:
                raise ValueError(f"queries.sql: query {name!r} is defined twice")
            current = blocks[name] = []
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in blocks.items()}


def load(text: str) -> Queries:
    parsed = parse(text)
    expected = {f.name for f in fields(Queries)}
    missing, extra = expected - parsed.keys(), parsed.keys() - expected
    if missing or extra:
        raise ValueError(
            f"queries.sql does not match Queries: missing {sorted(missing)}, extra {sorted(extra)}"
        )
    empty = [name for name, sql in parsed.items() if not sql]
    if empty:
        raise ValueError(f"queries.sql: empty queries {empty}")
    return Queries(**parsed)


Q: Final = load(files("tidegate.store").joinpath("queries.sql").read_text(encoding="utf-8"))
