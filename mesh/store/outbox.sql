-- The callback outbox's statements, by name (loaded with queries.sql by mesh/store/queries.py).
-- Full-line comments are stripped before sending; keep them above or between clauses.

-- name: outbox_enqueue
-- One statement for a whole list of failed callbacks. WITH ORDINALITY + ORDER BY hand out the
-- ids in list order, and id order is delivery order. A callback already waiting (the same
-- event redelivered) keeps its row, its attempts and its place.
INSERT INTO callback_outbox (
    event_id, task_id, client, state, payload, attempts, next_attempt_at, last_error)
SELECT e.event_id, e.task_id, e.client, e.state, e.payload::jsonb, 1,
       clock_timestamp() + make_interval(secs => %(delay_s)s), %(error)s
FROM unnest(%(event_id)b::text[], %(task_id)b::text[], %(client)b::text[], %(state)b::text[],
            %(payload)b::text[]) WITH ORDINALITY AS e(event_id, task_id, client, state, payload, ord)
ORDER BY e.ord
ON CONFLICT (event_id) DO NOTHING;

-- name: outbox_pending_clients
-- A loose index scan over (client, id): one index probe per client instead of reading every
-- row, which matters when a client has been down for an hour of midnight floods.
WITH RECURSIVE c(client) AS (
    (SELECT client FROM callback_outbox ORDER BY client LIMIT 1)
    UNION ALL
    SELECT (SELECT o.client FROM callback_outbox o WHERE o.client > c.client
            ORDER BY o.client LIMIT 1)
    FROM c WHERE c.client IS NOT NULL
)
SELECT client FROM c WHERE client IS NOT NULL;

-- name: outbox_due_clients
-- Clients whose OLDEST row is due (or too old to keep): a client is retried from its head
-- only, so a later callback never overtakes an earlier one that is still backing off.
WITH RECURSIVE c(client) AS (
    (SELECT client FROM callback_outbox ORDER BY client LIMIT 1)
    UNION ALL
    SELECT (SELECT o.client FROM callback_outbox o WHERE o.client > c.client
            ORDER BY o.client LIMIT 1)
    FROM c WHERE c.client IS NOT NULL
)
SELECT c.client
FROM c
CROSS JOIN LATERAL (
    SELECT o.next_attempt_at, o.created_at FROM callback_outbox o
    WHERE o.client = c.client ORDER BY o.id LIMIT 1) AS head
WHERE c.client IS NOT NULL
  AND (head.next_attempt_at <= now()
       OR head.created_at <= now() - make_interval(secs => %(max_age_s)s));

-- name: outbox_lock_client
-- Transaction-scoped, so a driver that dies mid-pass frees the client with its connection.
-- The two-key form keeps these locks apart from the single-key ones (migrations, partitions).
SELECT pg_try_advisory_xact_lock(hashtext('tidegate.callbacks'), hashtext(%(client)s)) AS locked;

-- name: outbox_claim_rows
-- Under the client's advisory lock; SKIP LOCKED still keeps a pass from queueing behind rows
-- some other session happens to hold.
SELECT id, event_id, attempts, last_error, payload::text AS payload,
       next_attempt_at <= now() AS due,
       extract(epoch FROM now() - created_at)::double precision AS age_s
FROM callback_outbox
WHERE client = %(client)s
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: outbox_delete_delivered
DELETE FROM callback_outbox WHERE id = ANY(%(ids)s::bigint[]);

-- name: outbox_fail_one
-- clock_timestamp, not now(): the transaction began before the send, which may have taken
-- the whole timeout, and the backoff counts from the failure.
UPDATE callback_outbox
SET attempts = attempts + 1,
    next_attempt_at = clock_timestamp() + make_interval(secs => %(delay_s)s),
    last_error = %(error)s
WHERE id = %(id)s;

-- name: outbox_bury
-- Moves rows to the dead letters in one statement. `bump` counts a failed attempt made in
-- this pass; a null error keeps the row's last error. An event dead-lettered before (it was
-- redelivered and failed again) keeps one dead letter, the latest.
WITH gone AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(bumps)s::integer[])
        AS g(id, error, bump)
), moved AS (
    DELETE FROM callback_outbox o USING gone g
    WHERE o.id = g.id
    RETURNING o.event_id, o.task_id, o.client, o.state, o.payload,
              o.attempts + g.bump AS attempts, coalesce(g.error, o.last_error) AS last_error,
              o.created_at
)
INSERT INTO callback_dead_letters AS d (
    event_id, task_id, client, state, payload, attempts, last_error, created_at, dead_at)
SELECT event_id, task_id, client, state, payload, attempts, last_error, created_at,
       clock_timestamp()
FROM moved
ON CONFLICT (event_id) DO UPDATE SET
    payload = excluded.payload,
    attempts = excluded.attempts,
    last_error = excluded.last_error,
    created_at = excluded.created_at,
    dead_at = excluded.dead_at;

-- name: outbox_count_all
SELECT count(*) AS n FROM callback_outbox;

-- name: outbox_count_client
SELECT count(*) AS n FROM callback_outbox WHERE client = %(client)s;

-- name: dead_letters_all
SELECT event_id, task_id, client, state, attempts, last_error, created_at, dead_at, payload
FROM callback_dead_letters
ORDER BY dead_at DESC, id DESC
LIMIT %(limit)s;

-- name: dead_letters_client
SELECT event_id, task_id, client, state, attempts, last_error, created_at, dead_at, payload
FROM callback_dead_letters
WHERE client = %(client)s
ORDER BY dead_at DESC, id DESC
LIMIT %(limit)s;
