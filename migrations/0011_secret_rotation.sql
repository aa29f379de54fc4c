-- Tidegate schema 11: rotating a client's callback secret with an overlap.

-- The secret the current one replaced, and until when it still signs beside it
-- (`tidegate client rotate-secret NAME --overlap 24h`): a receiver verifying with either
-- accepts the callbacks meanwhile. Mirrored to drivers only (the tg_client_secrets bucket).
ALTER TABLE clients ADD COLUMN IF NOT EXISTS callback_secret_previous text;
ALTER TABLE clients ADD COLUMN IF NOT EXISTS callback_secret_previous_until timestamptz;
