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

-- name: notify_term_begin
-- A notifier partition's new term (mesh/driver/notify_partition.py). Unconditional: the
-- holder has just taken the lease, and a lease bucket made anew starts its revisions again
-- from 1. Waits for every outbox write in flight under the earlier term (they hold the row
-- in share mode), so the outbox read that follows, in a statement of its own, sees them.
INSERT INTO notify_terms (partition, revision, holder)
VALUES (%(partition)s, %(revision)s, %(holder)s)
ON CONFLICT (partition) DO UPDATE
SET revision = EXCLUDED.revision, holder = EXCLUDED.holder, began_at = now();

-- name: notify_term_share
-- Before an outbox write, in its transaction: the term it is made under must still be the
-- newest (its revision at least the one written last); the share lock keeps a new term from
-- beginning until the write is committed.
SELECT revision, holder FROM notify_terms WHERE partition = %(partition)s FOR SHARE;

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

-- name: outbox_savepoint
-- Around a claim's failure bookkeeping, so that a refused update never undoes its deliveries.
SAVEPOINT outbox_settle;

-- name: outbox_rollback_savepoint
ROLLBACK TO SAVEPOINT outbox_settle;

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

-- name: outbox_count_failing
-- Rows whose retries failed as well (a row starts at one attempt, the failure that put it
-- here): the endpoint is still failing, not just slow once. The outbox stays small.
SELECT count(*) AS n FROM callback_outbox WHERE attempts > 1;

-- name: dead_letters_count
SELECT count(*) AS n FROM callback_dead_letters;

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

-- --- the console's Callbacks page (mesh/store/callbacks.py) ------------------------------------

-- name: callbacks_summary
-- Per client: callbacks waiting in the outbox (and how many of those are due) and dead letters.
-- A full scan of both tables, which stay small except during an outage; the page bounds the
-- read in time.
SELECT client, sum(outbox)::bigint AS outbox, sum(due)::bigint AS due, sum(dead)::bigint AS dead
FROM (
    SELECT client, count(*) AS outbox, count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
           0 AS dead
    FROM callback_outbox GROUP BY client
    UNION ALL
    SELECT client, 0, 0, count(*) FROM callback_dead_letters GROUP BY client
) AS s
GROUP BY client
ORDER BY client;

-- name: callbacks_outbox_page
-- Delivery order (id), keyset-paged. A client's rows go out only from its oldest row (the
-- retry job's rule), so each row carries that head and when the head is next tried: the
-- earliest this row can go. Optional filter: sent unprepared, so the plan uses (client, id).
SELECT o.id, o.event_id, o.task_id, o.client, o.state, o.attempts, o.next_attempt_at,
       o.last_error, o.created_at,
       extract(epoch FROM now() - o.created_at)::double precision AS age_s,
       h.id AS head_id,
       extract(epoch FROM h.next_attempt_at - now())::double precision AS wait_s
FROM callback_outbox o
CROSS JOIN LATERAL (
    SELECT i.id, i.next_attempt_at FROM callback_outbox i
    WHERE i.client = o.client ORDER BY i.id LIMIT 1) AS h
WHERE (%(client)s::text IS NULL OR o.client = %(client)s)
  AND o.id > %(after_id)s
ORDER BY o.id
LIMIT %(limit)s;

-- name: callbacks_ping
-- Before a change: a database that does not answer this has certainly not been changed.
SELECT 1 AS ok;

-- name: callbacks_outbox_row
SELECT id, event_id, task_id, client FROM callback_outbox WHERE id = %(id)s;

-- name: callbacks_outbox_scope
-- What a bulk "retry now" touches: the rows up to `upto` (all when null), and the newest id,
-- so a confirmed action covers the rows counted, not ones that arrived since.
SELECT count(*) AS n, max(id) AS upto
FROM callback_outbox
WHERE (%(client)s::text IS NULL OR client = %(client)s)
  AND (%(upto)s::bigint IS NULL OR id <= %(upto)s);

-- name: callbacks_lock_timeout
-- SET LOCAL cannot take a parameter; set_config(..., true) is the same, for this transaction.
SELECT set_config('lock_timeout', %(timeout)s, true);

-- name: callbacks_lock_clients
-- The retry job's per-client lock (outbox_lock_client), waited for rather than tried: while
-- the console holds it no retry pass claims the client, so no pass sees half a change or
-- skips a row the console has locked (which would send a later row before it). Callers pass
-- the names sorted, so two consoles cannot deadlock; unnest keeps the array's order.
SELECT pg_advisory_xact_lock(hashtext('tidegate.callbacks'), hashtext(c))
FROM unnest(%(clients)s::text[]) AS c;

-- name: callbacks_retry_now
-- Due at once: the next retry pass (any driver, every second) sends these rows, in id order.
UPDATE callback_outbox
SET next_attempt_at = now()
WHERE client = ANY(%(clients)s::text[])
  AND id <= %(upto)s
  AND next_attempt_at > now();

-- name: callbacks_dead_page
-- Newest dead letters first, keyset-paged by id. Optional filter: sent unprepared.
SELECT id, event_id, task_id, client, state, attempts, last_error, created_at, dead_at
FROM callback_dead_letters
WHERE (%(client)s::text IS NULL OR client = %(client)s)
  AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: callbacks_dead_row
SELECT id, event_id, task_id, client FROM callback_dead_letters WHERE id = %(id)s;

-- name: callbacks_dead_one
-- One dead letter with the callback it would have sent (`tidegate dead-letters show`).
SELECT id, event_id, task_id, client, state, attempts, last_error, created_at, dead_at, payload
FROM callback_dead_letters
WHERE id = %(id)s;

-- name: callbacks_dead_scope
SELECT count(*) AS n, max(id) AS upto
FROM callback_dead_letters
WHERE client = %(client)s
  AND (%(upto)s::bigint IS NULL OR id <= %(upto)s);

-- name: callbacks_redrive
-- Dead letters back into the outbox in one statement: same event_id and payload, due now,
-- attempts and age reset (a row buried for its age would be buried again at once). New ids
-- put them behind the client's waiting rows, in the order they were first outboxed. An event
-- already waiting in the outbox (redelivered since) keeps its row; its dead letter goes.
WITH moved AS (
    DELETE FROM callback_dead_letters
    WHERE client = %(client)s AND id BETWEEN %(first)s AND %(last)s
    RETURNING id, event_id, task_id, client, state, payload, last_error, created_at
), queued AS (
    INSERT INTO callback_outbox (
        event_id, task_id, client, state, payload, attempts, next_attempt_at, last_error,
        created_at)
    SELECT event_id, task_id, client, state, payload, 0, now(), last_error, now()
    FROM moved
    ORDER BY created_at, id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM queued) AS queued,
       (SELECT min(id) FROM queued) AS first_id;
