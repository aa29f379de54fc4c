-- Tidegate schema 12: a client's command policy.

-- What its tasks may run, checked where they are routed (a refused one is `rejected` with the
-- reason): absolute paths or globs `argv[0]` must match (`/usr/bin/*`, `/opt/jobs/**`), directory
-- prefixes `cwd` must be under, and whether `shell` is allowed. NULL lists allow any, and
-- allow_shell defaults to true: an existing client keeps running what it ran before.
-- `tidegate client set NAME --allow-executable PATH --allow-cwd DIR --no-shell` sets them.
ALTER TABLE clients ADD COLUMN IF NOT EXISTS allowed_executables text[];
ALTER TABLE clients ADD COLUMN IF NOT EXISTS allowed_cwds text[];
ALTER TABLE clients ADD COLUMN IF NOT EXISTS allow_shell boolean NOT NULL DEFAULT true;

-- Each entry an absolute path without a `..` component, at most 256 of them: joined by
-- newlines (which no entry may hold: the join splits back into as many), one regular
-- expression checks them all. Not an empty list: it would refuse every task (pause the client
-- for that).
ALTER TABLE clients DROP CONSTRAINT IF EXISTS clients_allowed_executables_valid;
ALTER TABLE clients ADD CONSTRAINT clients_allowed_executables_valid CHECK (
    allowed_executables IS NULL
    OR (cardinality(allowed_executables) <= 256
        AND array_position(allowed_executables, NULL) IS NULL
        AND cardinality(allowed_executables)
            = cardinality(string_to_array(array_to_string(allowed_executables, E'\n'), E'\n'))
        AND array_to_string(allowed_executables, E'\n') !~ E'(^|\n)([^/]|\n|$)'
        AND array_to_string(allowed_executables, E'\n') !~ E'(^|\n|/)\\.\\.(/|\n|$)'));
ALTER TABLE clients DROP CONSTRAINT IF EXISTS clients_allowed_cwds_valid;
ALTER TABLE clients ADD CONSTRAINT clients_allowed_cwds_valid CHECK (
    allowed_cwds IS NULL
    OR (cardinality(allowed_cwds) <= 256
        AND array_position(allowed_cwds, NULL) IS NULL
        AND cardinality(allowed_cwds)
            = cardinality(string_to_array(array_to_string(allowed_cwds, E'\n'), E'\n'))
        AND array_to_string(allowed_cwds, E'\n') !~ E'(^|\n)([^/]|\n|$)'
        AND array_to_string(allowed_cwds, E'\n') !~ E'(^|\n|/)\\.\\.(/|\n|$)'));
