"""Row writes and commits per kind of client (sensitive or not), counted by the database.

PostgreSQL's table counters (`n_tup_ins`, `n_tup_upd`) and commit counters are per table and
per cluster: they cannot tell a sensitive client's writes from another's. So the benchmark's
private database gets two statement triggers on `tasks` (benchmark-only: the product's schema
never has them) that note, for every statement that inserted or updated task rows, how many
rows of each client it wrote and in which transaction. After the run:

- rows written per task of a kind: the rows of its clients' tasks, inserts and updates, over
  its tasks;
- commits per task of a kind: the transactions that wrote at least one row of its tasks, over
  its tasks. A transaction that wrote rows of both kinds counts for both.

Only rows of the `tasks` table are counted (not the callback outbox, nor clients): the targets
are about task rows. Each noting is an insert in the same transaction as the write, so it adds
no commit; it adds one small row per client and statement, the cost the figures carry.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

import msgspec
import psycopg

INSTALL_SQL: Final = """
CREATE TABLE bench_task_writes (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    client text NOT NULL,
    rows integer NOT NULL
);
CREATE FUNCTION bench_note_task_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_task_writes (client, rows)
    SELECT client, count(*) FROM written GROUP BY client;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_task_inserts AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION bench_note_task_writes();
CREATE TRIGGER bench_task_updates AFTER UPDATE ON tasks
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT
    EXECUTE FUNCTION bench_note_task_writes();
"""

BY_KIND_SQL: Final = """
SELECT client = ANY(%(sensitive)s) AS sensitive,
       sum(rows)::bigint,
       count(DISTINCT xid)
FROM bench_task_writes
GROUP BY 1
"""

SENSITIVE: Final = "sensitive"
NON_SENSITIVE: Final = "non-sensitive"


class KindWrites(msgspec.Struct, kw_only=True):
    tasks: int
    rows: int = 0
    commits: int = 0
    rows_per_task: float | None = None
    commits_per_task: float | None = None


async def install(database_url: str) -> None:
    """Before the driver starts (after the migrations: the triggers are on `tasks`)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(INSTALL_SQL)


async def writes_by_kind(
    database_url: str, sensitive: Collection[str], tasks: dict[str, int]
) -> dict[str, KindWrites]:
    """Per kind with tasks (`tasks`: SENSITIVE / NON_SENSITIVE → how many), after the run."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(BY_KIND_SQL, {"sensitive": list(sensitive)})
        counted = {bool(s): (int(rows), int(commits)) for s, rows, commits in await cur.fetchall()}
    out: dict[str, KindWrites] = {}
    for label, is_sensitive in ((SENSITIVE, True), (NON_SENSITIVE, False)):
        n = tasks.get(label, 0)
        if not n:
            continue
        rows, commits = counted.get(is_sensitive, (0, 0))
        out[label] = KindWrites(
            tasks=n,
            rows=rows,
            commits=commits,
            rows_per_task=round(rows / n, 3),
            commits_per_task=round(commits / n, 4),
        )
    return out
