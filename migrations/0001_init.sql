-- Tidegate schema 1: clients, the task projection (one partition per day), the callback outbox.
-- Applied by `tidegate migrate` (mesh/store/migrate.py) inside one transaction.

-- Client systems. The source of truth that drivers and executors see through a KV mirror.
CREATE TABLE clients (
    name             text PRIMARY KEY,
    sensitive        boolean NOT NULL DEFAULT false,
    callback_url     text,
    callback_nats    boolean NOT NULL DEFAULT false,
    callback_secret  text,
    max_running      integer,
    max_submit_per_s double precision,
    default_pool     text NOT NULL DEFAULT 'default',
    paused           boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- Names become NATS subject tokens and KV keys; pools likewise.
    CONSTRAINT clients_name_valid CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    CONSTRAINT clients_default_pool_valid CHECK (default_pool ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- A client is called back one way; two transports would double every callback.
    CONSTRAINT clients_one_callback CHECK (NOT (callback_nats AND callback_url IS NOT NULL)),
    CONSTRAINT clients_callback_url_http CHECK (callback_url ~ '^https?://'),
    CONSTRAINT clients_max_running_positive CHECK (max_running >= 0),
    CONSTRAINT clients_max_submit_positive CHECK (max_submit_per_s > 0)
);

-- The task projection. Written only by monotone upserts (see mesh/store/queries.sql), so a
-- row moves forward in (attempt, state_rank) whatever order its events arrive in.
-- Partitioned by day so that retention drops whole partitions instead of DELETE-ing millions
-- of rows (no bloat, no vacuum storm, no long lock).
CREATE TABLE tasks (
    task_id      text NOT NULL,
    client       text NOT NULL,
    key          text NOT NULL,
    submitted_on date NOT NULL,
    submitted_at timestamptz NOT NULL,
    pool         text,
    task_class   text,
    spec         jsonb,  -- the TaskSpec as submitted; null until the `queued` event is projected
    priority     integer,
    labels       jsonb,
    max_attempts integer,
    state        text NOT NULL,
    state_rank   smallint NOT NULL,
    attempt      integer NOT NULL,
    executor     text,
    exit_code    integer,
    reason       text,
    log_tail     text,
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, submitted_on)
) PARTITION BY RANGE (submitted_on);

-- `tidegate tasks --client C --state S`, newest first.
CREATE INDEX tasks_client_state_idx ON tasks (client, state, submitted_at DESC);
-- Operators' and reconcilers' "what is running / failed" lookups, newest first.
CREATE INDEX tasks_state_idx ON tasks (state, submitted_at DESC);

-- Partitions are created on demand by the projector for every day it writes (it caches the
-- days it has seen). Several drivers may hit a new day at the same moment: the advisory lock
-- serialises creators, and the re-check under the lock makes the losers no-ops instead of
-- failing on the catalog's unique index.
CREATE FUNCTION tg_ensure_partition(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'tasks_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(format('%I', part)) IS NOT NULL THEN
        RETURN;  -- the common case takes no lock at all
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('tidegate.tasks.partitions'));
    -- Re-check with a query, not to_regclass: an advisory lock does not flush this backend's
    -- catalog cache, which still remembers "no such table" from the check above.
    IF EXISTS (SELECT FROM pg_class c
               WHERE c.relname = part
                 AND c.relnamespace = (SELECT relnamespace FROM pg_class
                                       WHERE oid = 'tasks'::regclass)) THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF tasks FOR VALUES FROM (%L) TO (%L)',
                   part, day, day + 1);
END
$$;

-- Retention: drop every daily partition whose whole range lies before `day`; returns how many.
-- Only partitions named by tg_ensure_partition are touched, so a hand-made one is left alone.
CREATE FUNCTION tg_drop_partitions_before(day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    -- Same lock as creation: a partition is never dropped while another driver re-creates it.
    PERFORM pg_advisory_xact_lock(hashtext('tidegate.tasks.partitions'));
    FOR part IN
        SELECT n.nspname, c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE i.inhparent = 'tasks'::regclass
          AND c.relname ~ '^tasks_[0-9]{8}$'
          AND to_date(substr(c.relname, 7), 'YYYYMMDD') < day
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I.%I', part.nspname, part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

-- What `tidegate task show --json` prints: the row plus the spec's fields (null while the spec
-- is unknown) and the duration of the last attempt.
CREATE VIEW task_records AS
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
    labels, priority, max_attempts
FROM tasks;

-- A callback that failed, waiting for the retry job (the only per-callback write).
CREATE TABLE callback_outbox (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL UNIQUE,
    task_id         text NOT NULL,
    client          text NOT NULL,
    state           text NOT NULL,
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX callback_outbox_due_idx ON callback_outbox (next_attempt_at);

-- Callbacks that exhausted their attempts, kept for operators to inspect and replay.
CREATE TABLE callback_dead_letters (
    id         bigserial PRIMARY KEY,
    event_id   text NOT NULL UNIQUE,
    task_id    text NOT NULL,
    client     text NOT NULL,
    state      text NOT NULL,
    payload    jsonb NOT NULL,
    attempts   integer NOT NULL,
    last_error text,
    created_at timestamptz NOT NULL,
    dead_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX callback_dead_letters_client_idx ON callback_dead_letters (client, dead_at DESC);
