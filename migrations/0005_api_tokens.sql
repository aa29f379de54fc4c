-- Tidegate schema 5: API tokens for the console's JSON API (`tidegate token …`).

-- A machine client's credential. Only the SHA-256 of the token is kept: tokens are 32 random
-- bytes, so a plain hash cannot be reversed by guessing, and a leaked table opens nothing.
-- `scope` is what the token may do: `operator` and `viewer` as the console's roles, `client`
-- only the tasks of `client` (submit, read, cancel).
CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    token_hash   text NOT NULL UNIQUE,
    scope        text NOT NULL,
    client       text REFERENCES clients (name),
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Written at most once a minute per token: a busy client must not mean a write per request.
    last_used_at timestamptz,
    -- Set once, never cleared: a revoked token stays listed, so the audit trail can name it.
    revoked_at   timestamptz,
    CONSTRAINT api_tokens_name_valid CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    CONSTRAINT api_tokens_scope_valid CHECK (scope IN ('operator', 'viewer', 'client')),
    CONSTRAINT api_tokens_client_iff_client_scope CHECK ((scope = 'client') = (client IS NOT NULL)),
    CONSTRAINT api_tokens_hash_sha256 CHECK (token_hash ~ '^[0-9a-f]{64}$')
);

-- A name is unique among the tokens in use; a revoked token's name may be given again.
CREATE UNIQUE INDEX api_tokens_active_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;
