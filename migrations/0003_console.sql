-- Tidegate schema 3: the console's operator accounts and its audit log.

-- Who may log in to the console. `viewer` reads everything; `operator` may also change things.
-- The password is an argon2id hash (argon2-cffi's PHC string); the clear text is never stored.
CREATE TABLE operators (
    username      text PRIMARY KEY,
    password_hash text NOT NULL,
    role          text NOT NULL DEFAULT 'viewer',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Shown in pages, logs and audit lines: plain characters only, nothing to escape.
    CONSTRAINT operators_username_valid CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    CONSTRAINT operators_role_valid CHECK (role IN ('viewer', 'operator')),
    CONSTRAINT operators_password_hash_argon2 CHECK (password_hash LIKE '$argon2%')
);

-- Who did what, from the console or the command line. Append-only: nothing updates a row.
-- `target` is what was acted on (a client, a task id, an operator); `details` the specifics.
CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text NOT NULL DEFAULT '',
    details jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- The audit page lists newest first and pages backwards from the oldest row it shows.
CREATE INDEX audit_log_newest_idx ON audit_log (at DESC, id DESC);
