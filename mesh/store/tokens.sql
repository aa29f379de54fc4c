-- API tokens of the console's JSON API, by name (loaded by mesh/store/queries.py).
-- Full-line comments are stripped before sending; keep them above or between clauses.

-- name: token_client_exists
SELECT 1 AS found FROM clients WHERE name = %(client)s;

-- name: token_add
-- Nothing returned means an active token has this name already.
INSERT INTO api_tokens (name, token_hash, scope, client)
VALUES (%(name)s, %(token_hash)s, %(scope)s, %(client)s)
ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
RETURNING name, scope, client, created_at, last_used_at, revoked_at;

-- name: token_list
SELECT name, scope, client, created_at, last_used_at, revoked_at
FROM api_tokens ORDER BY name, created_at;

-- name: token_revoke
UPDATE api_tokens SET revoked_at = now()
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING name, scope, client, created_at, last_used_at, revoked_at;

-- name: token_find
-- The token in use with this hash, if any, and its `last_used_at` moved to now when that is
-- more than a minute old: one round trip, and at most one write a minute per token.
WITH found AS (
    SELECT id, name, scope, client FROM api_tokens
    WHERE token_hash = %(token_hash)s AND revoked_at IS NULL
), touched AS (
    UPDATE api_tokens t SET last_used_at = now()
    FROM found
    WHERE t.id = found.id
      AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute')
)
SELECT name, scope, client FROM found;
