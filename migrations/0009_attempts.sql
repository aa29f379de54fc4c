-- A run's attempts history. A row holds its run's latest attempt; what the earlier attempts
-- reached (attempt 1 lost on an executor that died, attempt 2 succeeding on another) is kept in
-- the row itself, keyed by attempt number:
--   {"1": {"state": "running", "rank": 2, "executor": "exec-0", "started_at": "…"},
--    "2": {"state": "succeeded", "rank": 3, "executor": "exec-1", "exit_code": 0, …}}
-- A column and not a table: the projection's one upsert statement merges it (tg_merge_attempts),
-- so the history costs no extra statement, row or commit in the flood. Unknown fields are left
-- out of an entry, never written as null. A constant default: adding the column rewrites
-- nothing; rows from before it show their latest attempt from their own columns (the reader,
-- mesh/store/attempts.py, fills it in).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS attempts jsonb NOT NULL DEFAULT '{}'::jsonb;

-- One attempt's entry: `new` written over `cur` (null: none yet). Monotone: the entry only
-- moves to a greater rank (on a tie the first written stays, as for the row); the fields of
-- the state reached come from the winner alone, while the executor and start time are kept
-- from whichever report of the attempt had them. mesh/store/attempts.py `merge_attempt` is the
-- same rule in Python: keep them in step. A one-expression SQL function: inlined by the planner.
CREATE OR REPLACE FUNCTION tg_merge_attempt(cur jsonb, new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE
    WHEN cur IS NULL THEN new
    WHEN (new ->> 'rank')::int > (cur ->> 'rank')::int
        THEN (cur - ARRAY['state', 'rank', 'finished_at', 'exit_code', 'reason']) || new
    ELSE (new - ARRAY['state', 'rank', 'finished_at', 'exit_code', 'reason']) || cur
END
$$;

-- Every entry of `new` merged into `old`, attempt by attempt. Returns `old` unchanged when
-- nothing moves, so the upsert's WHERE can skip the write.
CREATE OR REPLACE FUNCTION tg_merge_attempts(old jsonb, new jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    merged jsonb := coalesce(old, '{}'::jsonb);
    n text;
    entry jsonb;
BEGIN
    FOR n, entry IN SELECT e.key, e.value FROM jsonb_each(coalesce(new, '{}'::jsonb)) AS e LOOP
        merged := jsonb_set(merged, ARRAY[n], tg_merge_attempt(merged -> n, entry));
    END LOOP;
    RETURN merged;
END
$$;

-- What the upsert calls: `tg_merge_attempts`, without its loop (a few microseconds a row) in
-- the usual case, where `new` holds at most the entry of the report's own attempt `own` (a
-- batch folds several attempts of a run into one row only when they come close together).
-- A one-expression SQL function of immutable operators only (jsonb_build_object is merely
-- stable, hence jsonb_set): inlined by the planner.
CREATE OR REPLACE FUNCTION tg_merge_attempts(old jsonb, new jsonb, own text) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE
    WHEN new = '{}'::jsonb THEN old
    WHEN new - own = '{}'::jsonb
        THEN jsonb_set(old, ARRAY[own], tg_merge_attempt(old -> own, new -> own))
    ELSE tg_merge_attempts(old, new)
END
$$;

-- The history for the readers (`attempt_history`, decoded by mesh/store/rows.py `task_record`),
-- at the end: a view only grows at its end.
CREATE OR REPLACE VIEW task_records AS
SELECT
    task_id, client, key, state, attempt, pool, task_class, executor, exit_code, reason,
    log_tail, submitted_at, started_at, finished_at,
    extract(epoch FROM finished_at - started_at)::double precision AS duration_s,
    updated_at,
    spec -> 'argv' AS argv,
    spec ->> 'shell' AS shell,
    spec -> 'env' AS env,
    spec ->> 'cwd' AS cwd,
    (spec ->> 'timeout_s')::double precision AS timeout_s,
    labels, priority, max_attempts,
    submitted_on,
    run,
    attempts AS attempt_history
FROM tasks;
