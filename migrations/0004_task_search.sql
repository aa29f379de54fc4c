-- The console's task list: newest first, filtered or not, paged by (submitted_at, task_id).
CREATE INDEX IF NOT EXISTS tasks_submitted_idx ON tasks (submitted_at DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_client_submitted_idx
    ON tasks (client, submitted_at DESC, task_id DESC);
-- A key prefix (`LIKE 'wf-812.%'`) within a client.
CREATE INDEX IF NOT EXISTS tasks_client_key_idx ON tasks (client, key text_pattern_ops);

-- The day partition key, so that a time-bounded search prunes partitions through the view.
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
    submitted_on
FROM tasks;
