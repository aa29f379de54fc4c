-- Every statement the store sends, by name (loaded by mesh/store/queries.py).
-- Full-line comments are stripped before sending; keep them above or between clauses.

-- name: lock_migrations
-- Session-level: held across the per-file transactions, so a second migrator waits and then
-- finds nothing left to do.
SELECT pg_advisory_lock(hashtext('tidegate.migrations'));

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtext('tidegate.migrations'));

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO schema_migrations (version) VALUES (%(version)s);

-- name: ensure_partitions
-- Days sorted by the caller, so concurrent creators take the partition lock in one order.
SELECT tg_ensure_partition(day) FROM unnest(%(days)s::date[]) AS day;

-- name: upsert_tasks
-- One statement for a whole batch (or one row, in the per-event baseline).
-- Monotone: the state columns move only to a greater (attempt, state_rank), so batching,
-- reordering, redelivery and replay cannot move a task backwards. The spec side is filled in
-- while still null, whatever order it arrives in; started_at only grows (a later attempt
-- starts later). mesh/store/rows.py `merge` is the same rule in Python: keep them in step.
-- The WHERE skips writes that would change nothing, so a replayed stream costs no new tuples.
-- Each run of a task (a key submitted again after the dedup window, a retry) is a row of its
-- own: the run is part of the key, so one run's states never move another's.
-- Arrays travel in binary (%b): text arrays of JSON cost more to quote than the insert itself.
-- `attempts`, the run's attempts history, is merged per attempt in this same statement by
-- tg_merge_attempts (migration 0009), so an older report still lands in its own attempt's
-- entry (monotone there too) while the row's state columns stay at the newest attempt.
INSERT INTO tasks AS t (
    task_id, run, client, key, submitted_on, submitted_at, pool, task_class, spec, priority,
    labels, max_attempts, state, state_rank, attempt, executor, exit_code, reason, log_tail,
    started_at, finished_at, attempts)
SELECT * FROM unnest(
    %(task_id)b::text[], %(run)b::bigint[], %(client)b::text[], %(key)b::text[],
    %(submitted_on)b::date[],
    %(submitted_at)b::timestamptz[], %(pool)b::text[], %(task_class)b::text[],
    %(spec)b::text[]::jsonb[], %(priority)b::integer[], %(labels)b::text[]::jsonb[],
    %(max_attempts)b::integer[], %(state)b::text[], %(state_rank)b::smallint[],
    %(attempt)b::integer[], %(executor)b::text[], %(exit_code)b::integer[], %(reason)b::text[],
    %(log_tail)b::text[], %(started_at)b::timestamptz[], %(finished_at)b::timestamptz[],
    %(attempts)b::text[]::jsonb[])
ON CONFLICT (task_id, run, submitted_on) DO UPDATE SET
    state = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                 THEN excluded.state ELSE t.state END,
    state_rank = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                      THEN excluded.state_rank ELSE t.state_rank END,
    attempt = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                   THEN excluded.attempt ELSE t.attempt END,
    exit_code = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                     THEN excluded.exit_code ELSE t.exit_code END,
    reason = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                  THEN excluded.reason ELSE t.reason END,
    log_tail = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                    THEN excluded.log_tail ELSE t.log_tail END,
    finished_at = CASE WHEN (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
                       THEN excluded.finished_at ELSE t.finished_at END,
    -- Within one attempt the executor is kept when the winning report lacks it (a `lost`
    -- decided by a driver still names the host it was lost on).
    executor = CASE
        WHEN excluded.attempt > t.attempt THEN excluded.executor
        WHEN excluded.attempt < t.attempt THEN t.executor
        WHEN excluded.state_rank > t.state_rank THEN coalesce(excluded.executor, t.executor)
        ELSE coalesce(t.executor, excluded.executor) END,
    pool = coalesce(t.pool, excluded.pool),
    task_class = coalesce(t.task_class, excluded.task_class),
    spec = coalesce(t.spec, excluded.spec),
    priority = coalesce(t.priority, excluded.priority),
    labels = coalesce(t.labels, excluded.labels),
    max_attempts = coalesce(t.max_attempts, excluded.max_attempts),
    started_at = greatest(t.started_at, excluded.started_at),
    attempts = tg_merge_attempts(t.attempts, excluded.attempts, excluded.attempt::text),
    updated_at = now()
WHERE (excluded.attempt, excluded.state_rank) > (t.attempt, t.state_rank)
   OR (t.spec IS NULL AND excluded.spec IS NOT NULL)
   OR (t.pool IS NULL AND excluded.pool IS NOT NULL)
   OR (t.task_class IS NULL AND excluded.task_class IS NOT NULL)
   OR (excluded.started_at IS NOT NULL
       AND (t.started_at IS NULL OR excluded.started_at > t.started_at))
   OR (excluded.attempt = t.attempt AND t.executor IS NULL AND excluded.executor IS NOT NULL)
   -- Last, so it runs only when nothing above wrote: an earlier attempt's late report.
   OR tg_merge_attempts(t.attempts, excluded.attempts, excluded.attempt::text) <> t.attempts;

-- name: drop_partitions_before
SELECT tg_drop_partitions_before(%(day)s::date) AS dropped;

-- name: get_task
-- A key reused after the dedup window (or retried) is a later run, a row of its own: the
-- latest run. Rows from before runs (run 0) on several days: the newest.
SELECT * FROM task_records WHERE task_id = %(task_id)s
ORDER BY run DESC, submitted_at DESC LIMIT 1;

-- name: list_tasks
-- Four spellings instead of `(%s IS NULL OR col = %s)`, which defeats the indexes once the
-- statement is prepared with a generic plan.
SELECT * FROM task_records ORDER BY submitted_at DESC, task_id LIMIT %(limit)s;

-- name: list_tasks_by_client
SELECT * FROM task_records WHERE client = %(client)s
ORDER BY submitted_at DESC, task_id LIMIT %(limit)s;

-- name: list_tasks_by_state
SELECT * FROM task_records WHERE state = %(state)s
ORDER BY submitted_at DESC, task_id LIMIT %(limit)s;

-- name: list_tasks_by_client_state
SELECT * FROM task_records WHERE client = %(client)s AND state = %(state)s
ORDER BY submitted_at DESC, task_id LIMIT %(limit)s;

-- name: count_tasks_by_state
-- With `since`, partitions of earlier days are pruned at execution instead of scanned.
SELECT state, count(*) AS n FROM tasks
WHERE submitted_on >= coalesce(%(since)s::date, '-infinity'::date)
GROUP BY state;

-- name: add_client
INSERT INTO clients (
    name, sensitive, callback_url, callback_nats, callback_secret, max_running,
    max_submit_per_s, default_pool, paused, callback_batch_max, callback_held_max, buffer_max,
    allowed_executables, allowed_cwds, allow_shell)
VALUES (
    %(name)s, %(sensitive)s, %(callback_url)s, %(callback_nats)s, %(callback_secret)s,
    %(max_running)s, %(max_submit_per_s)s, %(default_pool)s, %(paused)s,
    %(callback_batch_max)s, %(callback_held_max)s, %(buffer_max)s,
    %(allowed_executables)s, %(allowed_cwds)s, %(allow_shell)s)
ON CONFLICT (name) DO NOTHING
RETURNING *;

-- name: get_client
SELECT * FROM clients WHERE name = %(name)s;

-- name: list_clients
SELECT * FROM clients ORDER BY name;

-- name: update_client
-- The changes are a JSON object holding only the columns to set; jsonb_populate_record takes
-- every other column from the current row, so one static statement serves any subset.
UPDATE clients AS c SET
    (sensitive, callback_url, callback_nats, callback_secret, max_running, max_submit_per_s,
     default_pool, paused, callback_batch_max, callback_held_max, buffer_max,
     allowed_executables, allowed_cwds, allow_shell) =
    (SELECT p.sensitive, p.callback_url, p.callback_nats, p.callback_secret, p.max_running,
            p.max_submit_per_s, p.default_pool, p.paused, p.callback_batch_max,
            p.callback_held_max, p.buffer_max, p.allowed_executables, p.allowed_cwds,
            p.allow_shell
     FROM jsonb_populate_record(c, %(changes)s::jsonb) AS p),
    updated_at = now()
WHERE c.name = %(name)s
RETURNING c.*;

-- name: rotate_client_secret
-- The new secret signs from now on; the one it replaces signs beside it until the overlap
-- ends, so a receiver that still verifies with the old one keeps accepting callbacks.
UPDATE clients SET
    callback_secret_previous = callback_secret,
    callback_secret_previous_until = now() + make_interval(secs => %(overlap_s)s),
    callback_secret = %(secret)s,
    updated_at = now()
WHERE name = %(name)s
RETURNING *;

-- name: client_health
-- Per client: terminal failures in the last hour, callbacks waiting in the outbox and dead
-- letters. The day bound lets the planner skip old partitions of `tasks`.
SELECT c.name AS client,
       (SELECT count(*) FROM tasks t
         WHERE t.client = c.name
           AND t.state IN ('failed', 'timed_out', 'lost', 'rejected')
           AND t.submitted_on >= (now() - interval '2 days')::date
           AND t.finished_at >= now() - interval '1 hour') AS failed_1h,
       (SELECT count(*) FROM callback_outbox o WHERE o.client = c.name) AS outbox,
       (SELECT count(*) FROM callback_dead_letters d WHERE d.client = c.name) AS dead
  FROM clients c
 ORDER BY c.name;

-- name: search_tasks
-- Optional filters, sent unprepared (see Store.fetch_all) so each absent one folds away and the
-- plan uses an index. Keyset pagination on (submitted_at, task_id): a deep page costs what the
-- first does. The submitted_on bounds prune day partitions.
SELECT * FROM task_records
WHERE (%(client)s::text IS NULL OR client = %(client)s)
  AND (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(pool)s::text IS NULL OR pool = %(pool)s)
  AND (%(key_prefix)s::text IS NULL OR key LIKE %(key_prefix)s)
  AND (%(since)s::timestamptz IS NULL OR submitted_at >= %(since)s)
  AND (%(since)s::timestamptz IS NULL OR submitted_on >= (%(since)s AT TIME ZONE 'UTC')::date)
  AND (%(until)s::timestamptz IS NULL OR submitted_at < %(until)s)
  AND (%(until)s::timestamptz IS NULL OR submitted_on <= (%(until)s AT TIME ZONE 'UTC')::date)
  AND (%(after_at)s::timestamptz IS NULL
       OR (submitted_at, task_id) < (%(after_at)s, %(after_id)s::text))
ORDER BY submitted_at DESC, task_id DESC
LIMIT %(limit)s;

-- name: task_runs
SELECT * FROM task_records WHERE task_id = %(task_id)s ORDER BY run DESC, submitted_at DESC;


-- name: task_spec
-- What an operator's retry submits again: the spec of the task's latest run that has one (a
-- rejected submission may have none).
SELECT spec FROM tasks WHERE task_id = %(task_id)s AND spec IS NOT NULL
ORDER BY run DESC, submitted_at DESC LIMIT 1;

-- name: stranded_tasks
-- The reconciler's candidates: unfinished tasks whose row has not moved since `before`, of
-- clients with no message waiting in a queue (`busy`: theirs may still run), oldest first
-- (the state index gives that order without sorting a backlog).
SELECT task_id, run, client, key, pool, state, attempt, executor, submitted_at
FROM tasks
WHERE state IN ('queued', 'dispatched', 'running') AND updated_at < %(before)s
  AND client <> ALL(%(busy)s::text[])
ORDER BY submitted_at
LIMIT %(limit)s;
