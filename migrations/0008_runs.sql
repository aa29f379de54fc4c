-- Runs: a key submitted again after the dedup window (or an operator's retry) is the task's
-- next run, with a row of its own. `run` is the tasks-stream sequence of the submission that
-- started the run (later runs have larger ids); 0 for rows written before runs existed.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS run bigint NOT NULL DEFAULT 0;

-- The key of the monotone upsert (and of its ON CONFLICT target) takes the run. The day stays
-- in it: a partitioned table's unique keys must hold the partition key.
ALTER TABLE tasks DROP CONSTRAINT tasks_pkey;
ALTER TABLE tasks ADD CONSTRAINT tasks_pkey PRIMARY KEY (task_id, run, submitted_on);

-- The run, for the task page and `task show` (at the end: a view only grows at its end).
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
    run
FROM tasks;
